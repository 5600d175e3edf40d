"""What a `KVCacheManager` reports: counters, KV events, lost caches, the digest of its page
moves, and its self-checks. A base class of `KVCacheManager` only. Host side, no JAX."""

from __future__ import annotations

from kvjax.cache.audit import check_counts, check_nothing_held
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.ledger import CacheLedger
from kvjax.cache.stats import CacheStats, KVEvent

__all__ = ["ManagerReports"]


class ManagerReports:
    """Stats, events and checks of a manager; see `KVCacheManager`."""

    _ledger: CacheLedger

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        return CacheStats(**vars(self._ledger.stats))

    def reset_stats(self) -> None:
        self._ledger.stats = CacheStats()

    @property
    def moves_digest(self) -> bytes:
        """A blake3 digest chained over every page move applied so far: equal on processes that
        moved the same pages in the same order."""
        return self._ledger.moves_digest

    def take_lost_caches(self) -> list[KVCache]:
        """Open caches whose KV a failed disk read or write lost (`KVCache.kv_lost`) since the
        last call: close each and recompute its sequence."""
        return self._ledger.take_lost_caches()

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first (see `num_lost_events`)."""
        return self._ledger.events.take()

    @property
    def num_lost_events(self) -> int:
        """Events pushed out of the bounded buffer before anyone took them."""
        return self._ledger.events.num_lost

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless every page is in one place, every reference count is
        exact (holders = caches holding the page, locks = ACTIVE ones), the lengths of every
        cache hold, and the storage has the tiers' sizes."""
        self._ledger.release_orphans()
        check_counts(self.pages, self.live_caches, self.storage)

    def check_no_leaks(self) -> None:
        """Raises `AssertionError` unless nothing is held any more: no cache is left open and
        every page is free or cached in the radix tree (DROPPABLE, reclaimable at once). Call it
        when every request is done; it runs `check_invariants` first."""
        self.check_invariants()
        check_nothing_held(self.pages, self.live_caches)
