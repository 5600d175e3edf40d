"""Writes the new K and V of a step's tokens into their slots of the pool, in place.

A slot is `page_id * tokens_per_block + offset`. Padding tokens carry slots inside `NULL_PAGE`, the
scratch page nobody reads, so a padded batch needs no mask; slots outside the pool (-1 included)
are sent there too. The Pallas kernel writes one token's
`[head_dim]` row of K and of V per program, grid `(tokens, kv_heads)`; the XLA scatter is the
reference and fallback. Into a `QuantizedPool` each row is quantized on the way in
(`kv_quant.quantize`: its own scale, round to nearest, saturating) and its scale stored beside
it, so a write never reads the page it writes.
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
    resolve_interpret,
)
from kernels.kv_quant import byte_view, is_quantized, quantize, split_pool

__all__ = ["write_kv", "write_kv_reference", "write_kv_rows_reference"]


def _slot_place(slot, num_pages: int, tokens_per_block: int):
    """(page, offset) of a slot; a slot outside the pool (vLLM pads with -1) goes to the null
    page, never past the buffer."""
    in_pool = (slot >= 0) & (slot < num_pages * tokens_per_block)
    slot = jnp.where(in_pool, slot, NULL_PAGE * tokens_per_block)
    return slot // tokens_per_block, slot % tokens_per_block


def _write_kernel(slots_ref, k_ref, v_ref, pool_ref, out_ref, *, layer: int):
    # slots_ref: int32[tokens]; k_ref, v_ref: this token's [head_dim] row of one KV head
    # pool_ref, out_ref: the pool [pages, layers, 2, kv_heads, tokens_per_block, head_dim] (aliased)
    del pool_ref  # the output aliases it: rows not written keep their bytes
    token, head = pl.program_id(0), pl.program_id(1)
    page, offset = _slot_place(slots_ref[token], out_ref.shape[0], out_ref.shape[4])
    out_ref[page, layer, 0, head, offset] = k_ref[...]
    out_ref[page, layer, 1, head, offset] = v_ref[...]


def _quantized_write_kernel(
    slots_ref, k_ref, v_ref, values_ref, scales_ref, values_out, scales_out, *, layer: int, fp8
):
    # As `_write_kernel`, into fp8 values (their uint8 bits, aliased) and their bfloat16 scales
    # scales[pages, layers, 2, kv_heads, tokens_per_block] (aliased).
    del values_ref, scales_ref
    token, head = pl.program_id(0), pl.program_id(1)
    page, offset = _slot_place(slots_ref[token], values_out.shape[0], values_out.shape[4])
    for kind, row in ((0, k_ref[...]), (1, v_ref[...])):
        values, scale = quantize(row, fp8)
        values_out[page, layer, kind, head, offset] = byte_view(values)
        scales_out[page, layer, kind, head, offset] = scale


def _check(kv_pool, k, v, slots, layer):
    _, _, _, num_kv_heads, _, head_dim = check_pool(kv_pool, layer=layer)
    check_int32("slots", slots, 1)
    expected = (slots.shape[0], num_kv_heads, head_dim)
    for name, new in (("k", k), ("v", v)):
        # A quantized pool takes rows of any float dtype and quantizes them.
        wrong_dtype = not jnp.issubdtype(new.dtype, jnp.floating) or (
            new.dtype != kv_pool.dtype and not is_quantized(kv_pool)
        )
        if new.shape != expected or wrong_dtype:
            want = "a float dtype " if is_quantized(kv_pool) else str(kv_pool.dtype)
            raise ValueError(
                f"{name} {new.dtype}{list(new.shape)} must be {want}{list(expected)} "
                f"(tokens, kv_heads, head_dim) for pool {list(kv_pool.shape)}"
            )


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("layer", "impl", "interpret"))
def write_kv(kv_pool, k, v, slots, *, layer, impl="pallas", interpret=None):
    """Stores `k[t]` and `v[t]` of layer `layer` at slot `slots[t]` for every token t.

    Args:
        kv_pool: dtype[pages, layers, 2, kv_heads, tokens_per_block, head_dim] or a
            `QuantizedPool` of them, donated.
        k, v: [tokens, kv_heads, head_dim], of the pool's dtype (any float dtype for a
            `QuantizedPool`: rows are quantized).
        slots: int32[tokens]; distinct except inside `NULL_PAGE` (padding).
        layer: static layer index.

    Returns:
        The updated pool.
    """
    _check(kv_pool, k, v, slots, layer)
    if check_impl(impl) == "xla":
        return write_kv_reference(kv_pool, k, v, slots, layer=layer)
    check_triton_offsets(kv_pool)
    num_tokens, num_kv_heads, head_dim = k.shape
    row = pl.BlockSpec((None, None, head_dim), lambda t, h: (t, h, 0))
    arrays = [a for a in split_pool(kv_pool) if a is not None]
    if is_quantized(kv_pool):
        kernel = functools.partial(_quantized_write_kernel, layer=layer, fp8=kv_pool.dtype)
    else:
        kernel = functools.partial(_write_kernel, layer=layer)
    written = pl.pallas_call(
        kernel,
        grid=(num_tokens, num_kv_heads),
        in_specs=[pl.no_block_spec, row, row, *[pl.no_block_spec] * len(arrays)],
        out_specs=[pl.no_block_spec] * len(arrays),
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
        input_output_aliases={3 + i: i for i in range(len(arrays))},
        compiler_params=compiler_params(num_warps=1, num_stages=1),
        interpret=resolve_interpret(interpret),
    )(slots, k, v, *arrays)
    if is_quantized(kv_pool):
        return dataclasses.replace(kv_pool, values=written[0], scales=written[1])
    return written[0]


def _scatter_rows(pool, pages, offsets, k, v, at):
    """Writes k and v (quantized into a `QuantizedPool`) at `at(array, kind)`'s indices."""
    values, scales = split_pool(pool)
    if scales is None:
        for kind, new in ((0, k), (1, v)):
            values = at(values, kind).set(new)
        return values
    row_scales = []
    for kind, new in ((0, k), (1, v)):
        quantized, kind_scales = quantize(new, pool.dtype)
        values = at(values, kind).set(byte_view(quantized))
        row_scales.append(kind_scales)
    # K's and V's scales in one update: two would make XLA on the CPU copy the scales.
    scales = at(scales, slice(None)).set(jnp.stack(row_scales, axis=1))  # [tokens, 2, heads]
    return dataclasses.replace(pool, values=values, scales=scales)


