"""Batched page ops on the device pool: `kernels.page_copy`'s copy, gather and scatter for one
implementation (and per shard over a mesh), with page counts padded to power-of-two buckets so
varying counts reuse compiled code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

from kernels.page_copy import copy_pages, gather_pages, scatter_pages
from kvjax.cache.checks import check_int
from kvjax.cache.pages import NULL_PAGE
from kvjax.cache.tier import PageMove
from kvjax.runtime.sharding import pool_spec

__all__ = ["default_impl", "move_batches", "padded_page_ids", "page_bucket", "page_ops"]


def page_bucket(count: int) -> int:
    """Smallest power of two >= max(count, 1): the padded page count of a batched device op."""
    return 1 << max(check_int("count", count, minimum=0) - 1, 0).bit_length()


def default_impl() -> str:
    """The Pallas kernels on a GPU; XLA elsewhere (interpret mode is a test vehicle, not a path)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def padded_page_ids(page_ids: list[int]) -> np.ndarray:
    """int32[page_bucket(n)]: the ids, then NULL_PAGE (masked out by num_valid)."""
    padded = np.full(page_bucket(len(page_ids)), NULL_PAGE, np.int32)
    padded[: len(page_ids)] = page_ids
    return padded


def move_batches(moves: Sequence[PageMove]) -> Iterator[tuple[int, int]]:
    """(start, end) of each batch of `moves`: consecutive moves of one (src_tier, dst_tier)
    kind, cut before a move that reads a page the batch writes or writes a page it reads or
    writes. So no batch reads a page it writes or writes a page twice: its copies may run in
    any order (as a kernel copying page by page would) and still equal running them in order."""
    start, read, written = 0, set(), set()
    for index, move in enumerate(moves):
        src, dst = (move.src_tier, move.src_page), (move.dst_tier, move.dst_page)
        first = moves[start]
        if index > start and (
            (move.src_tier, move.dst_tier) != (first.src_tier, first.dst_tier)
            or src in written
            or dst in read
            or dst in written
        ):
            yield start, index
            start, read, written = index, set(), set()
        read.add(src)
        written.add(dst)
    if moves:
        yield start, len(moves)


def page_ops(impl: str, mesh=None, interpret=None) -> tuple[Callable, Callable, Callable]:
    """`kernels.page_copy`'s (copy, gather, scatter) for `impl`; over a mesh, jitted per shard
    of the KV heads (`shard_map`) with the pool donated to copy and scatter."""
    ops = [
        functools.partial(op, impl=impl, interpret=interpret)
        for op in (copy_pages, gather_pages, scatter_pages)
    ]
    if mesh is None:
        return tuple(ops)
    pool, ids = pool_spec(), PartitionSpec()
    specs = (((pool, ids, ids, ids), pool), ((pool, ids, ids), pool),
             ((pool, pool, ids, ids), pool))  # fmt: skip
    return tuple(
        jax.jit(
            jax.shard_map(op, mesh=mesh, in_specs=ins, out_specs=out, check_vma=False),
            donate_argnums=() if op.func is gather_pages else 0,
        )
        for op, (ins, out) in zip(ops, specs, strict=True)
    )
