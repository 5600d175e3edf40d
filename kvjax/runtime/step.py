"""Compiled step functions over allowed-shape buckets: the JAX replacement for CUDA graphs.

A step's shapes are its bucket key (`kvjax.runtime.buckets`). `StepInputs` is one step's batch;
`StepRegistry` compiles one executable per key
ahead of time (`warmup`, from shapes only, so warm-up never runs with stale page tables) inside
`allow_compile()`, with the pool donated. Outside `allow_compile()` an unseen key never compiles
(the seed PR's "no capture on the fly"): the batch is padded up to the smallest compiled key that
holds it and that executable runs; the fallback is counted in `stats`. A batch no compiled key
holds raises. Inputs are built and padded on the host (numpy), so a served step never traces.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from kvjax.cache.pages import NULL_PAGE
from kvjax.runtime.buckets import BucketKey, smallest_holding
from kvjax.runtime.sharding import place, pool_sharding, replicated

__all__ = [
    "StepInputs",
    "StepRegistry",
    "StepStats",
    "fed_tokens",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's batch: plain arrays (numpy on the host, then on the device).

    Only the first `num_seqs[0]` sequences are live; rows past them are padding.
    """

    tokens: Any  # int32[num_tokens]; padding 0
    page_table: Any  # int32[num_seqs_bucket, max_blocks]; padding rows NULL_PAGE
    kv_lens: Any  # int32[num_seqs_bucket]; keys after this step's tokens are written; padding 0
    cu_q_lens: Any  # int32[num_seqs_bucket + 1]
    num_seqs: Any  # int32[1]
    logits_indices: Any  # int32[num_logits]: token rows whose logits the step returns

    @property
    def key(self) -> BucketKey:
        return BucketKey(self.kv_lens.shape[0], self.tokens.shape[0], self.logits_indices.shape[0])

    def padded(self, key: BucketKey, max_blocks: int | None = None) -> StepInputs:
        """The same batch with shapes `key` (host arrays; extra rows are padding), its page
        table widened with `NULL_PAGE` columns to `max_blocks` when given."""
        extra_seqs = key.num_seqs - self.kv_lens.shape[0]
        extra_tokens = key.num_tokens - self.tokens.shape[0]
        extra_logits = key.num_logits - self.logits_indices.shape[0]
        if min(extra_seqs, extra_tokens, extra_logits) < 0:
            raise ValueError(f"inputs of {self.key} do not fit {key}")
        cu_q_lens = np.asarray(self.cu_q_lens)
        width = self.page_table.shape[1]
        extra_blocks = 0 if max_blocks is None else max_blocks - width
        if extra_blocks < 0:
            raise ValueError(
                f"a page table of {width} blocks is wider than max_blocks={max_blocks}"
            )
        return StepInputs(
            tokens=_padded(self.tokens, (key.num_tokens,)),
            page_table=_padded(
                self.page_table, (key.num_seqs, width + extra_blocks), fill=NULL_PAGE
            ),
            kv_lens=_padded(self.kv_lens, (key.num_seqs,)),
            cu_q_lens=_padded(cu_q_lens, (key.num_seqs + 1,), fill=cu_q_lens[-1]),
            num_seqs=np.asarray(self.num_seqs),
            logits_indices=_padded(self.logits_indices, (key.num_logits,)),
        )

    def pack(self) -> np.ndarray:
        """Every field, flattened into one int32 buffer in field order (`unpack` inverts it);
        inputs made by `empty` are views of that buffer already, returned as it is."""
        arrays = [getattr(self, f.name) for f in dataclasses.fields(self)]
        base = getattr(arrays[0], "base", None)
        if isinstance(base, np.ndarray) and _consecutive_views(arrays, base):
            return base
        return np.concatenate([np.asarray(array, np.int32).ravel() for array in arrays])

    @classmethod
    def empty(cls, key: BucketKey, max_blocks: int) -> StepInputs:
        """Padding inputs of `key`'s shapes as views of one zeroed int32 buffer, to be filled in
        place (a page table of `NULL_PAGE`s); `pack` returns the buffer without a copy."""
        assert NULL_PAGE == 0
        return cls.unpack(np.zeros(cls.packed_size(key, max_blocks), np.int32), key, max_blocks)

    @staticmethod
    def _shapes(key: BucketKey, max_blocks: int) -> dict[str, tuple[int, ...]]:
        """Each field's shape for `key`, in field order."""
        return {
            "tokens": (key.num_tokens,), "page_table": (key.num_seqs, max_blocks),
            "kv_lens": (key.num_seqs,), "cu_q_lens": (key.num_seqs + 1,), "num_seqs": (1,),
            "logits_indices": (key.num_logits,),
        }  # fmt: skip

    @classmethod
    def packed_size(cls, key: BucketKey, max_blocks: int) -> int:
        return sum(math.prod(shape) for shape in cls._shapes(key, max_blocks).values())

    @classmethod
    def unpack(cls, packed, key: BucketKey, max_blocks: int) -> StepInputs:
        """The fields of a `pack`ed buffer of `key`'s shapes (inside a traced step)."""
        fields, start = {}, 0
        for name, shape in cls._shapes(key, max_blocks).items():
            size = math.prod(shape)
            fields[name] = packed[start : start + size].reshape(shape)
            start += size
        return cls(**fields)

    @classmethod
    def placeholder(cls, key: BucketKey, max_blocks: int) -> StepInputs:
        """Zero inputs of `key`'s shapes, for compiling from shapes (never meant to run)."""
        shapes = cls._shapes(key, max_blocks)
        return cls(**{name: np.zeros(shape, np.int32) for name, shape in shapes.items()})


