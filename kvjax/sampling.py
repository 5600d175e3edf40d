"""Token sampling on the device: greedy, temperature, top-k and top-p, one row per sequence.

Each row has its own parameters and its own random stream: the key of a row is its request's
seed folded with the number of tokens it has generated, so a seeded request samples the same
tokens whatever it is batched with. Only the sampled ids leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SamplingInputs", "sample_tokens"]


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
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
    scaled = jax.lax.cond(needs_filter, _filtered, lambda x, *_: x, scaled, top_k, top_p)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


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
