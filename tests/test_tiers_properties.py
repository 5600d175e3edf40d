"""Random cache life cycles on tiny tiers: eviction never loses a held page nor leaks one."""

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from kvjax import BlockRadixTree, InsertOutcome, ReuseScope, Tier, TieredPages

TPB = 2
SCOPE = ReuseScope()
sequence = st.lists(st.integers(0, 7), min_size=1, max_size=3 * TPB)
run = st.tuples(st.just("run"), sequence, st.integers(0, 100))  # a new cache computes and commits
operation = st.one_of(
    run,
    run,
    st.tuples(st.just("suspend"), st.integers(0, 10**6), st.integers(0, 100)),
    st.tuples(st.just("reuse"), sequence, st.integers(0, 100)),  # a new suspended cache reuses
    st.tuples(st.just("suspend"), st.integers(0, 10**6), st.integers(0, 100)),
    st.tuples(st.just("close"), st.integers(0, 10**6), st.integers(0, 100)),
    st.tuples(st.just("make_room"), st.sampled_from(list(Tier)), st.integers(0, 8)),
)


class FakeStorage(dict):
    """Names the page each (tier, page id) slot holds; counts moves out of colder tiers."""

    deep_moves = 0


def apply_moves(pool, storage):
    """Carries out the recorded moves, in order, on the fake storage."""
    for move in pool.take_moves():
        storage[move.dst_tier, move.dst_page] = storage[move.src_tier, move.src_page]
        storage.deep_moves += move.src_tier is not Tier.DEVICE


class FakeCache:
    def __init__(self, pages, locked):
        self.pages = pages
        self.locked = locked


def snapshot(pool):
    return [(pool.num_free(t), [id(p) for p in pool.eviction_order(t)]) for t in pool.tiers]


def run_cache(pool, tokens, priority, storage):
    """Allocates a page per block, commits blocks until one is not new; None when out of pages."""
    blocks = [tokens[i : i + TPB] for i in range(0, len(tokens), TPB)]
    before = snapshot(pool)
    pages = pool.allocate(len(blocks), priority=priority)
    if pages is None:
        assert snapshot(pool) == before and pool.take_moves() == []  # all or nothing
        return None
    apply_moves(pool, storage)  # eviction's moves run before the new pages are written
    for page in pages:
        storage[Tier.DEVICE, page.page_id] = id(page)  # the cache writes its KV
    parent = SCOPE
    for page, block in zip(pages, blocks, strict=True):
        result = pool.commit(page, parent, block)
        if result.outcome is not InsertOutcome.NEW:
            break  # keep the remaining pages private, like a cache that stops committing
        parent = result.block
    return FakeCache(pages, locked=True)


def reuse_cache(pool, tokens):
    match = pool.tree.match(SCOPE, tokens)
    pages = [block.page for block in match.blocks]
    for page in pages:
        pool.hold(page)
    return FakeCache(pages, locked=False)


@pytest.mark.parametrize(("device", "host", "disk"), [(5, 0, 0), (5, 3, 0), (4, 2, 2), (4, 0, 3)])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation, max_size=50))
def test_random_life_cycles_keep_every_page_accounted_for(device, host, disk, operations):
    pool = TieredPages(BlockRadixTree(TPB), device, host, disk)
    caches, storage = [], FakeStorage()
    for kind, first, second in operations:
        if kind == "run":
            cache = run_cache(pool, first, second, storage)
            if cache is not None:
                caches.append(cache)
        elif kind == "reuse":
            caches.append(reuse_cache(pool, first))
        elif kind in ("suspend", "close") and caches:
            cache = caches[first % len(caches)]
            if cache.locked:
                for page in cache.pages:
                    pool.unlock(page)
                cache.locked = False
            if kind == "close":
                caches.remove(cache)
                for page in reversed(cache.pages):
                    pool.release(page)
        elif kind == "make_room" and first in pool.tiers:
            before = pool.num_free(first)
            if not pool.make_room(first, second):
                assert pool.num_free(first) == before
            else:
                assert pool.num_free(first) >= second
        pool.check_invariants()
        apply_moves(pool, storage)
        for tier in pool.tiers:  # every live page's bytes followed it through the moves
            for page in pool.live_pages(tier):
                assert storage[tier, page.page_id] == id(page), page
        for cache in caches:  # held pages are never dropped; locked ones stay on the device
            for page in cache.pages:
                assert pool.page(page.tier, page.page_id) is page
                assert not cache.locked or page.tier is Tier.DEVICE
    target(float(storage.deep_moves))  # steer toward deep eviction cascades
    for cache in caches:
        for page in reversed(cache.pages):
            if cache.locked:
                pool.unlock(page)
            pool.release(page)
    pool.clear()
    pool.check_invariants()
    for tier in pool.tiers:
        assert pool.num_free(tier) == pool.num_pages(tier)  # nothing leaked
