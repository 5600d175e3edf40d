"""Token sampling on the device: greedy, temperature, top-k and top-p, one row per sequence.

`verify_tokens` checks speculative drafts at every position of a row in one call (greedy
acceptance, or rejection sampling that keeps the target distribution).

Each row has its own parameters and its own random stream: the key of a row is its request's
seed folded with the number of tokens it has generated, so a seeded request samples the same
tokens whatever it is batched with, and with or without speculative drafts. Only the sampled ids
leave the device, and the log-probabilities where a row asks for them.

Penalties (`kvjax.runtime.penalties`) change the logits first; temperature then scales them;
top-k and top-p truncate last. Log-probabilities are those of the penalized, temperature-scaled
logits (a greedy row's at temperature 1) before top-k and top-p truncation: vLLM's
"processed" log-probabilities, except that truncated tokens keep their value rather than -inf,
so the alternatives stay informative.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.runtime.penalties import Penalties, history_penalties, penalized

__all__ = [
    "MAX_TOP_LOGPROBS",
    "SampledTokens",
    "SamplingInputs",
    "TokenLogprobs",
    "sample_tokens",
    "score_rows",
    "token_logprobs",
    "verify_and_feed",
    "verify_tokens",
]

MAX_TOP_LOGPROBS = 20  # alternatives a row may ask for (OpenAI's limit)


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

    def sampled() -> jax.Array:
        scaled = _scaled(logits, temperature, top_k, top_p)
        picks = jax.vmap(jax.random.categorical)(_token_keys(seeds, counters), scaled)
        return jnp.where(temperature > 0, picks.astype(jnp.int32), greedy)

    # An all-greedy batch skips drawing a sample per row and vocabulary entry.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


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

    At each position the target picks its token exactly as `sample_tokens` would (argmax, or
    a sample of its filtered distribution p with the key of the row's (counter + j)-th
    token); a draft is accepted while it equals that pick, and the first pick that differs
    is emitted after the accepted drafts (or the pick past the last draft). For a sampled
    row this is rejection sampling of a point proposal d: accepted with probability p(d),
    replaced on rejection by a sample of p without d, renormalized; so every emitted token
    is distributed as the target's and, stream for stream, a seeded request emits the same
    tokens with or without drafts, whatever its drafts were.

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
    rows, width = num_drafts.shape[0], draft_tokens.shape[1] + 1
    repeat = lambda a: jnp.repeat(a, width)  # noqa: E731 (per row -> per position)
    counter = (counters[:, None] + jnp.arange(width)[None, :]).reshape(-1)
    args = (repeat(temperature), repeat(top_k), repeat(top_p), repeat(seeds), counter)
    picks = sample_tokens(logits, *args).reshape(rows, width)
    is_draft = jnp.arange(width - 1)[None, :] < num_drafts[:, None]
    accept = is_draft & (draft_tokens == picks[:, :-1])
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)
    return num_accepted, picks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of N picked tokens (see the module docstring for which distribution).

    Arrays: `chosen` f32[N] the pick's; `top_ids` int32[N, K] and `top` f32[N, K] the K most
    likely tokens', best first (K = min(MAX_TOP_LOGPROBS, vocab))."""

    chosen: jax.Array
    top_ids: jax.Array
    top: jax.Array


