"""A model's logits at every position of one sequence, computed by the paged forward in chunks
over a pool of a chosen KV dtype (each chunk attends over the pages the previous ones wrote):
what the engine computes for a chunked prefill, with every row's logits kept."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.config import CacheConfig
from kvjax.runtime.step import StepInputs
from kvjax.runtime.storage import KVStorage


def chunked_logits(model, tokens, kv_dtype, *, chunk=64, tokens_per_block=16, impl="xla"):
    """f32[len(tokens), vocab]: the logits after each token, prefilled `chunk` tokens a step."""
    config = model.config
    blocks = -(-len(tokens) // tokens_per_block)
    cache = CacheConfig(
        num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, tokens_per_block=tokens_per_block, dtype=kv_dtype,
        device_pages=blocks + 1,
    )  # fmt: skip
    storage = KVStorage.for_config(cache, auto_host_tier=False, impl=impl)
    pool, rows = storage.pool, []
    table = jnp.arange(1, blocks + 1, dtype=jnp.int32)[None]
    forward = _forward(model, impl)
    for start in range(0, len(tokens), chunk):
        new = np.asarray(tokens[start : start + chunk], np.int32)
        padded = np.zeros(chunk, np.int32)
        padded[: len(new)] = new
        inputs = StepInputs(
            tokens=jnp.asarray(padded), page_table=table,
            kv_lens=jnp.asarray([start + len(new)], jnp.int32),
            cu_q_lens=jnp.asarray([0, len(new)], jnp.int32),
            num_seqs=jnp.asarray([1], jnp.int32),
            logits_indices=jnp.arange(chunk, dtype=jnp.int32),
        )  # fmt: skip
        logits, pool = forward(pool, inputs)
        rows.append(np.asarray(logits)[: len(new)])
    storage.close()
    return np.concatenate(rows)


@functools.cache
def _forward(model, impl):
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def forward(state, pool, inputs):  # the weights an argument, not constants of the program
        return nnx.merge(graphdef, state)(inputs, pool, impl=impl)

    return functools.partial(forward, state)
