"""Random cache life cycles on tiny tiers: eviction never loses a held page nor leaks one, every
failed call changes nothing, and the recorded moves carry every page's bytes along."""

import random

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from kvjax.cache import BlockRadixTree, InsertOutcome, ReuseScope, Tier, TieredPages

TPB = 2
SCOPES = [ReuseScope(), ReuseScope(salt=1)]
index = st.integers(0, 10**6)
flag = st.booleans()
sequence = st.lists(st.integers(0, 3), min_size=1, max_size=4 * TPB)
run = st.tuples(st.just("run"), st.tuples(sequence, st.integers(0, 100), index))
operation = st.one_of(
    run,
    run,  # a new cache allocates, computes and commits
    st.tuples(st.just("reuse"), st.tuples(sequence, index)),  # a suspended cache reuses a prefix
    st.tuples(st.just("suspend"), st.tuples(index, flag)),
    st.tuples(st.just("resume"), st.tuples(index, st.integers(0, 3))),  # and grow
    st.tuples(st.just("share"), st.tuples(index)),  # another holder of the same pages
    st.tuples(st.just("close"), st.tuples(index, flag)),
    st.tuples(st.just("close"), st.tuples(index, flag)),
    st.tuples(st.just("make_room"), st.tuples(st.sampled_from(list(Tier)), st.integers(0, 8))),
    st.tuples(st.just("drop"), st.tuples(index)),
)


class FakeStorage(dict):
    """Names the page each (tier, page id) slot holds; counts moves out of colder tiers."""

    deep_moves = 0

    def apply(self, pool):
        """Carries out the recorded moves, in order."""
        for move in pool.take_moves():
            self[move.dst_tier, move.dst_page] = self[move.src_tier, move.src_page]
            self.deep_moves += move.src_tier is not Tier.DEVICE


class FakeCache:
    def __init__(self, pages, locked):
        self.pages = pages
        self.locked = locked


def snapshot(pool):
    pages = sorted(
        (id(p), p.tier, p.page_id, p.num_holders, p.num_locks)
        for tier in pool.tiers
        for p in pool.live_pages(tier)
    )
    order = [[id(p) for p in pool.eviction_order(tier)] for tier in pool.tiers]
    return pages, order, len(pool.tree), pool.num_dropped_blocks


def fits(pool, targets, num_new):
    """Whether the tiers together can hold the result of locking `targets` on the device and
    taking `num_new` pages: the locked pages fit the device and the held ones fit every tier;
    pages rising from colder tiers swap places with device pages only through one page of room
    (a free or an unheld page somewhere)."""
    pages = [page for tier in pool.tiers for page in pool.live_pages(tier)]
    locked = sum(page.num_locks > 0 for page in pages) + num_new
    locked += sum(page.num_locks == 0 for page in targets)
    held = sum(page.num_holders > 0 for page in pages) + num_new
    if locked > pool.num_usable(Tier.DEVICE) or held > sum(map(pool.num_usable, pool.tiers)):
        return False
    room = sum(map(pool.num_free, pool.tiers)) + sum(not page.num_holders for page in pages)
    return room > 0 or all(page.tier is Tier.DEVICE for page in targets)


def run_cache(pool, storage, tokens, priority, scope):
    """Allocates a page per block, commits blocks until one is not new; None when out of pages."""
    blocks = [tokens[i : i + TPB] for i in range(0, len(tokens), TPB)]
    before = snapshot(pool)
    expected = fits(pool, [], len(blocks))
    pages = pool.allocate(len(blocks), priority=priority)
    assert (pages is not None) == expected
    if pages is None:
        assert snapshot(pool) == before and pool.take_moves() == []  # all or nothing
        return None
    storage.apply(pool)  # eviction's moves run before the new pages are written
    for page in pages:
        storage[Tier.DEVICE, page.page_id] = id(page)  # the cache writes its KV
    parent = scope
    for page, block in zip(pages, blocks, strict=True):
        result = pool.commit(page, parent, block)
        if result.outcome is not InsertOutcome.NEW:
            break  # keep the remaining pages private, like a cache that stops committing
        parent = result.block
    return FakeCache(pages, locked=True)


