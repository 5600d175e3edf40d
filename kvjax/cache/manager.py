"""KVCacheManager: the tiers, the radix tree, the device pool and every `KVCache` built on them.

The manager decides; the storage carries out. Every operation records the page moves its
decisions need (offload, onload, copy-on-write, relocation) and applies them to the storage in
order before returning, so the pool value the engine reads next is always current. The module
imports no JAX: the default `KVStorage` (device side) is loaded when the manager builds it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.config import CacheConfig
from kvjax.cache.eviction import PRIORITY_DEFAULT, check_priority
from kvjax.cache.keys import ReuseScope, Token
from kvjax.cache.kv_cache import CacheStatus, KVCache
from kvjax.cache.pages import Tier
from kvjax.cache.radix_tree import Block, BlockRadixTree
from kvjax.cache.stats import BlockRemoved, BlockStored, CacheStats, EventBuffer, KVEvent
from kvjax.cache.tiers import TieredPages

if TYPE_CHECKING:
    from kvjax.runtime.storage import KVStorage

__all__ = ["KVCacheManager", "available_host_bytes"]


def available_host_bytes() -> int:
    """Memory the host can still give (MemAvailable on Linux, else free physical pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _auto_host_pages(config: CacheConfig, mesh: Any) -> int:
    available = available_host_bytes()
    if mesh is None:
        return config.auto_host_pages(available)
    from kvjax.runtime.sharding import agreed_host_pages  # device side, loaded only when needed

    return agreed_host_pages(config, mesh, available)


class KVCacheManager:
    """Paged KV storage on tiers, shared through a radix tree by the caches it creates.

    Args:
        config: geometry and quotas.
        auto_host_tier: when `config` gives no host quota, provision one of
            min(device quota, half of available host memory); False leaves it out. Over a mesh
            of several processes, the smallest of their counts.
        max_seq_len: the longest sequence the page tables must fit (clamped to what the device
            holds; default: what the device holds); with `num_extra_kv_tokens` and
            `max_total_draft_tokens` it sets `max_blocks`, the width of `page_table` and the
            most blocks a cache may have. Lookups longer than `max_seq_len` are refused.
        max_events: KV events kept for `take_events` (0 turns them off).
        storage: the page bytes; default a `KVStorage` built from `config`.
        mesh: a `jax.sharding.Mesh` for the default storage: its pool is sharded over KV heads
            (tensor parallelism); page ids stay the same on every shard.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        auto_host_tier: bool = True,
        max_seq_len: int | None = None,
        num_extra_kv_tokens: int = 0,
        max_total_draft_tokens: int = 0,
        max_events: int = 1024,
        storage: KVStorage | None = None,
        mesh: Any = None,
    ) -> None:
        if not isinstance(config, CacheConfig):
            raise ValueError(f"config={config!r} is not a CacheConfig")
        num_host_pages = config.num_host_pages
        if num_host_pages is None:
            num_host_pages = _auto_host_pages(config, mesh) if auto_host_tier else 0
        self.config = config
        self._tree = BlockRadixTree(
            config.tokens_per_block, enable_partial_reuse=config.enable_partial_reuse
        )
        self._tiers = TieredPages(
            self._tree, config.num_device_pages, num_host_pages, config.num_disk_pages
        )
        self._tiers.on_blocks_removed = self._blocks_removed
        if storage is None:
            from kvjax.runtime.storage import KVStorage  # device side, loaded only when needed

            storage = KVStorage(
                config.page_shape,
                config.dtype,
                config.num_device_pages,
                num_host_pages,
                config.num_disk_pages,
                config.disk_dir,
                mesh=mesh,
            )
        layout, wanted = (
            (tuple(storage.page_shape), storage.dtype),
            (config.page_shape, config.dtype),
        )
        if layout != wanted:
            raise ValueError(f"storage pages are {layout}; config needs {wanted}")
        for tier in Tier:
            size = self._tiers.size(tier) if tier in self._tiers.tiers else 0
            if storage.num_pages(tier) != size:
                raise ValueError(
                    f"storage has {storage.num_pages(tier)} {tier.name} pages; config needs {size}"
                )
        self._storage = storage
        self._caches: dict[int, KVCache] = {}  # live caches by id(), in creation order
        self._stats = CacheStats()
        self._events = EventBuffer(check_int("max_events", max_events, minimum=0))
        self._num_dropped_seen = 0
        self._moves_digest = b""  # chained over every page move applied
        self._is_shut_down = False
        if max_seq_len is not None:
            check_int("max_seq_len", max_seq_len, minimum=1)
        self._requested_lengths = (max_seq_len, num_extra_kv_tokens, max_total_draft_tokens)
        self._set_max_lengths()

    def _set_max_lengths(self) -> None:
        """`max_seq_len` clamped to the device (default: all of it) and `max_blocks` from it."""
        requested, extra, draft = self._requested_lengths
        device_tokens = self._tiers.num_pages(Tier.DEVICE) * self.config.tokens_per_block
        self.max_seq_len = self.clamp_max_seq_len(1, requested or device_tokens)
        self.max_blocks = self.max_blocks_per_seq(self.max_seq_len, extra, draft)

    # -- the pool and the tiers ---------------------------------------------------------------

    @property
    def pool(self) -> Any:
        """The device pool `[num_pages, *page_shape]`; assign back the one a step returns."""
        return self._storage.pool

    @pool.setter
    def pool(self, value: Any) -> None:
        self._storage.pool = value

    @property
    def storage(self) -> KVStorage:
        return self._storage

    @property
    def tiers(self) -> TieredPages:
        """Page bookkeeping (read it; change it only through caches and this manager)."""
        return self._tiers

    @property
    def live_caches(self) -> list[KVCache]:
        return list(self._caches.values())

    def quota(self, tier: Tier) -> int:
        """Bytes of `tier` (the device's `NULL_PAGE` included)."""
        return self._tiers.size(tier) * self.config.page_bytes

    def resize_quota(
        self, tier: Tier, *, num_pages: int | None = None, num_bytes: int | None = None
    ) -> bool:
        """Changes the size of a tier while every cache is suspended.

        Shrinking evicts down the cascade (and drops cached blocks from the coldest tier) until
        the held pages fit. A device resize gives the pool a new shape (jitted steps recompile)
        and recomputes `max_seq_len` and `max_blocks`.

        Returns:
            False, with nothing changed, when the held pages would not fit.
        """
        self._require_running()
        if (num_pages is None) == (num_bytes is None):
            raise ValueError(f"give exactly one of num_pages={num_pages} and num_bytes={num_bytes}")
        page_bytes = self.config.page_bytes
        minimum = 2 if tier is Tier.DEVICE else 1
        if num_pages is None:
            check_int("num_bytes", num_bytes, minimum=minimum * page_bytes)
            num_pages = num_bytes // page_bytes
        active = next((cache for cache in self._caches.values() if cache.is_active), None)
        if active is not None:
            raise RuntimeError(f"resize_quota needs every cache suspended; {active!r} is active")
        if not self._tiers.resize_tier(tier, num_pages):
            return False
        self._flush()  # relocations run before the array shrinks
        self._storage.resize(tier, num_pages)
        if tier is Tier.DEVICE:
            self._set_max_lengths()
        return True

    # -- caches -------------------------------------------------------------------------------

    def create_kv_cache(
        self,
        tokens: Sequence[Token] | np.ndarray | None = None,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
    ) -> KVCache:
        """A SUSPENDED cache holding the longest reusable prefix of `tokens` in its scope.

        Pass the tokens whose KV may be reused: a caller that must recompute the last prompt
        token (to get its logits) leaves it out. Call `resume()` before growing the cache.

        Args:
            tokens: lookup token ids (or 32-byte digests), or None for no reuse.
            lora_id, salt: the reuse scope; caches of different scopes never share blocks.
            priority: eviction priority of this cache's pages, 0..100 (default 35).
        """
        self._require_running()
        priority = PRIORITY_DEFAULT if priority is None else check_priority(priority)
        scope = ReuseScope(lora_id, salt)
        tokens = [] if tokens is None else tokens
        if len(tokens) > self.max_seq_len:
            raise ValueError(f"{len(tokens)} lookup tokens exceed max_seq_len={self.max_seq_len}")
        match = self._tree.match(scope, tokens)
        prefix = tokens[: match.num_tokens]
        reused = prefix.tolist() if isinstance(prefix, np.ndarray) else list(prefix)
        cache = KVCache(self, scope, match.blocks, reused, priority)
        tpb = self.config.tokens_per_block
        partial = int(match.num_tokens % tpb != 0)
        self._count(
            reused_blocks=len(match.blocks),
            partially_reused_blocks=partial,
            missed_blocks=math.ceil(len(tokens) / tpb) - len(match.blocks),
        )
        self._caches[id(cache)] = cache
        return cache

    def probe_reuse(
        self,
        tokens: Sequence[Token] | np.ndarray,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
    ) -> int:
        """How many leading tokens `create_kv_cache` would reuse now; takes nothing."""
        self._require_running()
        return self._tree.match(ReuseScope(lora_id, salt), tokens).num_tokens

    def clamp_max_seq_len(self, batch_size: int, upper_bound: int) -> int:
        """The longest sequence (<= `upper_bound`) the device holds next to `batch_size - 1`
        others of one block each."""
        check_int("upper_bound", upper_bound, minimum=1)
        num_pages = self._tiers.num_pages(Tier.DEVICE)
        check_int("batch_size", batch_size, minimum=1, maximum=num_pages)
        return min(upper_bound, (num_pages - batch_size + 1) * self.config.tokens_per_block)

    def max_blocks_per_seq(
        self, max_seq_len: int, num_extra_kv_tokens: int = 0, max_total_draft_tokens: int = 0
    ) -> int:
        """Page-table width: `max_seq_len` clamped to the device first, plus extra KV tokens,
        draft tokens and the decode token, in blocks (the seed PR's fix of an undercount)."""
        check_int("num_extra_kv_tokens", num_extra_kv_tokens, minimum=0)
        check_int("max_total_draft_tokens", max_total_draft_tokens, minimum=0)
        clamped = self.clamp_max_seq_len(1, max_seq_len)
        tokens = clamped + num_extra_kv_tokens + max_total_draft_tokens + 1
        return -(-tokens // self.config.tokens_per_block)

    def page_table(
        self, caches: Sequence[KVCache], num_rows: int, num_columns: int | None = None
    ) -> np.ndarray:
        """int32[num_rows, num_columns] of device page ids, one row per ACTIVE cache, padded with
        `NULL_PAGE` (`num_columns` defaults to `max_blocks`)."""
        num_columns = self.max_blocks if num_columns is None else num_columns
        check_int("num_rows", num_rows, minimum=len(caches))
        check_int("num_columns", num_columns, minimum=1)
        table = np.zeros((num_rows, num_columns), np.int32)
        for row, page_ids in enumerate(self.get_batch_cache_indices(caches)):
            if len(page_ids) > num_columns:
                raise ValueError(f"a cache of {len(page_ids)} blocks exceeds {num_columns} columns")
            table[row, : len(page_ids)] = page_ids
        return table

    def get_batch_cache_indices(self, caches: Sequence[KVCache]) -> list[list[int]]:
        """Device page ids of each ACTIVE cache, block by block."""
        for cache in caches:
            if self._caches.get(id(cache)) is not cache:
                raise ValueError(f"{cache!r} is not a live cache of this manager")
            if not cache.is_active:
                raise ValueError(f"{cache!r} is not ACTIVE; resume it first")
        return [cache.page_ids() for cache in caches]

    def clear_reusable_blocks(self) -> None:
        """Empties the radix tree: cached pages are freed; pages live caches hold stay theirs."""
        self._require_running()
        self._tiers.clear()
        self._flush()

    def shutdown(self) -> None:
        """Clears the tree and releases the storage; every cache must be closed. Idempotent."""
        if self._is_shut_down:
            return
        if self._caches:
            raise RuntimeError(f"shutdown with {len(self._caches)} caches still open; close them")
        self._tiers.clear()
        self._storage.close()
        self._is_shut_down = True

    # -- stats and events ---------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        return CacheStats(**vars(self._stats))

    def reset_stats(self) -> None:
        self._stats = CacheStats()

    @property
    def moves_digest(self) -> bytes:
        """A blake3 digest chained over every page move applied so far: equal on processes that
        moved the same pages in the same order."""
        return self._moves_digest

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first (see `num_lost_events`)."""
        return self._events.take()

    @property
    def num_lost_events(self) -> int:
        """Events pushed out of the bounded buffer before anyone took them."""
        return self._events.num_lost

    # -- hooks for KVCache --------------------------------------------------------------------

    def _flush(self) -> None:
        """Applies the recorded page moves to the storage, in order, and counts them."""
        moves = self._tiers.take_moves()
        if moves:
            self._storage.apply(moves)
            record = [(m.src_tier, m.src_page, m.dst_tier, m.dst_page) for m in moves]
            record = np.asarray(record, np.int64).tobytes()
            self._moves_digest = blake3.blake3(self._moves_digest + record).digest()
            kinds = Counter((move.src_tier, move.dst_tier) for move in moves)
            for (src, dst), count in kinds.items():
                self._stats.count_move(src, dst, count, self.config.page_bytes)
        dropped = self._tiers.num_dropped_blocks
        self._stats.dropped_blocks += dropped - self._num_dropped_seen
        self._num_dropped_seen = dropped

    def _count(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _block_stored(self, block: Block, tokens: Sequence[Token]) -> None:
        self._stats.stored_blocks += 1
        if self._events.max_events:
            page = block.page
            self._events.append(
                BlockStored(block.key, block.parent.key, tuple(tokens), page.tier, page.priority)
            )

    def _blocks_removed(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            self._events.append(BlockRemoved(block.key))

    def _forget(self, cache: KVCache) -> None:
        del self._caches[id(cache)]

    def _require_running(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this KVCacheManager was shut down")

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless every page is in one place, every reference count is
        exact (holders = caches holding the page, locks = ACTIVE ones), the lengths of every
        cache hold, and the storage has the tiers' sizes."""
        self._tiers.check_invariants()
        holders: Counter[int] = Counter()
        locks: Counter[int] = Counter()
        for cache in self._caches.values():
            assert cache.status is not CacheStatus.CLOSED, f"{cache!r} is closed but registered"
            cache.check_invariants()
            for page in cache.pages():
                holders[id(page)] += 1
                locks[id(page)] += cache.is_active
        for tier in self._tiers.tiers:
            size = self._tiers.size(tier)
            assert self._storage.num_pages(tier) == size, f"{tier.name} storage size differs"
            for page in self._tiers.live_pages(tier):
                assert page.num_holders == holders[id(page)], f"{page!r}: {holders[id(page)]} hold"
                assert page.num_locks == locks[id(page)], f"{page!r}: {locks[id(page)]} lock"