def token_logprobs(logits: jax.Array, temperature: jax.Array, picks: jax.Array) -> TokenLogprobs:
    """`TokenLogprobs` of `picks` (int32[N]) under f32[N, vocab] `logits` divided by each row's
    temperature f32[N] (0, greedy: 1)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    chosen = jnp.take_along_axis(logprobs, picks[:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    return TokenLogprobs(chosen, top_ids.astype(jnp.int32), top)


@jax.jit
def score_rows(
    logits: jax.Array, sample_rows: jax.Array, next_tokens: jax.Array
) -> tuple[jax.Array, TokenLogprobs]:
    """A step with a logit row per token: (f32[rows, vocab] the rows sequences sample from,
    `TokenLogprobs` of each row's next token (int32[T] `next_tokens`; -1 rows are padding)
    under f32[T, vocab] `logits` at temperature 1)."""
    picks = jnp.maximum(next_tokens, 0)
    return logits[sample_rows], token_logprobs(logits, jnp.ones(picks.shape), picks)


@functools.partial(jax.jit, static_argnames=("feed_size", "with_logprobs"))
def verify_and_feed(
    logits, draft_tokens, num_drafts, temperature, top_k, top_p, seeds, counters,
    penalties: Penalties | None = None, *, feed_size, with_logprobs: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, TokenLogprobs | None]:  # fmt: skip
    """`verify_tokens` on the logits penalized where `penalties` are given (the drafts ahead of
    each position count as outputs), plus int32[feed_size] `fed`: row r's next input token (its
    pick after its accepted drafts) at index r, zeros past the rows; the next step reads it on
    the device (`kvjax.runtime.step.fed_tokens`). With `with_logprobs`, the `TokenLogprobs` of
    every position's pick (N = rows * (1 + W)), else None."""
    if penalties is not None:
        logits = penalized(logits, penalties, draft_tokens, num_drafts)
    args = (temperature, top_k, top_p, seeds, counters)
    num_accepted, picks = verify_tokens(logits, draft_tokens, num_drafts, *args)
    rows, width = picks.shape
    last = jnp.take_along_axis(picks, num_accepted[:, None], axis=1)[:, 0]
    fed = jnp.zeros(feed_size, jnp.int32).at[:rows].set(last[:feed_size])
    logprobs = None
    if with_logprobs:
        logprobs = token_logprobs(logits, jnp.repeat(temperature, width), picks.reshape(-1))
    return num_accepted, picks, fed, logprobs


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """One step's picks, still on the device (JAX dispatch is asynchronous: nothing has waited
    for the step yet)."""

    num_accepted: jax.Array  # int32[rows]
    tokens: jax.Array  # int32[rows, 1 + W]
    fed: jax.Array  # int32[feed_size]: each row's next input token
    logprobs: TokenLogprobs | None = None  # N = rows * (1 + W), where a row asked
    prompt_logprobs: TokenLogprobs | None = None  # N = the step's tokens (`score_rows`)

    def fetch(self) -> tuple[np.ndarray, np.ndarray]:
        """(num_accepted, tokens) as host arrays; waits for the step."""
        return np.asarray(self.num_accepted), np.asarray(self.tokens)

    def fetch_prompt_logprobs(self) -> TokenLogprobs | None:
        """The prompt tokens' log-probabilities as host arrays (N = the step's tokens)."""
        if self.prompt_logprobs is None:
            return None
        return TokenLogprobs(*(np.asarray(a) for a in jax.tree.leaves(self.prompt_logprobs)))

    def fetch_logprobs(self) -> TokenLogprobs | None:
        """The log-probabilities as host arrays shaped per row and position (`chosen`
        f32[rows, 1 + W], `top_ids` and `top` [rows, 1 + W, K]), or None."""
        if self.logprobs is None:
            return None
        rows, width = self.tokens.shape
        arrays = (np.asarray(a) for a in jax.tree.leaves(self.logprobs))
        chosen, top_ids, top = (a.reshape(rows, width, *a.shape[1:]) for a in arrays)
        return TokenLogprobs(chosen, top_ids, top)


class SamplingInputs:
    """Host arrays of one step's sampling parameters, padded to `rows`; penalized rows send
    `history_width` tokens of history each (the engine's `max_seq_len`)."""

    def __init__(self, rows: int, history_width: int = 0) -> None:
        self.history_width = history_width
        self.temperature = np.zeros(rows, np.float32)
        self.top_k = np.zeros(rows, np.int32)
        self.top_p = np.ones(rows, np.float32)
        self.seeds = np.zeros(rows, np.uint32)
        self.counters = np.zeros(rows, np.int32)
        self.penalties: Penalties | None = None  # none of the rows is penalized
        self.with_logprobs = False

    def fill(self, params: list, counters: list[int], histories=None) -> None:
        """Rows `0..len(params) - 1` from each row's `SamplingParams` (seeded) and token count:
        one assignment per field, not per row. `histories`: each row's (prompt, outputs) token
        ids, needed when a row is penalized (`SamplingParams.penalized`)."""
        rows = len(params)
        self.temperature[:rows] = [p.temperature for p in params]
        self.top_k[:rows] = [p.top_k for p in params]
        self.top_p[:rows] = [p.top_p for p in params]
        self.seeds[:rows] = [p.seed for p in params]
        self.counters[:rows] = counters
        self.with_logprobs = any(p.logprobs is not None for p in params)
        if any(p.penalized for p in params):
            rows = len(self.temperature)
            self.penalties = history_penalties(params, histories, rows, self.history_width)

    def arrays(self) -> list[np.ndarray]:
        """Every host array (what processes compare in lockstep)."""
        arrays = [self.temperature, self.top_k, self.top_p, self.seeds, self.counters]
        arrays.append(np.asarray([self.with_logprobs]))
        return arrays + ([] if self.penalties is None else jax.tree.leaves(self.penalties))

    def verify(
        self, logits: jax.Array, draft_tokens: np.ndarray, num_drafts: np.ndarray, feed_size: int
    ) -> SampledTokens:
        """`verify_and_feed` on f32[rows * (1 + W), vocab] logits, without waiting for them."""
        args = (self.temperature, self.top_k, self.top_p, self.seeds, self.counters)
        options = {"feed_size": feed_size, "with_logprobs": self.with_logprobs}
        picked = verify_and_feed(logits, draft_tokens, num_drafts, *args, self.penalties, **options)
        return SampledTokens(*picked)
