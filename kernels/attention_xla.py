"""The `impl="xla"` attention path (the CPU path, and the GPU fallback): a loop over chunks of
page-table columns with an online softmax, whose trip count follows the batch's longest context.

The dense reference (`attention_reference.dense_paged_attention`) gathers every column of the
table, so its cost follows the table's width (`max_seq_len`), not the context: a prefill of 8x32
tokens against 161-block tables gathers 5x as many pages as it reads. Here a `while_loop` stops
after `ceil(max(kv_lens) / chunk)` chunks; shapes stay static, so one executable serves every
context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import NULL_PAGE, in_window
from kernels.kv_quant import pages_f32

__all__ = ["context_paged_attention"]

_KEYS_PER_CHUNK = 128  # keys gathered per loop step: columns = max(1, 128 // tokens_per_block)


def context_paged_attention(
    q, kv_pool, row_tables, row_kv_lens, row_positions, *, layer, sm_scale, soft_cap=None,
    window=None, sink_tokens=0,
):  # fmt: skip
    """Each query row attends over its sequence's keys, visiting only the table columns that
    some row's context reaches: with a window, the sinks' chunks and then the chunks from the
    earliest window start on (the pages between are never read). Same contract as
    `dense_paged_attention`.

    Args:
        q: [rows, q_heads, head_dim].
        kv_pool: [pages, layers, 2, kv_heads, tokens_per_block, head_dim], or a
            `kv_quant.QuantizedPool` of them.
        row_tables: int32[rows, max_blocks], the page table of each row's sequence.
        row_kv_lens: int32[rows]; keys past it are not read (0: none).
        row_positions: int32[rows]; a row sees keys at positions up to its own (causal).

    Returns:
        [rows, q_heads, head_dim] in q's dtype; rows that see no key give zeros.
    """
    rows, num_q_heads, head_dim = q.shape
    num_kv_heads, tokens_per_block = kv_pool.shape[3], kv_pool.shape[4]
    group = num_q_heads // num_kv_heads
    columns = max(1, _KEYS_PER_CHUNK // tokens_per_block)
    width = row_tables.shape[1]
    num_chunks_max = -(-width // columns)
    tables = jnp.pad(row_tables, ((0, 0), (0, num_chunks_max * columns - width)),
                     constant_values=NULL_PAGE)  # fmt: skip
    chunk_keys = columns * tokens_per_block
    num_chunks = (jnp.max(row_kv_lens, initial=0) + chunk_keys - 1) // chunk_keys
    num_sink_chunks, first_window_chunk = _chunk_ranges(
        row_kv_lens, row_positions, num_chunks, chunk_keys, window, sink_tokens
    )
    num_steps = num_sink_chunks + jnp.maximum(num_chunks - first_window_chunk, 0)
    grouped = q.reshape(rows, num_kv_heads, group, head_dim).astype(jnp.float32)
    # A pool of one layer enters the loop without its unit axis: XLA on the CPU gives that axis
    # a layout of its own and would copy the whole pool into the loop at every call.
    one_layer = kv_pool.shape[1] == 1
    pool = kv_pool[:, 0] if one_layer else kv_pool

    def pages(chunk, kind):  # f32 [rows, columns, kv_heads, page, head_dim], only the chunk's
        return pages_f32(pool, (chunk, kind) if one_layer else (chunk, layer, kind))

    def chunk_step(state):
        step, running_max, total, out = state
        index = jnp.where(step < num_sink_chunks, step, first_window_chunk + step - num_sink_chunks)
        chunk = jax.lax.dynamic_slice_in_dim(tables, index * columns, columns, axis=1)
        keys, values = (
            pages(chunk, kind)
            .transpose(0, 2, 1, 3, 4)
            .reshape(rows, num_kv_heads, chunk_keys, head_dim)
            for kind in (0, 1)
        )
        position = index * chunk_keys + jnp.arange(chunk_keys)
        in_sequence = position[None, :] < row_kv_lens[:, None]  # [rows, chunk_keys]
        seen = in_sequence & in_window(position, row_positions, window, sink_tokens)
        visible = seen[:, None, None]
        values = jnp.where(seen[:, None, :, None], values, 0.0)  # stale pages: never used
        scores = jnp.einsum("rhgd,rhcd->rhgc", grouped, keys) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no key seen yet
        weights = jnp.where(visible, jnp.exp(scores - safe_max[..., None]), 0.0)
        rescale = jnp.exp(running_max - safe_max)
        total = total * rescale + jnp.sum(weights, axis=-1)
        out = out * rescale[..., None] + jnp.einsum("rhgc,rhcd->rhgd", weights, values)
        return step + 1, new_max, total, out

    state = (
        jnp.int32(0),
        jnp.full((rows, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((rows, num_kv_heads, group), jnp.float32),
        jnp.zeros((rows, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, _, total, out = jax.lax.while_loop(lambda s: s[0] < num_steps, chunk_step, state)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(rows, num_q_heads, head_dim).astype(q.dtype)


def _chunk_ranges(row_kv_lens, row_positions, num_chunks, chunk_keys, window, sink_tokens):
    """(chunks holding sinks, first chunk any row's window reaches): the chunks in between
    hold only keys no row sees."""
    if window is None:
        return jnp.int32(0), jnp.int32(0)
    num_sink_chunks = jnp.minimum(-(-sink_tokens // chunk_keys), num_chunks)
    window_start = jnp.where(row_kv_lens > 0, row_positions - window + 1, jnp.iinfo(jnp.int32).max)
    first = jnp.maximum(jnp.min(window_start, initial=jnp.iinfo(jnp.int32).max), 0) // chunk_keys
    return num_sink_chunks, jnp.maximum(first, num_sink_chunks).astype(jnp.int32)
