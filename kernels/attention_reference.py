"""Plain-jnp paged attention, float32 inside: the reference both attention ops check against and
their `impl="xla"` path.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.common import in_window
from kernels.kv_quant import pages_f32

__all__ = ["dense_paged_attention"]


def dense_paged_attention(
    q, kv_pool, row_tables, row_kv_lens, row_positions, *, layer, sm_scale, soft_cap=None,
    window=None, sink_tokens=0,
):  # fmt: skip
    """Each query row attends over the gathered pages of its sequence.

    Args:
        q: [rows, q_heads, head_dim].
        kv_pool: [pages, layers, 2, kv_heads, tokens_per_block, head_dim], or a
            `kv_quant.QuantizedPool` of them (dequantized).
        row_tables: int32[rows, max_blocks], the page table of each row's sequence.
        row_kv_lens: int32[rows]; keys past it are masked and their values zeroed (0: none).
        row_positions: int32[rows]; a row sees keys at positions up to its own (causal).
        window, sink_tokens: a row sees only its last `window` positions and the first
            `sink_tokens` keys (None: every key); other keys' values are not read.

    Returns:
        [rows, q_heads, head_dim] in q's dtype; rows that see no key give zeros.
    """
    rows, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_pool.shape[3]
    group = num_q_heads // num_kv_heads
    # [rows, max_blocks, kv_heads, page, head_dim] -> [rows, kv_heads, context, head_dim]
    keys, values = (
        pages_f32(kv_pool, (row_tables, layer, kind))
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows, num_kv_heads, -1, head_dim)
        for kind in (0, 1)
    )
    key_position = jnp.arange(keys.shape[2])
    in_sequence = key_position[None, :] < row_kv_lens[:, None]  # [rows, context]
    visible = in_sequence & in_window(key_position, row_positions, window, sink_tokens)
    # Keys out of reach may sit in released pages (NaN, garbage): their values are never used.
    values = jnp.where(visible[:, None, :, None], values, 0.0)
    grouped = q.reshape(rows, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("rhgd,rhcd->rhgc", grouped, keys) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.where(visible[:, None, None, :], weights, 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("rhgc,rhcd->rhgd", weights / jnp.where(total > 0, total, 1.0), values)
    return out.reshape(rows, num_q_heads, head_dim).astype(q.dtype)