def write_kv_reference(kv_pool, k, v, slots, *, layer):
    """XLA scatter of the same writes (`impl="xla"`)."""
    pages, offsets = _slot_place(slots, kv_pool.shape[0], kv_pool.shape[4])
    # Advanced indices on axes 0 and 4 put the token axis first: [tokens, kv_heads, head_dim].
    return _scatter_rows(
        kv_pool, pages, offsets, k, v, lambda a, kind: a.at[pages, layer, kind, :, offsets]
    )


def write_kv_rows_reference(rows, k, v, slots):
    """`write_kv_reference` on a pool of one layer held without its layer axis.

    Args:
        rows: [pages, 2, kv_heads, tokens_per_block, head_dim] (or a `QuantizedPool` of
            them), donated.
        k, v: [tokens, kv_heads, head_dim]; slots: int32[tokens], as `write_kv`'s.

    Writing through a unit layer axis (`rows[:, None]`) makes XLA on the CPU copy the whole
    pool around each single-token write; on the rows themselves the update stays in place.
    """
    _check(rows[:, None], k, v, slots, 0)
    pages, offsets = _slot_place(slots, rows.shape[0], rows.shape[3])
    return _scatter_rows(rows, pages, offsets, k, v, lambda a, kind: a.at[pages, kind, :, offsets])
