"""Token sampling on the device: greedy, temperature, top-k and top-p, one row per sequence.

`verify_tokens` checks speculative drafts at every position of a row in one call (greedy
acceptance, or rejection sampling that keeps the target distribution).

Each row has its own parameters and its own random stream: the key of a row is its request's
seed folded with the number of tokens it has generated, so a seeded request samples the same
tokens whatever it is batched with. Only the sampled ids leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SamplingInputs", "sample_tokens", "verify_tokens"]


def _filtered(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside each row's top-k, then outside the top-p of what remains, set to -inf;
    rows that ask for neither come back untouched."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    # The smallest prefix reaching top_p (the first token always stays).
    kept = in_top_k & (before < top_p[:, None])
    num_kept = jnp.maximum(jnp.sum(kept, axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, (num_kept - 1)[:, None], axis=-1)
    wants = ((top_k > 0) | (top_p < 1.0))[:, None]
    return jnp.where(wants & (logits < threshold), -jnp.inf, logits)


def _scaled(logits, temperature, top_k, top_p) -> jax.Array:
    """f32[rows, vocab] logits divided by each row's temperature (greedy rows: 1), top-k and
    top-p filtered where asked."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
    return jax.lax.cond(needs_filter, _filtered, lambda x, *_: x, scaled, top_k, top_p)


def _token_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """The key of each row's next token: its seed folded with its token count."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


@jax.jit
def sample_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counters: jax.Array,
) -> jax.Array:
    """int32[rows] token ids.

    Args:
        logits: f32[rows, vocab].
        temperature: f32[rows]; 0 is greedy.
        top_k: int32[rows]; 0 keeps every token.
        top_p: f32[rows] in (0, 1]; 1 keeps every token.
        seeds: uint32[rows]; counters: int32[rows] (tokens the row's request has generated).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = _scaled(logits, temperature, top_k, top_p)
    sampled = jax.vmap(jax.random.categorical)(_token_keys(seeds, counters), scaled)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


_ACCEPT_STREAM = 0x5BEC  # folded into a token's key for its acceptance draw


@jax.jit
def verify_tokens(
    logits: jax.Array,
    draft_tokens: jax.Array,
    num_drafts: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counters: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Verifies point-proposal drafts against the target's logits at every draft position.

    Greedy rows accept a draft while it equals the target's argmax. Sampled rows accept draft
    `d` at a position with probability p(d) (p: the target's filtered distribution there) and,
    at the first rejection, sample from p with `d` removed, renormalized; so every emitted
    token is distributed as the target's, drafts or not. After the accepted drafts comes one
    token: the correction at a rejection, else a sample at the position past the last draft.
    Token j of a row uses the key of its (counter + j)-th token, so with no drafts this is
    `sample_tokens`.

    Args:
        logits: f32[rows * (1 + W), vocab]; row `r * (1 + W) + j` scores the token of row r
            after j drafts.
        draft_tokens: int32[rows, W] (padding past `num_drafts` is ignored).
        num_drafts: int32[rows], each <= W.
        temperature, top_k, top_p, seeds, counters: per row, as in `sample_tokens`.

    Returns:
        (num_accepted int32[rows], tokens int32[rows, 1 + W]): a row's new tokens are
        `tokens[:num_accepted + 1]`.
    """
    (rows, width), vocab = (num_drafts.shape[0], draft_tokens.shape[1] + 1), logits.shape[-1]
    position = jnp.arange(width)
    repeat = lambda a: jnp.repeat(a, width)  # noqa: E731 (per row -> per position)
    scaled = _scaled(logits, repeat(temperature), repeat(top_k), repeat(top_p))
    scaled, logits = scaled.reshape(rows, width, vocab), logits.reshape(rows, width, vocab)
    drafts = jnp.pad(draft_tokens, ((0, 0), (0, 1)))  # position j's draft; none at the end
    is_draft = position[None, :] < num_drafts[:, None]
    keys = jax.vmap(_token_keys, in_axes=(None, 1), out_axes=1)(
        seeds, counters[:, None] + position[None, :]
    )
    probs = jax.nn.softmax(scaled, axis=-1)
    p_draft = jnp.take_along_axis(probs, drafts[..., None], axis=-1)[..., 0]
    accept_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, _ACCEPT_STREAM)))(keys)
    uniform = jax.vmap(jax.vmap(jax.random.uniform))(accept_keys)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = (temperature > 0)[:, None]
    accept = is_draft & jnp.where(sampled_rows, uniform < p_draft, drafts == greedy)
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)
    removed = is_draft[..., None] & (jnp.arange(vocab) == drafts[..., None])
    residual = jnp.where(removed, -jnp.inf, scaled)
    sampled = jax.vmap(jax.vmap(jax.random.categorical))(keys, residual).astype(jnp.int32)
    choice = jnp.where(sampled_rows, sampled, greedy)
    tokens = jnp.where(position[None, :] < num_accepted[:, None], drafts, choice)
    return num_accepted, tokens


class SamplingInputs:
    """Host arrays of one step's sampling parameters, padded to `rows`."""

    def __init__(self, rows: int) -> None:
        self.temperature = np.zeros(rows, np.float32)
        self.top_k = np.zeros(rows, np.int32)
        self.top_p = np.ones(rows, np.float32)
        self.seeds = np.zeros(rows, np.uint32)
        self.counters = np.zeros(rows, np.int32)

    def set_row(self, row: int, params, seed: int, counter: int) -> None:
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seeds[row] = seed
        self.counters[row] = counter

    def sample(self, logits: jax.Array) -> np.ndarray:
        args = (self.temperature, self.top_k, self.top_p, self.seeds, self.counters)
        return np.asarray(sample_tokens(logits, *args))

    def verify(
        self, logits: jax.Array, draft_tokens: np.ndarray, num_drafts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`verify_tokens` on f32[rows * (1 + W), vocab] logits; host arrays back."""
        args = (self.temperature, self.top_k, self.top_p, self.seeds, self.counters)
        accepted, tokens = verify_tokens(logits, draft_tokens, num_drafts, *args)
        return np.asarray(accepted), np.asarray(tokens)
