"""Page copies inside the pool and between the pool and a staging array.

`copy_pages` (copy-on-write, defragmentation), `gather_pages` (offload: pool -> staging, then one
transfer to the host) and `scatter_pages` (onload: staging -> pool). Page counts are padded to
buckets by the caller; `num_valid` is a device scalar, so a varying count never recompiles. The
Pallas kernels move one `[tokens_per_block, head_dim]` tile per program, grid `(bucket, layers * 2 *
kv_heads)`, and update the pool in place (aliased); the XLA path is the reference and fallback.
Preconditions of a batch: destinations distinct, and no page both read and written.
A `kv_quant.QuantizedPool` moves its scales with its values: the same page ids, the values by
`impl`, the scales (1/32 of the bytes or less) by the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.common import (
    NULL_PAGE,
    check_impl,
    check_int32,
    check_pool,
    check_triton_offsets,
    compiler_params,
    num_valid_array,
    resolve_interpret,
)
from kernels.kv_quant import is_quantized, split_pool

__all__ = [
    "copy_pages",
    "copy_pages_reference",
    "gather_pages",
    "gather_pages_reference",
    "scatter_pages",
    "scatter_pages_reference",
]


def _tile_index(chunk, num_kv_heads: int):
    """(layer, kv, head) of tile `chunk` of a page: chunks run over `[layers, 2, kv_heads]`."""
    layer = chunk // (2 * num_kv_heads)
    kv = (chunk // num_kv_heads) % 2
    return layer, kv, chunk % num_kv_heads


def _copy_kernel(num_valid_ref, src_ref, dst_ref, pool_ref, out_ref):
    # num_valid_ref: int32[1]; src_ref, dst_ref: int32[bucket]
    # pool_ref, out_ref: the same pool [pages, layers, 2, kv_heads, tokens, head_dim] (aliased)
    i = pl.program_id(0)
    layer, kv, head = _tile_index(pl.program_id(1), pool_ref.shape[3])  # outside the branch

    @pl.when(i < num_valid_ref[0])
    def _():
        out_ref[dst_ref[i], layer, kv, head] = pool_ref[src_ref[i], layer, kv, head]


def _gather_kernel(num_valid_ref, ids_ref, pool_ref, staging_ref):
    # staging_ref: one [tokens, head_dim] tile of staging[bucket, layers, 2, kv_heads, ...]
    i = pl.program_id(0)
    layer, kv, head = _tile_index(pl.program_id(1), pool_ref.shape[3])  # outside the branch

    @pl.when(i < num_valid_ref[0])
    def _():
        staging_ref[...] = pool_ref[ids_ref[i], layer, kv, head]


def _scatter_kernel(num_valid_ref, ids_ref, staging_ref, pool_ref, out_ref):
    # staging_ref: one [tokens, head_dim] tile; pool_ref, out_ref: the pool (aliased)
    i = pl.program_id(0)
    layer, kv, head = _tile_index(pl.program_id(1), pool_ref.shape[3])  # outside the branch

    @pl.when(i < num_valid_ref[0])
    def _():
        out_ref[ids_ref[i], layer, kv, head] = staging_ref[...]


def _tile_spec(kv_pool: jax.Array) -> pl.BlockSpec:
    """A `[tokens, head_dim]` tile of a `[bucket, layers, 2, kv_heads, tokens, head_dim]` array."""
    _, _, _, num_kv_heads, tokens_per_block, head_dim = kv_pool.shape
    return pl.BlockSpec(
        (None, None, None, None, tokens_per_block, head_dim),
        lambda i, c: (i, *_tile_index(c, num_kv_heads), 0, 0),
    )


def _call(
    kernel, kv_pool, bucket, operands, *, out_shape, out_specs, aliases, interpret, in_specs=None
):
    """One program per (page entry, tile of a page); whole arrays unless `in_specs` says."""
    check_triton_offsets(kv_pool)
    grid = (bucket, kv_pool.shape[1] * 2 * kv_pool.shape[3])
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs or [pl.no_block_spec] * len(operands),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params(num_warps=4, num_stages=1),
        interpret=resolve_interpret(interpret),
    )(*operands)


def _per_part(kv_pool, move_values, move_scales):
    """`move_values` on the pool (a plain one), or on a `QuantizedPool`'s values and
    `move_scales` on its scales (the same pages)."""
    if not is_quantized(kv_pool):
        return move_values(kv_pool)
    return dataclasses.replace(
        kv_pool, values=move_values(kv_pool.values), scales=move_scales(kv_pool.scales)
    )


def _check_ids(kv_pool, *ids):
    check_pool(kv_pool)
    for name, array in zip(("page ids", "dst"), ids, strict=False):
        check_int32(name, array, 1)
    if any(array.shape != ids[0].shape for array in ids):
        raise ValueError(f"src {list(ids[0].shape)} and dst {list(ids[1].shape)} differ in length")


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("impl", "interpret"))
def copy_pages(kv_pool, src, dst, num_valid, *, impl="pallas", interpret=None):
    """Copies page `src[i]` to page `dst[i]` for `i < num_valid`, in place.

    Args:
        kv_pool: dtype[pages, layers, 2, kv_heads, tokens, head_dim] (or a `QuantizedPool`),
            donated; returned updated.
        src, dst: int32[bucket]; `dst[:num_valid]` distinct and disjoint from `src[:num_valid]`.
        num_valid: int32 scalar (or int32[1]): live entries; the rest are ignored.
    """
    _check_ids(kv_pool, src, dst)
    num_valid = num_valid_array(num_valid)
    return _per_part(
        kv_pool,
        lambda values: _copy_values(values, src, dst, num_valid, impl, interpret),
        lambda scales: copy_pages_reference(scales, src, dst, num_valid),
    )


def _copy_values(kv_pool, src, dst, num_valid, impl, interpret):
    if check_impl(impl) == "xla":
        return copy_pages_reference(kv_pool, src, dst, num_valid)
    return _call(
        _copy_kernel,
        kv_pool,
        src.shape[0],
        (num_valid, src, dst, kv_pool),
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        out_specs=pl.no_block_spec,
        aliases={3: 0},
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def gather_pages(kv_pool, page_ids, num_valid, *, impl="pallas", interpret=None):
    """Returns staging dtype[bucket, layers, 2, kv_heads, tokens, head_dim] (a `QuantizedPool`
    of a quantized pool): row i is page `page_ids[i]` for `i < num_valid`; later rows are
    junk."""
    _check_ids(kv_pool, page_ids)
    num_valid = num_valid_array(num_valid)
    return _per_part(
        kv_pool,
        lambda values: _gather_values(values, page_ids, num_valid, impl, interpret),
        lambda scales: gather_pages_reference(scales, page_ids, num_valid),
    )


def _gather_values(kv_pool, page_ids, num_valid, impl, interpret):
    if check_impl(impl) == "xla":
        return gather_pages_reference(kv_pool, page_ids, num_valid)
    bucket = page_ids.shape[0]
    return _call(
        _gather_kernel,
        kv_pool,
        bucket,
        (num_valid, page_ids, kv_pool),
        out_shape=jax.ShapeDtypeStruct((bucket, *kv_pool.shape[1:]), kv_pool.dtype),
        out_specs=_tile_spec(kv_pool),
        aliases={},
        interpret=interpret,
    )


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("impl", "interpret"))
def scatter_pages(kv_pool, staging, page_ids, num_valid, *, impl="pallas", interpret=None):
    """Writes `staging[i]` to page `page_ids[i]` for `i < num_valid`, in place.

    Args:
        kv_pool: dtype[pages, layers, 2, kv_heads, tokens, head_dim] (or a `QuantizedPool`),
            donated; returned updated.
        staging: dtype[bucket, layers, 2, kv_heads, tokens, head_dim] (a `QuantizedPool` for a
            quantized pool).
        page_ids: int32[bucket]; `page_ids[:num_valid]` distinct.
        num_valid: int32 scalar (or int32[1]).
    """
    _check_ids(kv_pool, page_ids)
    if (
        staging.shape != (page_ids.shape[0], *kv_pool.shape[1:])
        or staging.dtype != kv_pool.dtype
        or is_quantized(staging) != is_quantized(kv_pool)
    ):
        raise ValueError(
            f"staging {type(staging).__name__} {staging.dtype}{list(staging.shape)} must be "
            f"{type(kv_pool).__name__} {kv_pool.dtype}{[page_ids.shape[0], *kv_pool.shape[1:]]} "
            f"for pool {list(kv_pool.shape)}"
        )
    num_valid = num_valid_array(num_valid)
    values, scales = split_pool(staging)
    return _per_part(
        kv_pool,
        lambda pool: _scatter_values(pool, values, page_ids, num_valid, impl, interpret),
        lambda pool: scatter_pages_reference(pool, scales, page_ids, num_valid),
    )


def _scatter_values(kv_pool, staging, page_ids, num_valid, impl, interpret):
    if check_impl(impl) == "xla":
        return scatter_pages_reference(kv_pool, staging, page_ids, num_valid)
    return _call(
        _scatter_kernel,
        kv_pool,
        page_ids.shape[0],
        (num_valid, page_ids, staging, kv_pool),
        in_specs=[pl.no_block_spec, pl.no_block_spec, _tile_spec(kv_pool), pl.no_block_spec],
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        out_specs=pl.no_block_spec,
        aliases={3: 0},
        interpret=interpret,
    )


# -- XLA references (also the `impl="xla"` path) ----------------------------------------------


def _live_targets(page_ids, num_valid, num_pages):
    """Targets of the live entries; padding entries point past the pool, one distinct index each,
    so `mode="drop"` discards them and the scatter needs no ordering."""
    index = jnp.arange(page_ids.shape[0], dtype=jnp.int32)
    return jnp.where(index < num_valid[0], page_ids, num_pages + index)


def gather_pages_reference(kv_pool, page_ids, num_valid):
    index = jnp.arange(page_ids.shape[0], dtype=jnp.int32)
    return kv_pool[jnp.where(index < num_valid[0], page_ids, NULL_PAGE)]


def scatter_pages_reference(kv_pool, staging, page_ids, num_valid):
    targets = _live_targets(page_ids, num_valid, kv_pool.shape[0])
    return kv_pool.at[targets].set(staging, mode="drop", unique_indices=True)


def copy_pages_reference(kv_pool, src, dst, num_valid):
    pages = gather_pages_reference(kv_pool, src, num_valid)  # every source read first
    return scatter_pages_reference(kv_pool, pages, dst, num_valid)