def _consecutive_views(arrays: list, base: np.ndarray) -> bool:
    """Whether `arrays` are C-contiguous int32 views tiling `base` (1-D int32) in order."""
    if base.ndim != 1 or base.dtype != np.int32:
        return False
    address = base.__array_interface__["data"][0]
    for array in arrays:
        if (
            not isinstance(array, np.ndarray)
            or array.base is not base
            or array.dtype != np.int32
            or not array.flags.c_contiguous
            or array.__array_interface__["data"][0] != address
        ):
            return False
        address += array.nbytes
    return address == base.__array_interface__["data"][0] + base.nbytes


def _compiled(lowered):
    return lowered.compile()


def _padded(array, shape: tuple[int, ...], fill: int = 0) -> np.ndarray:
    """int32 `array` in the top-left corner of `shape`, the rest `fill` (np.pad is ~10x
    slower on the small arrays of a step)."""
    array = np.asarray(array)
    out = np.full(shape, fill, np.int32)
    out[tuple(slice(0, size) for size in array.shape)] = array
    return out


def _struct(array) -> jax.ShapeDtypeStruct:
    """Shape, dtype and, for an array sharded over a mesh, its sharding: what a compile needs
    of an argument (single-device arrays stay unpinned, as they are when served)."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        sharding = None
    return jax.ShapeDtypeStruct(np.shape(array), array.dtype, sharding=sharding)


@dataclasses.dataclass
class StepStats:
    compiled: int = 0  # executables built (warm-up and allowed compiles)
    runs: int = 0
    fallbacks: int = 0  # steps of an uncompiled key, padded up to a compiled one


_compile_allowed = [False]


@contextlib.contextmanager
def allow_compile() -> Iterator[None]:
    """Compiling a new step executable is allowed only inside this block (warm-up)."""
    previous, _compile_allowed[0] = _compile_allowed[0], True
    try:
        yield
    finally:
        _compile_allowed[0] = previous


def fed_tokens(tokens, fed):
    """int32[num_tokens] `tokens` with each negative entry `-(i + 1)` replaced by `fed[i]`: a
    token the previous step sampled on the device, fed without a trip through the host."""
    source = jnp.maximum(-tokens - 1, 0)
    return jnp.where(tokens < 0, fed[source], tokens)


class StepRegistry:
    """Compiled executables of `step_fn(params, pool, inputs) -> (logits, pool)`, one per key.

    Each executable also takes `fed`, int32[feed_size] tokens left on the device by the
    previous step's sampler: an input token `-(i + 1)` stands for `fed[i]` (`fed_tokens`).

    Args:
        step_fn: the step; the pool (argument 1) is donated.
        mesh: tensor parallelism: inputs and the first output (logits) are replicated over it,
            the returned pool is sharded over KV heads; params and the pool argument keep the
            shardings they have when compiled.
        feed_size: the length of `fed` (the most rows a step has).
    """

    def __init__(self, step_fn: Callable, mesh=None, feed_size: int = 1) -> None:
        out_shardings = None if mesh is None else (replicated(mesh), pool_sharding(mesh))

        def packed_step(params, pool, packed, fed, key: BucketKey, max_blocks: int):
            inputs = StepInputs.unpack(packed, key, max_blocks)
            inputs = dataclasses.replace(inputs, tokens=fed_tokens(inputs.tokens, fed))
            return step_fn(params, pool, inputs)

        self._jitted = jax.jit(
            packed_step, donate_argnums=1, static_argnums=(4, 5), out_shardings=out_shardings
        )
        self._input_sharding = None if mesh is None else replicated(mesh)
        self.feed_size = feed_size
        self._no_feed = place(np.zeros(feed_size, np.int32), self._input_sharding)
        self._executables: dict[BucketKey, Any] = {}
        self.max_blocks: int | None = None  # page-table width, fixed by the first compile
        self.stats = StepStats()
        self.allow_compile = allow_compile

    @property
    def keys(self) -> list[BucketKey]:
        return sorted(self._executables)

    def warmup(self, params, pool, example: Callable[[BucketKey], StepInputs], keys) -> None:
        """Compiles every key from shapes alone (nothing runs); must be inside `allow_compile()`.
        Keys are traced one by one, then compiled on a thread per core (XLA compiles outside
        the GIL).

        Args:
            params, pool: arrays or `jax.ShapeDtypeStruct`s of the real ones.
            example: builds host inputs of a key (only their shapes are used).
        """
        keys = [key for key in keys if key not in self._executables]
        lowered = [self._lower(key, params, pool, example(key)) for key in keys]
        workers = max(1, min(len(lowered), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as threads:
            for key, executable in zip(keys, threads.map(_compiled, lowered), strict=True):
                self._add(key, executable)

    def _compile(self, key, params, pool, inputs) -> Any:
        return self._add(key, self._lower(key, params, pool, inputs).compile())

    def _lower(self, key, params, pool, inputs) -> Any:
        if not _compile_allowed[0]:
            raise RuntimeError(f"compiling step {key} outside allow_compile()")
        width = inputs.page_table.shape[1]
        if self.max_blocks is not None and width != self.max_blocks:
            raise ValueError(f"page tables of {width} blocks; this registry uses {self.max_blocks}")
        self.max_blocks = width
        structs = jax.tree.map(_struct, params)
        packed = jax.ShapeDtypeStruct(
            (StepInputs.packed_size(key, width),), np.int32, sharding=self._input_sharding
        )
        fed = _struct(self._no_feed)
        pool = jax.tree.map(_struct, pool)  # one array, or each layer group's
        return self._jitted.lower(structs, pool, packed, fed, key, width)

    def _add(self, key: BucketKey, executable) -> Any:
        self._executables[key] = executable
        self.stats.compiled += 1
        return executable

    def __call__(self, params, pool, inputs: StepInputs, fed=None):
        """Runs the step on host `inputs`; returns `(logits, pool)` (the pool was donated).
        `fed`: the int32[feed_size] device tokens that negative input tokens name."""
        if self.max_blocks is not None and inputs.page_table.shape[1] != self.max_blocks:
            inputs = inputs.padded(inputs.key, self.max_blocks)  # narrower tables widen
        key = inputs.key
        executable = self._executables.get(key)
        if executable is None and _compile_allowed[0]:
            executable = self._compile(key, params, pool, inputs)
        elif executable is None:
            # Same logit rows per sequence: padding appends rows, so a per-sequence layout
            # of logits survives only at the same width.
            same_layout = [k for k in self._executables if k.logits_per_seq == key.logits_per_seq]
            key = smallest_holding(same_layout, key, "compiled")
            inputs = inputs.padded(key)
            executable = self._executables[key]
            self.stats.fallbacks += 1
        self.stats.runs += 1
        # One int32 buffer, one transfer. A host array goes straight in: the executable's own
        # transfer is ~10x faster on a CPU than a `device_put` first.
        packed = inputs.pack()
        if self._input_sharding is not None:  # over a mesh: laid out by this process
            packed = place(packed, self._input_sharding)
        return executable(params, pool, packed, self._no_feed if fed is None else fed)
