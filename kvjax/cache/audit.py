"""The manager's self-checks: every page in one place with exact reference counts, and nothing
held once every request is done. Tests call them after every operation. Host side, no JAX."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from kvjax.cache.kv_cache import CacheStatus, KVCache
from kvjax.cache.tiers import TieredPages

__all__ = ["check_counts", "check_nothing_held"]


def check_counts(pages: TieredPages, caches: Sequence[KVCache], storage: Any) -> None:
    """Raises `AssertionError` unless the tiers are consistent, every cache's lengths hold,
    each page's holders and locks are exactly the caches holding it and the ACTIVE ones, and
    `storage` has the tiers' sizes."""
    pages.check_invariants()
    holders: Counter[int] = Counter()
    locks: Counter[int] = Counter()
    for cache in caches:
        assert cache.status is not CacheStatus.CLOSED, f"{cache!r} is closed but registered"
        cache.check_invariants()
        for page in cache.held_pages():
            holders[id(page)] += 1
            locks[id(page)] += cache.is_active
    for tier in pages.tiers:
        size = pages.num_pages(tier)
        assert storage.num_pages(tier) == size, f"{tier.name} storage size differs"
        for page in pages.live_pages(tier):
            assert page.num_holders == holders[id(page)], f"{page!r}: {holders[id(page)]} hold"
            assert page.num_locks == locks[id(page)], f"{page!r}: {locks[id(page)]} lock"


def check_nothing_held(pages: TieredPages, caches: Sequence[KVCache]) -> None:
    """Raises `AssertionError` unless no cache is open and every page is free or cached."""
    assert not caches, f"{len(caches)} caches are still open: {list(caches)[:4]}"
    for tier in pages.tiers:
        busy = [page for page in pages.live_pages(tier) if page.num_holders]
        assert not busy, f"{len(busy)} {tier.name} pages are still held: {busy[:4]}"
        cached = sum(1 for _ in pages.live_pages(tier))
        usable = pages.num_usable(tier)
        assert pages.num_free(tier) + cached == usable, f"{tier.name} pages leaked"
