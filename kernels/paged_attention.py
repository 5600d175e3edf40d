"""Paged decode attention (one query token per sequence), GQA, split-K over pages.

Grid `(batch, kv_heads, splits)`: a program takes the query heads of one KV group and one range of
pages of its sequence, gathers them `pages_per_chunk` at a time (one vector load of page ids, one of
keys, one of values) and folds them in with an online softmax, then writes its partial (max, sum,
output) to its own slot; a few jnp ops merge the splits. Pages past `kv_len` are never read (their
table entries become `NULL_PAGE`); keys past it are masked and their values zeroed, so NaN in unused
pages cannot leak. BlockSpecs select the layer and KV head of the whole pool (slicing it outside
would copy it). The mixed-batch kernel is `ragged_paged_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention_reference import dense_paged_attention
from kernels.attention_tiles import empty_state, online_softmax_step, page_scores
from kernels.attention_xla import context_paged_attention
from kernels.common import (
    NULL_PAGE,
    check_impl,
    check_int32,
    check_pool,
    check_soft_cap,
    check_triton_offsets,
    check_window,
    compiler_params,
    resolve_interpret,
)
from kernels.kv_quant import cast_page, split_pool

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
]

_MIN_PROGRAMS = 264  # two waves of an H100's 132 SMs


def _needed_chunks(kv_len, tokens_per_block, pages_per_chunk, window, sink_tokens):
    """What a decode query at `kv_len - 1` reads, in chunks of pages: (number of chunks, the
    table chunk of each, whether a page index is read). Without a window, every chunk up to
    the context's end; with one, the sinks' chunks, then those from the window's first page
    (pages between them are stale: never read, perhaps released)."""
    num_pages = pl.cdiv(kv_len, tokens_per_block)
    if window is None:
        return pl.cdiv(num_pages, pages_per_chunk), lambda v: v, lambda page: page < num_pages
    num_sink_pages = jnp.minimum(pl.cdiv(sink_tokens, tokens_per_block), num_pages)
    window_start = jnp.maximum(kv_len - window, 0)  # the query at kv_len - 1 sees from here
    first_page = jnp.maximum(window_start // tokens_per_block, num_sink_pages)
    num_sink_chunks = pl.cdiv(num_sink_pages, pages_per_chunk)
    first_chunk = jnp.maximum(first_page // pages_per_chunk, num_sink_chunks)
    count = num_sink_chunks + jnp.maximum(pl.cdiv(num_pages, pages_per_chunk) - first_chunk, 0)

    def chunk_of(v):
        return jnp.where(v < num_sink_chunks, v, first_chunk + v - num_sink_chunks)

    def is_read(page):
        return (page < num_pages) & ((page < num_sink_pages) | (page >= first_page))

    return count, chunk_of, is_read


def _decode_kernel(
    page_table_ref, kv_lens_ref, q_ref, keys_ref, values_ref, *refs, sm_scale, soft_cap,
    pages_per_chunk, chunks_per_split, window, sink_tokens, fp8,
):  # fmt: skip
    # page_table_ref: int32[batch, splits * chunks_per_split * pages_per_chunk] (NULL_PAGE padded)
    # kv_lens_ref: int32[batch]; q_ref: [rows, head_dim] query heads of one KV group (zero rows
    # pad it); keys_ref, values_ref: [pages, tokens_per_block, head_dim] of this layer and KV head
    # (fp8 bits as uint8 when `fp8` names the format: then refs start with their scales,
    # [pages, tokens_per_block] each)
    # out_ref: f32[rows, head_dim]; max_ref, sum_ref: f32[rows] (this split's partials)
    k_scales_ref, v_scales_ref = refs[:2] if fp8 else (None, None)
    out_ref, max_ref, sum_ref = refs[-3:]
    seq, split = pl.program_id(0), pl.program_id(2)
    tokens_per_block, head_dim = keys_ref.shape[1], keys_ref.shape[2]
    chunk_tokens = pages_per_chunk * tokens_per_block
    kv_len = kv_lens_ref[seq]
    count, chunk_of, is_read = _needed_chunks(
        kv_len, tokens_per_block, pages_per_chunk, window, sink_tokens
    )
    first = split * chunks_per_split
    end = jnp.minimum(first + chunks_per_split, count)
    q = q_ref[...]

    def fold_chunk(step, state):
        chunk = chunk_of(step)
        page_index = chunk * pages_per_chunk + jnp.arange(pages_per_chunk)
        pages = page_table_ref[seq, pl.ds(chunk * pages_per_chunk, pages_per_chunk)]
        pages = jnp.where(is_read(page_index), pages, NULL_PAGE)  # never a stale id
        keys, values = (
            cast_page(ref[pages].reshape(chunk_tokens, head_dim), fp8, q.dtype)
            for ref in (keys_ref, values_ref)
        )
        k_scale = v_scale = None
        if fp8:  # the rows' scales go on scores and weights
            k_scale, v_scale = (
                ref[pages].reshape(chunk_tokens).astype(jnp.float32)
                for ref in (k_scales_ref, v_scales_ref)
            )
        key_positions = chunk * chunk_tokens + jnp.arange(chunk_tokens)
        visible = (key_positions < kv_len) & is_read(key_positions // tokens_per_block)
        if window is not None:  # the query at kv_len - 1: its window, or a sink
            visible &= (key_positions >= kv_len - window) | (key_positions < sink_tokens)
        scores = page_scores(q, keys, sm_scale=sm_scale, soft_cap=soft_cap, k_scale=k_scale)
        return online_softmax_step(state, scores, visible[None, :], values, visible, v_scale)

    state = jax.lax.fori_loop(first, jnp.maximum(first, end), fold_chunk, empty_state(*q_ref.shape))
    max_ref[...], sum_ref[...], out_ref[...] = state


def _max_chunks_read(tokens_per_block, pages_per_chunk, window, sink_tokens) -> int:
    """A static bound on the chunks `_needed_chunks` yields (the splits share them)."""
    if window is None:
        return 2**31 - 1
    sink_chunks = pl.cdiv(pl.cdiv(sink_tokens, tokens_per_block), pages_per_chunk)
    window_pages = pl.cdiv(window - 1, tokens_per_block) + 1
    return sink_chunks + pl.cdiv(window_pages, pages_per_chunk) + 1


def _num_splits(batch: int, num_kv_heads: int, num_chunks: int) -> int:
    """Enough splits for two waves of programs, never more than chunks of pages."""
    wanted = pl.cdiv(_MIN_PROGRAMS, batch * num_kv_heads)
    return max(1, min(pl.next_power_of_2(wanted), num_chunks))


def _check(q, kv_pool, page_table, kv_lens, layer):
    _, _, _, num_kv_heads, _, head_dim = check_pool(kv_pool, layer=layer)
    check_int32("page_table", page_table, 2)
    check_int32("kv_lens", kv_lens, 1)
    if q.ndim != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q {list(q.shape)} must be [batch, q_heads, {head_dim}] with q_heads a multiple of "
            f"kv_heads={num_kv_heads}"
        )
    if page_table.shape[0] != q.shape[0] or kv_lens.shape[0] != q.shape[0]:
        raise ValueError(
            f"page_table {list(page_table.shape)} and kv_lens {list(kv_lens.shape)} need "
            f"{q.shape[0]} rows, one per query"
        )


def _merge_splits(out, running_max, running_sum):
    """out f32[..., splits, group, head_dim], max and sum f32[..., splits, group] -> [..., group,
    head_dim]: rescale every split to the common max, add, normalize (0 where no key)."""
    common = jnp.max(running_max, axis=-2, keepdims=True)
    scale = jnp.exp(running_max - common)
    total = jnp.sum(running_sum * scale, axis=-2)
    merged = jnp.sum(out * scale[..., None], axis=-3)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "layer",
        "sm_scale",
        "soft_cap",
        "num_splits",
        "pages_per_chunk",
        "num_warps",
        "num_stages",
        "impl",
        "interpret",
        "window",
        "sink_tokens",
    ),
)
def paged_decode_attention(
    q, kv_pool, page_table, kv_lens, *, layer, sm_scale, soft_cap=None, num_splits=None,
    pages_per_chunk=None, num_warps=4, num_stages=3, impl="pallas", interpret=None,
    window=None, sink_tokens=0,
):  # fmt: skip
    """Attention of one new query token per sequence over its paged context.

    Args:
        q: [batch, q_heads, head_dim]; q_heads a multiple of kv_heads (GQA).
        kv_pool: [pages, layers, 2, kv_heads, tokens_per_block, head_dim], same dtype as q, or a
            `kv_quant.QuantizedPool` (fp8 pages and their scales, dequantized as they are read;
            q of a float dtype).
        page_table: int32[batch, max_blocks]; row b holds the pages of sequence b.
        kv_lens: int32[batch]; keys of sequence b (the new token's included); 0 for padding rows,
            which give zeros.
        layer, sm_scale, soft_cap: static; soft_cap caps logits with `cap * tanh(x / cap)`.
        num_splits: static page splits per sequence (default: enough for two waves of programs).
        pages_per_chunk: static pages gathered per loop step (default up to 8: 128 keys of 16).
        window, sink_tokens: static; the query sees its last `window` positions and the first
            `sink_tokens` keys (None: all); only their pages are read, so a decode step costs
            O(window + sinks) whatever the context.

    Returns:
        [batch, q_heads, head_dim] in q's dtype.
    """
    _check(q, kv_pool, page_table, kv_lens, layer)
    check_soft_cap(soft_cap)
    check_window(window, sink_tokens)
    if check_impl(impl) == "xla":  # the new token is the last key
        return context_paged_attention(
            q, kv_pool, page_table, kv_lens, kv_lens - 1, layer=layer, sm_scale=sm_scale,
            soft_cap=soft_cap, window=window, sink_tokens=sink_tokens,
        )  # fmt: skip
    check_triton_offsets(kv_pool)
    batch, num_q_heads, head_dim = q.shape
    num_pages, _, _, num_kv_heads, tokens_per_block, _ = kv_pool.shape
    values, scales = split_pool(kv_pool)
    max_blocks = page_table.shape[1]
    group = num_q_heads // num_kv_heads
    # The dot needs 16 rows: a smaller group is padded with zero rows. Decode is bound by
    # reading K/V, so the idle tensor-core rows cost nothing, while the alternative
    # (broadcast-multiply on CUDA cores, one page at a time) measured 2-5x slower on an H200.
    rows = max(pl.next_power_of_2(group), 16)
    pages_per_chunk = pages_per_chunk or max(1, min(8, pl.next_power_of_2(max_blocks)))
    chunks = pl.cdiv(max_blocks, pages_per_chunk)
    read = min(chunks, _max_chunks_read(tokens_per_block, pages_per_chunk, window, sink_tokens))
    splits = min(num_splits or _num_splits(batch, num_kv_heads, read), read)
    chunks_per_split = pl.cdiv(read, splits)
    columns = max(splits * chunks_per_split, chunks) * pages_per_chunk
    table = jnp.pad(page_table, ((0, 0), (0, columns - max_blocks)))  # NULL_PAGE columns
    grouped = q.reshape(batch, num_kv_heads, group, head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    partial_shape = (batch, num_kv_heads, splits, rows)

    def kv_view(kind, row=(head_dim,)):  # one layer and KV head of K or V, not copied
        return pl.BlockSpec(
            (num_pages, None, None, None, tokens_per_block, *row),
            lambda b, h, s: (0, layer, kind, h, 0, *[0] * len(row)),
        )

    scale_views, scale_arrays = [], []
    if scales is not None:
        scale_views, scale_arrays = [kv_view(0, ()), kv_view(1, ())], [scales, scales]

    out, running_max, running_sum = pl.pallas_call(
        functools.partial(
            _decode_kernel,
            sm_scale=sm_scale,
            soft_cap=soft_cap,
            pages_per_chunk=pages_per_chunk,
            chunks_per_split=chunks_per_split,
            window=window,
            sink_tokens=sink_tokens,
            fp8=None if scales is None else kv_pool.format,
        ),
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            kv_view(0),
            kv_view(1),
            *scale_views,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=resolve_interpret(interpret),
    )(table, kv_lens, grouped, values, values, *scale_arrays)
    merged = _merge_splits(out, running_max, running_sum)[:, :, :group]
    return merged.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def paged_decode_attention_reference(
    q, kv_pool, page_table, kv_lens, *, layer, sm_scale, soft_cap=None, window=None,
    sink_tokens=0,
):  # fmt: skip
    """Dense jnp attention over every gathered page, float32 inside."""
    # The new token is the last key.
    return dense_paged_attention(
        q, kv_pool, page_table, kv_lens, kv_lens - 1, layer=layer, sm_scale=sm_scale,
        soft_cap=soft_cap, window=window, sink_tokens=sink_tokens,
    )  # fmt: skip