def reuse_cache(pool, tokens, scope):
    match = pool.tree.match(scope, tokens)
    served = [token for block in match.blocks for token in block.tokens]
    assert served[: match.num_tokens] == tokens[: match.num_tokens]
    pages = [block.page for block in match.blocks]
    for page in pages:
        pool.hold(page)
    return FakeCache(pages, locked=False)


def step(pool, storage, caches, kind, args):
    pick = caches[args[0] % len(caches)] if caches and isinstance(args[0], int) else None
    if kind == "run":
        cache = run_cache(pool, storage, args[0], args[1], SCOPES[args[2] % 2])
        if cache is not None:
            caches.append(cache)
    elif kind == "reuse":
        caches.append(reuse_cache(pool, args[0], SCOPES[args[1] % 2]))
    elif kind == "share" and pick is not None:
        for page in pick.pages:
            pool.hold(page)
        caches.append(FakeCache(list(pick.pages), locked=False))
    elif kind == "resume" and pick is not None and not pick.locked:
        before, expected = snapshot(pool), fits(pool, pick.pages, args[1])
        new_pages = pool.acquire(pick.pages, args[1])
        assert (new_pages is not None) == expected, (expected, before)
        if new_pages is None:
            assert snapshot(pool) == before and pool.take_moves() == []
        else:
            storage.apply(pool)
            for page in new_pages:
                storage[Tier.DEVICE, page.page_id] = id(page)
            pick.pages += new_pages
            pick.locked = True
    elif kind in ("suspend", "close") and pick is not None:
        if pick.locked:
            for page in pick.pages:
                pool.unlock(page, evict_first=args[1])
            pick.locked = False
        if kind == "close":
            caches.remove(pick)
            for page in reversed(pick.pages):
                pool.release(page, evict_first=args[1])
    elif kind == "make_room" and args[0] in pool.tiers:
        before = snapshot(pool)
        if pool.make_room(*args):
            assert pool.num_free(args[0]) >= args[1]
        else:
            assert snapshot(pool) == before and pool.take_moves() == []
    elif kind == "drop" and len(pool.tree):
        blocks = sorted(pool.tree.iter_blocks(), key=lambda block: block.key)
        pool.drop_block(blocks[args[0] % len(blocks)])


@pytest.mark.parametrize(
    ("device", "host", "disk"), [(5, 0, 0), (5, 3, 0), (4, 2, 2), (4, 0, 3), (7, 3, 2)]
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation, max_size=80))
def test_random_life_cycles_keep_every_page_accounted_for(device, host, disk, operations):
    pool = TieredPages(BlockRadixTree(TPB), device, host, disk)
    caches, storage = [], FakeStorage()
    for kind, args in operations:
        step(pool, storage, caches, kind, args)
        pool.check_invariants()
        storage.apply(pool)
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
        assert pool.num_free(tier) == pool.num_usable(tier)  # nothing leaked


@pytest.mark.parametrize(("device", "host", "disk"), [(4, 2, 3), (3, 2, 2), (5, 1, 4)])
def test_tight_tiers_take_exactly_what_fits(device, host, disk):
    """Seeded random life cycles on tiers kept nearly full of suspended caches, where refusals
    are common: every acquire and allocate succeeds exactly when `fits` says so."""
    rng = random.Random(device * 100 + host * 10 + disk)
    pool = TieredPages(BlockRadixTree(TPB), device, host, disk)
    caches, storage = [], FakeStorage()
    for _ in range(1500):
        kind = rng.choice(["run", "run", "suspend", "suspend", "resume", "resume", "close"])
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 3 * TPB + 1))]
        args = {
            "run": (tokens, rng.randrange(3), rng.randrange(2)),
            "resume": (rng.randrange(10**6), rng.randrange(3)),
        }.get(kind, (rng.randrange(10**6), rng.random() < 0.3))
        step(pool, storage, caches, kind, args)
        pool.check_invariants()
        storage.apply(pool)
        for tier in pool.tiers:
            for page in pool.live_pages(tier):
                assert storage[tier, page.page_id] == id(page), page
