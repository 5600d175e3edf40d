"""How a page is held on each tier: the device pool's arrays (one array, or fp8 values and their
scales as a `kernels.kv_quant.QuantizedPool`) and the colder tiers' rows (one row per page).

On the host and the disk an fp8 page is one row of bytes, its values then its scales, so every
move of a page (offload, onload, disk) carries its scales with it and a page stays one contiguous
chunk. Device side: imports JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import check_byte_array_size, is_power_of_two
from kernels.kv_quant import FP8_DTYPES, SCALE_DTYPE, QuantizedPool, is_quantized

__all__ = ["PoolLayout"]


def _nbytes(parts) -> int:
    """Bytes of one page's arrays, given as (shape, dtype) pairs."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in parts)


class PoolLayout:
    """The arrays of a pool of pages `[num_pages, *page_shape]` of `dtype`, and their host rows.

    Args:
        page_shape: `(num_layers, 2, num_kv_heads, tokens_per_block, head_dim)`.
        dtype: the KV dtype; an fp8 one adds a bfloat16 scale per token row of each head.
        local_page_shape: `page_shape` with this process's KV heads (the host's share).
    """

    def __init__(self, page_shape: Sequence[int], dtype, local_page_shape: Sequence[int]):
        self.page_shape = tuple(page_shape)
        self.dtype = np.dtype(dtype)
        self.quantized = self.dtype in FP8_DTYPES
        self._local_parts = self._parts(tuple(local_page_shape))
        if self.quantized:
            self.host_page_shape = (_nbytes(self._local_parts),)
            self.host_dtype = np.dtype(np.uint8)
        else:
            self.host_page_shape, self.host_dtype = tuple(local_page_shape), self.dtype

    def _parts(self, page_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array of one page: the values (fp8 ones as their uint8 bits),
        then the scales if fp8."""
        if not self.quantized:
            return [(page_shape, self.dtype)]
        return [(page_shape, np.dtype(np.uint8)), (page_shape[:-1], np.dtype(SCALE_DTYPE))]

    @property
    def page_bytes(self) -> int:
        """Bytes of one whole page, scales included."""
        return _nbytes(self._parts(self.page_shape))

    def device_zeros(self, num_pages: int, make_zeros):
        """A zero pool: `make_zeros(shape, dtype)` for each array."""
        arrays = [make_zeros((num_pages, *shape), d) for shape, d in self._parts(self.page_shape)]
        return self.pool_of(arrays)

    def check_pool(self, value, current) -> None:
        """Raises unless `value` is a pool of `current`'s kind, shapes and dtypes."""

        def signature(pool):
            return [(a.shape, a.dtype) for a in jax.tree.leaves(pool)]

        leaves = jax.tree.leaves(value)
        if (
            is_quantized(value) != is_quantized(current)
            or not all(isinstance(a, jax.Array) for a in leaves)
            or signature(value) != signature(current)
        ):
            got = [f"{a.dtype}{list(a.shape)}" for a in leaves if hasattr(a, "shape")] or value
            want = [f"{d}{list(s)}" for s, d in signature(current)]
            raise ValueError(f"pool {got!r} must be jax.Array {want} ({type(current).__name__})")

    def check_kernel_limits(self, num_pages: int) -> None:
        """Raises when the Pallas kernels cannot run on a pool of `num_pages`."""
        tokens_per_block, head_dim = self.page_shape[3], self.page_shape[4]
        if not is_power_of_two(tokens_per_block) or not is_power_of_two(head_dim):
            raise ValueError(
                f"impl='pallas' needs power-of-two tokens_per_block={tokens_per_block} and "
                f"head_dim={head_dim} (Triton tiles); use impl='xla'"
            )
        if self.quantized:
            check_byte_array_size("the fp8 pool's values", (num_pages, *self.page_shape))

    def to_host(self, pages, heads=None) -> np.ndarray:
        """Host rows of device pages: this process's heads (`heads`, a `LocalHeads`) of them."""
        arrays = jax.tree.leaves(pages)
        if heads is None:
            return self.host_rows([np.asarray(a) for a in jax.device_get(arrays)])
        return self.host_rows([heads.to_host(a) for a in arrays])

    def to_device(self, rows: np.ndarray, heads=None):
        """Device pages from host rows (of this process's heads, with `heads`)."""
        parts = self.from_host_rows(rows)
        put = jax.device_put if heads is None else heads.to_device
        return self.pool_of([put(p) for p in parts])

    def host_rows(self, parts) -> np.ndarray:
        """The host rows [n, *host_page_shape] of pages given as numpy arrays (values, and
        scales if fp8), each [n, ...] with this process's heads."""
        if not self.quantized:
            return parts[0]
        count = parts[0].shape[0]
        return np.concatenate([p.reshape(count, -1).view(np.uint8) for p in parts], axis=1)

    def from_host_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """The arrays (values, and scales if fp8) of host rows [n, *host_page_shape]."""
        if not self.quantized:
            return [rows]
        count, start, parts = rows.shape[0], 0, []
        for shape, dtype in self._local_parts:
            size = math.prod(shape) * dtype.itemsize
            chunk = np.ascontiguousarray(rows[:, start : start + size])
            parts.append(chunk.view(dtype).reshape(count, *shape))
            start += size
        return parts

    def pool_of(self, arrays):
        """A pool from its device arrays (as `device_zeros` orders them)."""
        return QuantizedPool(*arrays, self.dtype.name) if self.quantized else arrays[0]

    def resized(self, pool, num_pages: int):
        """`pool` cut or grown with zero pages to `num_pages` (traced inside a jit)."""

        def resize(array):
            keep = min(num_pages, array.shape[0])
            grow = jnp.zeros((num_pages - keep, *array.shape[1:]), array.dtype)
            return jnp.concatenate([array[:keep], grow])

        return jax.tree.map(resize, pool)
