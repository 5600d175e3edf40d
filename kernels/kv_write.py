"""Writes the new K and V of a step's tokens into their slots of the pool, in place.

A slot is `page_id * tokens_per_block + offset`. Padding tokens carry slots inside `NULL_PAGE`, the
scratch page nobody reads, so a padded batch needs no mask; slots outside the pool (-1 included)
are sent there too. The Pallas kernel writes one token's
`[head_dim]` row of K and of V per program, grid `(tokens, kv_heads)`; the XLA scatter is the
reference and fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.common import (
    NULL_PAGE,
    check_impl,
    check_int32,
    check_pool,
    compiler_params,
    resolve_interpret,
)

__all__ = ["write_kv", "write_kv_reference", "write_kv_rows_reference"]


def _write_kernel(slots_ref, k_ref, v_ref, pool_ref, out_ref, *, layer: int):
    # slots_ref: int32[tokens]; k_ref, v_ref: this token's [head_dim] row of one KV head
    # pool_ref, out_ref: the pool [pages, layers, 2, kv_heads, tokens_per_block, head_dim] (aliased)
    del pool_ref  # the output aliases it: rows not written keep their bytes
    token, head = pl.program_id(0), pl.program_id(1)
    tokens_per_block = out_ref.shape[4]
    slot = slots_ref[token]
    # A slot outside the pool (vLLM pads with -1) goes to the null page, never past the buffer.
    in_pool = (slot >= 0) & (slot < out_ref.shape[0] * tokens_per_block)
    slot = jnp.where(in_pool, slot, NULL_PAGE * tokens_per_block)
    page, offset = slot // tokens_per_block, slot % tokens_per_block
    out_ref[page, layer, 0, head, offset] = k_ref[...]
    out_ref[page, layer, 1, head, offset] = v_ref[...]


def _check(kv_pool, k, v, slots, layer):
    _, _, _, num_kv_heads, _, head_dim = check_pool(kv_pool, layer=layer)
    check_int32("slots", slots, 1)
    expected = (slots.shape[0], num_kv_heads, head_dim)
    for name, new in (("k", k), ("v", v)):
        if new.shape != expected or new.dtype != kv_pool.dtype:
            raise ValueError(
                f"{name} {new.dtype}{list(new.shape)} must be {kv_pool.dtype}{list(expected)} "
                f"(tokens, kv_heads, head_dim) for pool {list(kv_pool.shape)}"
            )


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("layer", "impl", "interpret"))
def write_kv(kv_pool, k, v, slots, *, layer, impl="pallas", interpret=None):
    """Stores `k[t]` and `v[t]` of layer `layer` at slot `slots[t]` for every token t.

    Args:
        kv_pool: dtype[pages, layers, 2, kv_heads, tokens_per_block, head_dim], donated.
        k, v: dtype[tokens, kv_heads, head_dim].
        slots: int32[tokens]; distinct except inside `NULL_PAGE` (padding).
        layer: static layer index.

    Returns:
        The updated pool.
    """
    _check(kv_pool, k, v, slots, layer)
    if check_impl(impl) == "xla":
        return write_kv_reference(kv_pool, k, v, slots, layer=layer)
    num_tokens, num_kv_heads, head_dim = k.shape
    row = pl.BlockSpec((None, None, head_dim), lambda t, h: (t, h, 0))
    return pl.pallas_call(
        functools.partial(_write_kernel, layer=layer),
        grid=(num_tokens, num_kv_heads),
        in_specs=[pl.no_block_spec, row, row, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        input_output_aliases={3: 0},
        compiler_params=compiler_params(num_warps=1, num_stages=1),
        interpret=resolve_interpret(interpret),
    )(slots, k, v, kv_pool)


def write_kv_reference(kv_pool, k, v, slots, *, layer):
    """XLA scatter of the same writes (`impl="xla"`)."""
    tokens_per_block = kv_pool.shape[4]
    in_pool = (slots >= 0) & (slots < kv_pool.shape[0] * tokens_per_block)
    slots = jnp.where(in_pool, slots, NULL_PAGE * tokens_per_block)
    pages, offsets = slots // tokens_per_block, slots % tokens_per_block
    # Advanced indices on axes 0 and 4 put the token axis first: [tokens, kv_heads, head_dim].
    kv_pool = kv_pool.at[pages, layer, 0, :, offsets].set(k)
    return kv_pool.at[pages, layer, 1, :, offsets].set(v)


def write_kv_rows_reference(rows, k, v, slots):
    """`write_kv_reference` on a pool of one layer held without its layer axis.

    Args:
        rows: dtype[pages, 2, kv_heads, tokens_per_block, head_dim], donated.
        k, v: dtype[tokens, kv_heads, head_dim]; slots: int32[tokens], as `write_kv`'s.

    Writing through a unit layer axis (`rows[:, None]`) makes XLA on the CPU copy the whole
    pool around each single-token write; on the rows themselves the update stays in place.
    """
    _check(rows[:, None], k, v, slots, 0)
    tokens_per_block = rows.shape[3]
    in_pool = (slots >= 0) & (slots < rows.shape[0] * tokens_per_block)
    slots = jnp.where(in_pool, slots, NULL_PAGE * tokens_per_block)
    pages, offsets = slots // tokens_per_block, slots % tokens_per_block
    rows = rows.at[pages, 0, :, offsets].set(k)
    return rows.at[pages, 1, :, offsets].set(v)
