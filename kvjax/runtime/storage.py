"""Storage: the bytes of every tier (device pool, host array, disk memmap) and the page moves.

Device side: imports JAX. `KVStorage.apply` carries out the `PageMove`s that `TieredPages`
records, in order, batching consecutive moves of one kind into one device op of
`kernels.page_copy` (Pallas on a GPU, XLA elsewhere) and one host transfer. Page counts are padded
to power-of-two buckets, with the live count passed as a device scalar, so varying counts reuse
compiled code.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.config import KV_DTYPES, CacheConfig
from kvjax.cache.pages import NULL_PAGE, Tier
from kvjax.cache.tier import PageMove, PageMoveError
from kvjax.runtime.disk import DiskPages
from kvjax.runtime.host_memory import host_tier_pages
from kvjax.runtime.page_ops import (
    default_impl,
    move_batches,
    padded_page_ids,
    page_bucket,
    page_ops,
)
from kvjax.runtime.pool_layout import PoolLayout
from kvjax.runtime.sharding import LocalHeads, zeros

__all__ = ["KVStorage"]


class KVStorage:
    """Pages of every tier: `pool` on the device, `host` in RAM, `disk` in a memmapped temp file.

    Each tier holds `[num_pages, *page_shape]` of `dtype`; an fp8 dtype keeps a bfloat16 scale
    per token row beside the values, on the device as a `QuantizedPool` and on the colder tiers
    in the same row of bytes as its page (`PoolLayout`). Page 0 of the device is `NULL_PAGE`:
    never a move's destination. Over a mesh spanning several processes, the host
    and disk tiers of each process hold only its devices' KV heads (`local_page_shape`).

    Args:
        page_shape: `(num_layers, 2, num_kv_heads, tokens_per_block, head_dim)`.
        dtype: one of `KV_DTYPES`.
        num_device_pages: device pool size, `NULL_PAGE` included (>= 2).
        num_host_pages, num_disk_pages: sizes of the colder tiers; 0 leaves a tier out.
        disk_dir: directory of the disk tier's anonymous file; required when num_disk_pages > 0.
        impl: device ops of `kernels.page_copy`: "pallas" or "xla"; default `default_impl()`.
        mesh: tensor parallelism: the pool is sharded over KV heads on this mesh and every page
            op runs per shard (`shard_map`); page ids are the same on every shard. Every process
            of the mesh must make the same calls in the same order.
    """

    def __init__(
        self,
        page_shape: Sequence[int],
        dtype: str | np.dtype,
        num_device_pages: int,
        num_host_pages: int = 0,
        num_disk_pages: int = 0,
        disk_dir: str | os.PathLike | None = None,
        *,
        impl: str | None = None,
        mesh=None,
    ) -> None:
        self.page_shape = tuple(check_int("page_shape", d, minimum=1) for d in page_shape)
        if len(self.page_shape) != 5:
            raise ValueError(f"page_shape={self.page_shape} must have 5 dimensions")
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in KV_DTYPES:
            raise ValueError(f"dtype={self.dtype.name} is not supported; use one of {KV_DTYPES}")
        check_int("num_device_pages", num_device_pages, minimum=NULL_PAGE + 2)
        for name, value in (("num_host_pages", num_host_pages), ("num_disk_pages", num_disk_pages)):
            check_int(name, value, minimum=0)
        if num_disk_pages and disk_dir is None:
            raise ValueError(f"num_disk_pages={num_disk_pages} needs disk_dir")
        self._disk_dir = disk_dir
        self.impl = default_impl() if impl is None else impl
        if self.impl not in ("pallas", "xla"):
            raise ValueError(f"impl={impl!r} must be 'pallas', 'xla' or None (the default)")
        self._heads = None if mesh is None else LocalHeads(mesh, self.page_shape[2])
        self._sharding = None if mesh is None else self._heads.sharding
        # A page of the host and disk tiers: `page_shape` with this process's KV heads.
        self.local_page_shape = self.page_shape
        if self._heads is not None:
            self.local_page_shape = self._heads.local_shape((0, *self.page_shape))[1:]
        self.layout = PoolLayout(self.page_shape, self.dtype, self.local_page_shape)
        if self.impl == "pallas":  # before anything is allocated
            self.layout.check_kernel_limits(num_device_pages)
        self._copy, self._gather, self._scatter = page_ops(self.impl, mesh)
        self._pool = self._zeros(num_device_pages)
        self._host = self._host_rows(num_host_pages) if num_host_pages else None
        self._disk = self._new_disk(num_disk_pages) if num_disk_pages else None
        self._closed = False

    @classmethod
    def for_config(
        cls, config: CacheConfig, *, auto_host_tier: bool = True, impl: str | None = None, mesh=None
    ) -> KVStorage:
        """The storage `config` describes; its host tier, when `config` gives none, sized by
        `host_tier_pages` (min(device quota, half of available host memory); none when
        `auto_host_tier` is False)."""
        if not isinstance(config, CacheConfig):
            raise ValueError(f"config={config!r} is not a CacheConfig")
        return cls(
            config.page_shape,
            config.dtype,
            config.num_device_pages,
            host_tier_pages(config, auto_host_tier=auto_host_tier, mesh=mesh),
            config.num_disk_pages,
            config.disk_dir,
            impl=impl,
            mesh=mesh,
        )

    def _zeros(self, num_pages: int):
        """Zero device pages, created sharded over KV heads when there is a mesh."""
        return self.layout.device_zeros(
            num_pages, lambda shape, dtype: zeros(shape, dtype, self._sharding)
        )

    def _host_rows(self, num_pages: int) -> np.ndarray:
        return np.zeros((num_pages, *self.layout.host_page_shape), self.layout.host_dtype)

    def _to_host(self, pages) -> np.ndarray:
        """Host rows of this process's heads of device pages."""
        return self.layout.to_host(pages, self._heads)

    def _to_device(self, rows: np.ndarray):
        """Device pages from host rows of this process's heads (every process passes its own)."""
        return self.layout.to_device(rows, self._heads)

    def _resized(self, pool, num_pages: int):
        """`pool` cut or grown with zero pages to `num_pages`, keeping its layout (donated)."""
        return jax.jit(
            lambda pool: self.layout.resized(pool, num_pages),
            out_shardings=self._sharding,
            donate_argnums=0,
        )(pool)

    # -- tiers --------------------------------------------------------------------------------

    @property
    def pool(self):
        """The device pool, dtype[num_device_pages, *page_shape] (a `QuantizedPool` of fp8
        values and their scales for an fp8 dtype); donated by every update."""
        self._check_open()
        return self._pool

    @pool.setter
    def pool(self, value) -> None:
        self._check_open()
        self.layout.check_pool(value, self._pool)
        self._pool = value

    @property
    def host(self) -> np.ndarray | None:
        """The host tier, dtype[num_host_pages, *local_page_shape] (rows of bytes, scales
        included, for fp8: `layout.host_page_shape`), or None when absent."""
        self._check_open()
        return self._host

    @property
    def disk(self) -> DiskPages | None:
        """The disk tier, array-like dtype[num_disk_pages, *local_page_shape], or None."""
        self._check_open()
        return self._disk

    @property
    def page_bytes(self) -> int:
        """Bytes of one whole page (every KV head, whichever process holds it; scales too)."""
        return self.layout.page_bytes

    def num_pages(self, tier: Tier) -> int:
        """Pages of `tier`, `NULL_PAGE` included; 0 when the tier is absent."""
        array = self._array(Tier(tier))
        return 0 if array is None else array.shape[0]

    def nbytes(self, tier: Tier) -> int:
        return self.num_pages(tier) * self.page_bytes

    def read_pages(self, tier: Tier, page_ids: Sequence[int]) -> np.ndarray:
        """A host copy of the pages, as the host tier holds them: `[len(page_ids),
        *layout.host_page_shape]` (for tests and debugging)."""
        tier = self._check_tier(tier)
        ids = [self._check_page(tier, p, "page_ids") for p in page_ids]
        if tier is Tier.DEVICE:
            pages = self._gather(self._pool, padded_page_ids(ids), np.int32(len(ids)))
            return self._to_host(pages)[: len(ids)]
        return np.array(self._array(tier)[ids])

    def resize(self, tier: Tier, num_pages: int) -> None:
        """Grows (new pages zero) or shrinks (keeps pages `[0, num_pages)`) a present tier.

        The caller has moved the live pages below `num_pages` first.
        """
        tier = self._check_tier(tier)
        minimum = NULL_PAGE + 2 if tier is Tier.DEVICE else 1
        num_pages = check_int("num_pages", num_pages, minimum=minimum)
        keep = min(num_pages, self.num_pages(tier))
        if tier is Tier.DEVICE:
            pool, self._pool = self._pool, None  # the old pool is freed once dropped here
            self._pool = self._resized(pool, num_pages)
        elif tier is Tier.HOST:
            host, self._host = self._host, self._host_rows(num_pages)
            self._host[:keep] = host[:keep]
        else:
            disk, self._disk = self._disk, self._new_disk(num_pages)
            try:
                self._disk[:keep] = disk[:keep]  # raises OSError when a page cannot be copied
            finally:
                disk.close()

    def reset_pool(self) -> None:
        """A zero pool in place of one a failed step consumed (donated, then lost)."""
        self._check_open()
        self._pool = self._zeros(self._pool.shape[0])

    def close(self) -> None:
        """Drops every tier and closes the disk file; later use raises `RuntimeError`."""
        if self._closed:
            return
        self._closed = True
        if self._disk is not None:
            self._disk.close()
        self._pool = self._host = self._disk = None

    def warmup(self) -> int:
        """Compiles the batched page ops for every page-count bucket a move can need, by running
        each on no page (nothing changes), so serving never compiles one; returns the count."""
        self._check_open()
        colder = any(self.num_pages(tier) for tier in (Tier.HOST, Tier.DISK))
        none = np.int32(0)
        count, bucket, largest = 0, 1, page_bucket(self.num_pages(Tier.DEVICE))
        while bucket <= largest:
            ids = np.full(bucket, NULL_PAGE, np.int32)
            self._pool = self._copy(self._pool, ids, ids, none)
            count += 1
            if colder:
                jax.block_until_ready(self._gather(self._pool, ids, none))
                staging = self._to_device(self._host_rows(bucket))
                self._pool = self._scatter(self._pool, staging, ids, none)
                count += 2
            bucket *= 2
        return count

    # -- moves --------------------------------------------------------------------------------

    def apply(self, moves: Sequence[PageMove]) -> dict[tuple[Tier, Tier], int]:
        """Carries out the moves in order, checking them all before changing anything; runs of
        one kind run as one batch (`page_ops.move_batches`). Returns the pages moved per
        (src_tier, dst_tier).

        Raises:
            PageMoveError: disk reads or writes failed; every other move ran.
        """
        self._check_open()
        moves = list(moves)
        for move in moves:
            self._check_move(move)
        failed: list[int] = []
        for start, end in move_batches(moves):
            failed += [start + i for i in self._run_batch(moves[start:end])]
        if failed:
            raise PageMoveError(failed, f"disk I/O failed in {self._disk_dir}")
        return dict(Counter((move.src_tier, move.dst_tier) for move in moves))

    def _run_batch(self, batch: list[PageMove]) -> list[int]:
        """Runs one batch; returns the positions in it whose disk read or write failed."""
        src_tier, dst_tier = batch[0].src_tier, batch[0].dst_tier
        src_ids = [move.src_page for move in batch]
        dst_ids = [move.dst_page for move in batch]
        num_valid = np.int32(len(batch))
        if src_tier is Tier.DEVICE and dst_tier is Tier.DEVICE:
            src, dst = padded_page_ids(src_ids), padded_page_ids(dst_ids)
            self._pool = self._copy(self._pool, src, dst, num_valid)
            return []
        if src_tier is Tier.DEVICE:
            staging = self._gather(self._pool, padded_page_ids(src_ids), num_valid)
            return self._put(dst_tier, dst_ids, self._to_host(staging)[: len(batch)])
        if dst_tier is Tier.DEVICE:
            staging = self._host_rows(page_bucket(len(batch)))
            failed = self._take(src_tier, src_ids, staging[: len(batch)])
            staging = self._to_device(staging)  # padding rows are dropped by scatter_pages
            self._pool = self._scatter(self._pool, staging, padded_page_ids(dst_ids), num_valid)
            return failed
        pages = np.empty((len(batch), *self.layout.host_page_shape), self.layout.host_dtype)
        failed = self._take(src_tier, src_ids, pages)
        return sorted({*failed, *self._put(dst_tier, dst_ids, pages)})

    def _take(self, tier: Tier, page_ids: list[int], out: np.ndarray) -> list[int]:
        """Copies pages of the host or disk tier into `out`; returns the failed positions."""
        if tier is Tier.DISK:
            return self._disk.read_into(out, page_ids)
        np.take(self._host, page_ids, axis=0, out=out, mode="clip")  # ids are checked already
        return []

    def _put(self, tier: Tier, page_ids: list[int], pages: np.ndarray) -> list[int]:
        """Writes pages to the host or disk tier; returns the failed positions."""
        if tier is Tier.HOST:
            self._host[page_ids] = pages
            return []
        return self._disk.write(page_ids, pages)

    # -- checks -------------------------------------------------------------------------------

    def _new_disk(self, num_pages: int) -> DiskPages:
        return DiskPages(
            self._disk_dir, num_pages, self.layout.host_page_shape, self.layout.host_dtype
        )

    def _array(self, tier: Tier) -> jax.Array | np.ndarray | None:
        self._check_open()
        return {Tier.DEVICE: self._pool, Tier.HOST: self._host, Tier.DISK: self._disk}[tier]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("KVStorage is closed")

    def _check_tier(self, tier: object) -> Tier:
        if not isinstance(tier, Tier) or self._array(tier) is None:
            present = [t.name for t in Tier if self._array(t) is not None]
            raise ValueError(f"tier={tier!r} is not one of this storage's tiers {present}")
        return tier

    def _check_page(self, tier: Tier, page_id: object, name: str) -> int:
        return check_int(name, page_id, minimum=0, maximum=self.num_pages(tier) - 1)

    def _check_move(self, move: PageMove) -> None:
        try:
            for tier, page_id, name in (
                (move.src_tier, move.src_page, "src_page"),
                (move.dst_tier, move.dst_page, "dst_page"),
            ):
                self._check_page(self._check_tier(tier), page_id, f"{tier.name} {name}")
        except ValueError as error:
            raise ValueError(f"{move}: {error}") from None
        if move.dst_tier is Tier.DEVICE and move.dst_page == NULL_PAGE:
            raise ValueError(f"{move}: NULL_PAGE={NULL_PAGE} is never a destination")
