"""Ragged paged attention: one call for a mixed batch of decode rows, prefill chunks over a cached
prefix, and verification rows of speculative decoding (q_len = 1 + draft).

Queries of all sequences are concatenated: sequence s owns rows `cu_q_lens[s]:cu_q_lens[s + 1]`,
and its row r sits at position `kv_len - q_len + r`, so it sees keys up to there (causal). Grid
`(tokens // tile_q + seqs, kv_heads)` is static: sequence s starts a fresh tile of `tile_q`
rows at program `cu_q_lens[s] // tile_q + s`, each program binary-searches its sequence, and
programs without rows exit at once (the design of vLLM's Triton unified attention). Rows of a
program are `tile_q` positions times the query heads of one KV group. Outputs are stored under a
row mask, so a program never writes rows of another sequence; rows past `cu_q_lens[num_seqs]` are
left unwritten (unspecified).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels.attention_reference import dense_paged_attention
from kernels.attention_tiles import empty_state, finish, online_softmax_step, page_scores
from kernels.attention_xla import context_paged_attention
from kernels.common import (
    check_impl,
    check_int32,
    check_pool,
    check_soft_cap,
    check_triton_offsets,
    check_window,
    compiler_params,
    in_window,
    resolve_interpret,
)
from kernels.kv_quant import cast_page, split_pool

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]


def _ragged_kernel(
    cu_q_lens_ref, kv_lens_ref, num_seqs_ref, page_table_ref, q_ref, pool_ref, *refs, layer,
    sm_scale, soft_cap, tile_q, group, search_steps, window, sink_tokens, fp8,
):  # fmt: skip
    # cu_q_lens_ref: int32[seqs + 1]; kv_lens_ref: int32[seqs]; num_seqs_ref: int32[1]
    # page_table_ref: int32[seqs, max_blocks]; q_ref, out_ref: [tokens, q_heads, head_dim]
    # pool_ref: the whole pool [pages, layers, 2, kv_heads, tokens_per_block, head_dim]; fp8
    # pages (their uint8 bits, `fp8` the format) come with scales_ref [pages, layers, 2,
    # kv_heads, tokens_per_block] (refs[0])
    scales_ref = refs[0] if len(refs) == 2 else None
    out_ref = refs[-1]
    program, head = pl.program_id(0), pl.program_id(1)
    num_seqs = jnp.minimum(num_seqs_ref[0], kv_lens_ref.shape[0])  # never read past the arrays
    tokens_per_block, head_dim = pool_ref.shape[4], pool_ref.shape[5]
    group_pad = pl.next_power_of_2(group)

    def search(_, bounds):  # the last sequence whose first program is at or before this one
        low, high = bounds
        middle = (low + high) // 2
        right = cu_q_lens_ref[middle] // tile_q + middle <= program
        return jnp.where(right, middle, low), jnp.where(right, high, middle)

    seq, _ = jax.lax.fori_loop(0, search_steps, search, (0, jnp.maximum(num_seqs, 1)))
    q_start = cu_q_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - q_start
    first_row = (program - (q_start // tile_q + seq)) * tile_q

    @pl.when((num_seqs > 0) & (first_row >= 0) & (first_row < q_len))
    def _():
        kv_len = kv_lens_ref[seq]
        rows = jnp.arange(tile_q * group_pad)
        positions = kv_len - q_len + first_row + rows // group_pad  # position of each row
        token_ok = first_row + jnp.arange(tile_q) < q_len
        head_ok = jnp.arange(group_pad) < group
        mask = (token_ok[:, None] & head_ok[None, :])[:, :, None]
        mask = jnp.broadcast_to(mask, (tile_q, group_pad, head_dim))
        tile = (pl.ds(q_start + first_row, tile_q), pl.ds(head * group, group_pad))
        q = pl_triton.load(q_ref.at[tile[0], tile[1], :], mask=mask, other=0)
        q = q.reshape(tile_q * group_pad, head_dim)
        last_position = kv_len - q_len + jnp.minimum(first_row + tile_q, q_len) - 1

        def fold_page(block, state):
            page = page_table_ref[seq, block]
            keys, values = (
                cast_page(pool_ref[page, layer, kind, head], fp8, q.dtype) for kind in (0, 1)
            )
            k_scale = v_scale = None
            if scales_ref is not None:
                k_scale, v_scale = (
                    scales_ref[page, layer, kind, head].astype(jnp.float32) for kind in (0, 1)
                )
            key_positions = block * tokens_per_block + jnp.arange(tokens_per_block)
            valid = key_positions < kv_len
            visible = valid[None, :] & in_window(key_positions, positions, window, sink_tokens)
            scores = page_scores(q, keys, sm_scale=sm_scale, soft_cap=soft_cap, k_scale=k_scale)
            return online_softmax_step(state, scores, visible, values, valid, v_scale)

        num_pages = jnp.minimum(last_position // tokens_per_block + 1, page_table_ref.shape[1])
        state = empty_state(*q.shape)
        start = 0
        if window is not None:  # the sinks' pages, then the window's: stale pages are skipped
            num_sink_pages = jnp.minimum(-(-sink_tokens // tokens_per_block), num_pages)
            state = jax.lax.fori_loop(0, num_sink_pages, fold_page, state)
            first_position = kv_len - q_len + first_row
            start = jnp.maximum((first_position - window + 1) // tokens_per_block, num_sink_pages)
        state = jax.lax.fori_loop(start, num_pages, fold_page, state)
        out = finish(state).reshape(tile_q, group_pad, head_dim).astype(out_ref.dtype)
        pl_triton.store(out_ref.at[tile[0], tile[1], :], out, mask=mask)


def _check(q, kv_pool, page_table, kv_lens, cu_q_lens, num_seqs, layer):
    _, _, _, num_kv_heads, _, head_dim = check_pool(kv_pool, layer=layer)
    for name, array, ndim in (
        ("page_table", page_table, 2),
        ("kv_lens", kv_lens, 1),
        ("cu_q_lens", cu_q_lens, 1),
        ("num_seqs", num_seqs, 1),
    ):
        check_int32(name, array, ndim)
    if q.ndim != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q {list(q.shape)} must be [tokens, q_heads, {head_dim}] with q_heads a multiple "
            f"of kv_heads={num_kv_heads}"
        )
    seqs = page_table.shape[0]
    if kv_lens.shape != (seqs,) or cu_q_lens.shape != (seqs + 1,) or num_seqs.shape != (1,):
        raise ValueError(
            f"kv_lens {list(kv_lens.shape)}, cu_q_lens {list(cu_q_lens.shape)} and num_seqs "
            f"{list(num_seqs.shape)} must be [{seqs}], [{seqs + 1}] and [1] for page_table "
            f"{list(page_table.shape)}"
        )


@functools.partial(
    jax.jit,
    static_argnames=(
        "layer", "sm_scale", "soft_cap", "tile_q", "impl", "interpret", "window", "sink_tokens"
    ),
)  # fmt: skip
def ragged_paged_attention(
    q, kv_pool, page_table, kv_lens, cu_q_lens, num_seqs, *, layer, sm_scale, soft_cap=None,
    tile_q=None, impl="pallas", interpret=None, window=None, sink_tokens=0,
):  # fmt: skip
    """Causal attention of a mixed batch of new tokens over their paged contexts.

    Args:
        q: [tokens, q_heads, head_dim], the new tokens of all sequences back to back (padded).
        kv_pool: [pages, layers, 2, kv_heads, tokens_per_block, head_dim], or a
            `kv_quant.QuantizedPool` (fp8, dequantized as read); holds the new tokens' K/V
            already (written by `write_kv`).
        page_table: int32[seqs, max_blocks].
        kv_lens: int32[seqs]; keys of each sequence, its new tokens included (>= its q_len).
        cu_q_lens: int32[seqs + 1]; query rows of sequence s are `cu_q_lens[s]:cu_q_lens[s + 1]`.
        num_seqs: int32[1]; live sequences; metadata past them is never read.
        tile_q: static query positions per program (default: 32 rows of positions x heads).
        window, sink_tokens: static; each query sees its last `window` positions and the first
            `sink_tokens` keys (None: all). Only those pages are read, so the pages of blocks
            stale at the step's history (`kvjax.cache.life_cycles`) may be released.

    Returns:
        [tokens, q_heads, head_dim] in q's dtype; rows past `cu_q_lens[num_seqs]` unspecified.
    """
    _check(q, kv_pool, page_table, kv_lens, cu_q_lens, num_seqs, layer)
    check_soft_cap(soft_cap)
    check_window(window, sink_tokens)
    if check_impl(impl) == "xla":
        return ragged_paged_attention_reference(
            q, kv_pool, page_table, kv_lens, cu_q_lens, num_seqs, layer=layer, sm_scale=sm_scale,
            soft_cap=soft_cap, attend=context_paged_attention, window=window,
            sink_tokens=sink_tokens,
        )  # fmt: skip
    check_triton_offsets(kv_pool)
    num_tokens, num_q_heads, _ = q.shape
    seqs = page_table.shape[0]
    group = num_q_heads // kv_pool.shape[3]
    arrays = [a for a in split_pool(kv_pool) if a is not None]
    tile_q = tile_q or max(1, 32 // pl.next_power_of_2(group))
    if tile_q & (tile_q - 1):
        raise ValueError(f"tile_q={tile_q} must be a power of two")
    return pl.pallas_call(
        functools.partial(
            _ragged_kernel,
            layer=layer,
            sm_scale=sm_scale,
            soft_cap=soft_cap,
            tile_q=tile_q,
            group=group,
            search_steps=max(1, math.ceil(math.log2(seqs))) + 1,
            window=window,
            sink_tokens=sink_tokens,
            fp8=kv_pool.format if len(arrays) == 2 else None,
        ),
        grid=(num_tokens // tile_q + seqs, kv_pool.shape[3]),
        in_specs=[pl.no_block_spec] * (5 + len(arrays)),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(num_warps=4, num_stages=2),
        interpret=resolve_interpret(interpret),
    )(cu_q_lens, kv_lens, num_seqs, page_table, q, *arrays)


def ragged_paged_attention_reference(
    q, kv_pool, page_table, kv_lens, cu_q_lens, num_seqs, *, layer, sm_scale, soft_cap=None,
    attend=dense_paged_attention, window=None, sink_tokens=0,
):  # fmt: skip
    """Dense jnp version over every token, float32 inside: each token finds its sequence,
    gathers that sequence's pages, and attends causally. Rows of no live sequence give zeros.
    `impl="xla"` runs it with `attend=context_paged_attention` (cost follows the context)."""
    num_tokens = q.shape[0]
    seqs = kv_lens.shape[0]
    token = jnp.arange(num_tokens)
    # Ends of the live sequences; metadata past num_seqs may be garbage, so it is masked.
    ends = jnp.where(jnp.arange(seqs) < num_seqs[0], cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    seq = jnp.clip(jnp.searchsorted(ends, token, side="right"), 0, seqs - 1)
    live = token < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = kv_lens[seq] - q_len + token - cu_q_lens[seq]
    return attend(
        q, kv_pool, page_table[seq], jnp.where(live, kv_lens[seq], 0), position, layer=layer,
        sm_scale=sm_scale, soft_cap=soft_cap, window=window, sink_tokens=sink_tokens,
    )  # fmt: skip
