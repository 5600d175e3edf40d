import pytest

from kvjax.cache import (
    BlockRadixTree,
    InsertOutcome,
    PageMove,
    PageStatus,
    ReuseScope,
    Tier,
    TieredPages,
)

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK
SCOPE = ReuseScope()


def make(tpb=1, device=4, host=0, disk=0):
    return TieredPages(BlockRadixTree(tpb), device, host, disk)


def commit_chain(pool, pages, tokens):
    """Commits `tokens` block by block into `pages` like a cache; returns the blocks."""
    tpb, parent, blocks = pool.tree.tokens_per_block, SCOPE, []
    for page, start in zip(pages, range(0, len(tokens), tpb), strict=True):
        result = pool.commit(page, parent, tokens[start : start + tpb])
        assert result.outcome is InsertOutcome.NEW
        parent = result.block
        blocks.append(parent)
    pool.check_invariants()
    return blocks


def close(pool, pages):
    """Releases pages last to first, as a closing cache does, so leaves are evicted first."""
    for page in reversed(pages):
        pool.unlock(page)
        pool.release(page)
    pool.check_invariants()


def ids(pages):
    return [page.page_id for page in pages]


def state(pool):
    return (
        {tier: (pool.num_free(tier), ids(pool.eviction_order(tier))) for tier in pool.tiers},
        len(pool.tree),
        pool.num_dropped_blocks,
    )


def test_committed_pages_stay_cached_and_leaves_are_dropped_first():
    pool = make(tpb=2, device=5)
    pages = pool.allocate(3)
    assert ids(pages) == [1, 2, 3]
    assert all(page.status is PageStatus.LOCKED for page in pages)
    commit_chain(pool, pages, [1, 2, 3, 4, 5])
    close(pool, pages)
    assert all(page.status is PageStatus.DROPPABLE for page in pages)
    assert ids(pool.eviction_order(DEVICE)) == [3, 2, 1]
    assert ids(pool.allocate(2)) == [4, 3]  # page 3 (the partial leaf) was dropped
    assert pool.num_dropped_blocks == 1
    assert pool.tree.match(SCOPE, [1, 2, 3, 4, 5]).num_tokens == 4
    pool.check_invariants()


def test_dropping_a_block_frees_its_subtree_in_order():
    pool = make(tpb=2, device=5)
    pages = pool.allocate(3)
    commit_chain(pool, pages, [1, 2, 3, 4, 5])
    for page in pages:  # released first to last: the root block is the oldest
        pool.unlock(page)
        pool.release(page)
    assert ids(pool.allocate(2)) == [4, 1]  # dropping block 0 freed pages 1, 2, 3 in that order
    assert pool.num_dropped_blocks == 3 and len(pool.tree) == 0
    assert pool.num_free(DEVICE) == 2
    pool.check_invariants()


def test_eviction_cascades_device_to_host_to_disk_with_ordered_moves():
    pool = make(tpb=1, device=4, host=2, disk=2)
    pages = pool.allocate(3)
    blocks = commit_chain(pool, pages, [10, 11, 12])
    close(pool, pages)
    first = pool.allocate(1)
    assert ids(first) == [3]
    assert pool.take_moves() == [PageMove(DEVICE, 3, HOST, 0)]
    second = pool.allocate(2)
    assert ids(second) == [2, 1]
    assert pool.take_moves() == [
        PageMove(HOST, 0, DISK, 0),  # runs first: it vacates host page 0
        PageMove(DEVICE, 2, HOST, 1),
        PageMove(DEVICE, 1, HOST, 0),
    ]
    assert [(b.page.tier, b.page.page_id) for b in blocks] == [(HOST, 0), (HOST, 1), (DISK, 0)]
    assert pool.tree.match(SCOPE, [10, 11, 12]).num_tokens == 3  # nothing was dropped
    assert pool.allocate(1) is None  # device is all locked
    pool.check_invariants()
    close(pool, first + second)  # uncommitted pages are simply freed
    assert pool.num_free(DEVICE) == 3 and pool.take_moves() == []
    pool.check_invariants()


def test_last_tier_drops_droppable_pages_and_refuses_held_ones():
    pool = make(tpb=1, device=3, host=1)
    cached = pool.allocate(1)
    commit_chain(pool, cached, [7])
    close(pool, cached)
    suspended = pool.allocate(1)
    commit_chain(pool, suspended, [8])
    pool.unlock(suspended[0])  # HELD: may go to the host, never be dropped
    assert ids(pool.eviction_order(DEVICE)) == [1, 2]
    assert ids(pool.allocate(1)) == [1]
    assert pool.take_moves() == [PageMove(DEVICE, 1, HOST, 0)]
    assert ids(pool.allocate(1)) == [2]  # host's droppable page 0 was dropped for the held one
    assert pool.take_moves() == [PageMove(DEVICE, 2, HOST, 0)]
    assert pool.num_dropped_blocks == 1 and pool.tree.match(SCOPE, [7]).num_tokens == 0
    assert suspended[0].tier is HOST and suspended[0].status is PageStatus.HELD
    assert pool.eviction_order(HOST) == []  # HELD on the last tier: not evictable
    assert pool.make_room(DEVICE, 1) is False
    pool.check_invariants()


def test_device_only_pool_never_evicts_held_pages():
    pool = make(tpb=1, device=3)
    pages = pool.allocate(2)
    commit_chain(pool, pages, [1, 2])
    for page in pages:
        pool.unlock(page)
    assert pool.eviction_order(DEVICE) == []
    assert pool.allocate(1) is None
    pool.check_invariants()


def test_failed_make_room_changes_nothing():
    pool = make(tpb=1, device=4, host=2)
    pages = pool.allocate(3)
    commit_chain(pool, pages, [1, 2, 3])
    close(pool, pages[1:])
    pool.unlock(pages[0])
    before = state(pool)
    assert pool.make_room(DEVICE, 4) is False
    assert pool.allocate(4) is None
    assert state(pool) == before and pool.take_moves() == []
    pool.check_invariants()


def test_drops_droppable_pages_in_place_when_colder_tiers_are_full_of_held_pages():
    pool = make(tpb=1, device=3, host=1)
    suspended = pool.allocate(1)
    commit_chain(pool, suspended, [10])
    pool.unlock(suspended[0])
    cached = pool.allocate(1)
    pool.commit(cached[0], SCOPE, [20])
    close(pool, cached)
    assert pool.make_room(DEVICE, 2) is True
    assert pool.take_moves() == [PageMove(DEVICE, 1, HOST, 0)]
    assert pool.num_free(DEVICE) == 2 and pool.num_dropped_blocks == 1
    assert pool.tree.match(SCOPE, [20]).num_tokens == 0
    assert pool.tree.match(SCOPE, [10]).num_tokens == 1
    pool.check_invariants()


def test_lower_priority_is_evicted_first():
    pool = make(tpb=1, device=4)
    high = pool.allocate(1, priority=80)
    low = pool.allocate(1, priority=10)
    default = pool.allocate(1)
    for page, token in zip(high + low + default, (1, 2, 3), strict=True):
        pool.commit(page, SCOPE, [token])
        close(pool, [page])
    assert [page.priority for page in pool.eviction_order(DEVICE)] == [10, 35, 80]
    assert ids(pool.allocate(1)) == [2]


def test_new_holder_refreshes_recency_and_last_release_requeues():
    pool = make(tpb=1, device=4)
    pages = pool.allocate(2)
    pool.commit(pages[0], SCOPE, [1])
    pool.commit(pages[1], SCOPE, [2])
    close(pool, pages)
    assert ids(pool.eviction_order(DEVICE)) == [2, 1]
    pool.hold(pages[1])  # a suspended cache reuses block [2]: HELD on the last tier
    assert ids(pool.eviction_order(DEVICE)) == [1]
    pool.release(pages[1])  # cached again, now the most recent
    assert ids(pool.eviction_order(DEVICE)) == [1, 2]
    pool.hold(pages[0])
    assert pool.acquire([pages[0]]) == []
    assert ids(pool.eviction_order(DEVICE)) == [2]
    pool.check_invariants()


def test_replaced_partial_block_page_is_an_orphan_until_released():
    pool = make(tpb=2, device=4)
    partial = pool.allocate(1)
    pool.commit(partial[0], SCOPE, [1])
    full = pool.allocate(1)
    result = pool.commit(full[0], SCOPE, [1, 2])
    assert result.replaced == (partial[0].block,)
    assert partial[0].is_committed and not partial[0].is_cached
    pool.check_invariants()
    close(pool, partial)  # an orphan is freed, not cached
    assert pool.num_free(DEVICE) == 2 and partial[0].block is None
    close(pool, full)
    assert ids(pool.eviction_order(DEVICE)) == [2]
    pool.check_invariants()


def test_drop_block_and_clear():
    pool = make(tpb=1, device=5)
    pages = pool.allocate(3)
    blocks = commit_chain(pool, pages, [1, 2, 3])
    close(pool, pages[2:])
    removed = pool.drop_block(blocks[1])
    assert removed == blocks[1:]
    assert pool.num_free(DEVICE) == 2  # page 3 freed; page 2 is held, so an orphan
    close(pool, pages[:2])
    assert pool.num_free(DEVICE) == 3
    assert len(pool.clear()) == 1 and pool.num_free(DEVICE) == 4
    pool.check_invariants()


def test_misuse_raises_and_changes_nothing():
    pool = make(tpb=1, device=3, host=2)
    pages = pool.allocate(2)
    commit_chain(pool, pages[:1], [1])
    with pytest.raises(ValueError, match="unlock it first"):
        pool.release(pages[0])
    with pytest.raises(ValueError, match="no unlocked holder to lock"):
        pool.acquire([pages[0]])
    with pytest.raises(ValueError, match="already committed"):
        pool.commit(pages[0], SCOPE, [2])
    close(pool, pages[1:])
    with pytest.raises(ValueError, match="not a live page"):
        pool.hold(pages[1])
    pool.unlock(pages[0])
    with pytest.raises(ValueError, match="is not locked"):
        pool.unlock(pages[0])
    pool.make_room(DEVICE, 2)
    assert pages[0].tier is HOST
    assert pool.acquire([pages[0]]) == [] and pages[0].tier is DEVICE  # brought back up
    pool.unlock(pages[0])
    with pytest.raises(ValueError, match="count=-1"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="priority=101"):
        pool.allocate(1, priority=101)
    with pytest.raises(ValueError, match="num_device_pages=1"):
        make(device=1)
    pool.check_invariants()


def test_utilization_counts_free_and_evictable_as_available():
    pool = make(tpb=1, device=5)
    pages = pool.allocate(3)
    assert pool.utilization() == 0.75
    pool.commit(pages[0], SCOPE, [1])
    close(pool, pages[:1])
    assert pool.utilization() == 0.5


def test_colder_room_is_used_before_dropping():
    """Two cached blocks must leave a full device; the host has one free page: one moves."""
    pool = make(tpb=1, device=3, host=1)
    pages = pool.allocate(2)
    pool.commit(pages[0], SCOPE, [1])
    pool.commit(pages[1], SCOPE, [2])
    close(pool, pages)  # LRU [2, 1]: block [2] is the least recent
    assert pool.make_room(DEVICE, 2)
    assert pool.take_moves() == [PageMove(DEVICE, 1, HOST, 0)]  # the more recent one is kept
    assert pool.tree.match(SCOPE, [1]).num_tokens == 1
    assert pool.tree.match(SCOPE, [2]).num_tokens == 0
    pool.check_invariants()


def test_colder_tier_sheds_its_low_priority_block_for_a_warmer_victim():
    pool = make(tpb=1, device=3, host=1)
    low = pool.allocate(1, priority=0)
    pool.commit(low[0], SCOPE, [1])
    close(pool, low)
    assert pool.make_room(DEVICE, 2) and low[0].tier is HOST
    high = pool.allocate(2, priority=100)
    pool.commit(high[0], SCOPE, [2])
    pool.commit(high[1], SCOPE, [3])
    close(pool, high[::-1])  # LRU [2, 3]
    pool.take_moves()
    kept = high[1].page_id
    assert pool.make_room(DEVICE, 2)
    assert pool.take_moves() == [PageMove(DEVICE, kept, HOST, 0)]
    cached = [pool.tree.match(SCOPE, [token]).num_tokens for token in (1, 2, 3)]
    assert cached == [0, 0, 1]  # the priority-0 block went, one priority-100 block stayed
    pool.check_invariants()


def test_moves_before_drops_so_pruning_below_saves_cached_blocks():
    pool = make(tpb=1, device=4, host=1)
    parent, child = pool.allocate(2)
    commit_chain(pool, [parent, child], [5, 6])
    for page in (parent, child):  # released first to last: LRU [parent, child]
        pool.unlock(page)
        pool.release(page)
    assert pool.make_room(DEVICE, 2) and parent.tier is HOST
    suspended, cached = pool.allocate(2)
    pool.commit(suspended, SCOPE, [7])
    pool.unlock(suspended)  # HELD: must move, never be dropped
    pool.commit(cached, SCOPE, [8])
    close(pool, [cached])
    pool.hold(child)
    pool.release(child)  # device LRU [suspended, cached, child]; host [parent]
    pool.take_moves()
    assert pool.make_room(DEVICE, 2)
    # Room on the host for the HELD page drops [5], which prunes [5, 6] from the device: that
    # is enough, so the cached block [8] survives.
    assert pool.num_free(DEVICE) == 2 and suspended.tier is HOST
    assert pool.tree.match(SCOPE, [8]).num_tokens == 1
    assert pool.num_dropped_blocks == 2
    pool.check_invariants()


def test_pruned_victims_are_not_counted_as_moves():
    """A drop on the colder tier prunes a victim already chosen to move: others must replace it."""
    pool = make(tpb=1, device=5, disk=3)
    chain = pool.allocate(3)
    a, b, c = commit_chain(pool, chain, [1, 2, 3])
    close(pool, chain)
    pool.hold(chain[2])
    pool.release(chain[2])  # LRU [b, a, c]
    assert pool.make_room(DEVICE, 3)  # b and a go to the disk; c stays
    assert (a.page.tier, b.page.tier, c.page.tier) == (DISK, DISK, DEVICE)
    held = pool.allocate(3)
    for page in held:
        pool.unlock(page)  # device full: c, then three HELD pages
    pool.take_moves()
    first_two = ids(held[:2])
    assert pool.make_room(DEVICE, 3)
    assert pool.num_free(DEVICE) == 3
    assert not c.is_attached and not b.is_attached and a.is_attached  # dropping b pruned c
    assert [move.src_page for move in pool.take_moves()] == first_two
    pool.check_invariants()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda pool: pool.allocate(1.5), "count=1.5"),
        (lambda pool: pool.allocate(True), "count=True"),
        (lambda pool: pool.make_room(DEVICE, -3), "count=-3"),
        (lambda pool: pool.make_room(DISK, 1), "DISK is not configured"),
        (lambda pool: pool.num_free(DISK), "DISK is not configured"),
        (lambda pool: pool.hold(object()), "not a live page"),
        (lambda pool: pool.drop_block(pool.tree.roots()[0]), "not a block"),
        (lambda pool: TieredPages(pool.tree, 4.5), "num_device_pages=4.5"),
        (lambda pool: TieredPages(pool.tree, 4, 2.5), "num_host_pages=2.5"),
        (lambda pool: TieredPages(None, 4), "not a BlockRadixTree"),
    ],
)
def test_bad_arguments_raise_value_error_and_change_nothing(call, message):
    pool = make(tpb=1, device=3, host=1)
    pages = pool.allocate(2)
    commit_chain(pool, pages, [1, 2])
    close(pool, pages)
    before = state(pool)
    with pytest.raises(ValueError, match=message):
        call(pool)
    assert state(pool) == before
    pool.check_invariants()


def suspend(pool, pages):
    for page in reversed(pages):
        pool.unlock(page)
    pool.check_invariants()


def test_acquire_brings_held_pages_back_and_evicts_others():
    pool = make(device=4, host=5)  # device pages 1..3 usable
    mine = pool.allocate(2)
    suspend(pool, mine)
    other = pool.allocate(3)  # the tail of mine leaves first
    assert [(p.tier, p.page_id) for p in mine] == [(HOST, 1), (HOST, 0)]
    assert pool.take_moves() == [PageMove(DEVICE, 2, HOST, 0), PageMove(DEVICE, 1, HOST, 1)]
    assert ids(other) == [3, 2, 1]
    suspend(pool, other)
    new = pool.acquire(mine, 1)
    pool.check_invariants()
    assert [(p.tier, p.page_id, p.status) for p in mine] == [
        (DEVICE, 1, PageStatus.LOCKED),
        (DEVICE, 2, PageStatus.LOCKED),
    ]
    assert ids(new) == [3] and new[0].status is PageStatus.LOCKED
    assert [p.tier for p in other] == [HOST] * 3
    assert pool.take_moves() == [
        PageMove(DEVICE, 1, HOST, 2),
        PageMove(DEVICE, 2, HOST, 3),
        PageMove(DEVICE, 3, HOST, 4),
        PageMove(HOST, 1, DEVICE, 1),
        PageMove(HOST, 0, DEVICE, 2),
    ]
    before = state(pool)
    assert pool.acquire(other) is None  # the device is all locked: nothing changes
    assert state(pool) == before and pool.take_moves() == []
    pool.record_copy(mine[0], new[0])
    assert pool.take_moves() == [PageMove(DEVICE, 1, DEVICE, 3)]
    with pytest.raises(ValueError, match="locked on the device to be copied"):
        pool.record_copy(other[0], new[0])
    with pytest.raises(ValueError, match="no unlocked holder"):
        pool.acquire(mine)
    with pytest.raises(ValueError, match="twice"):
        pool.acquire([other[0], other[0]])


def test_rising_pages_free_their_slots_for_the_pages_they_displace():
    pool = make(device=4, host=3)
    mine = pool.allocate(2)
    suspend(pool, mine)
    other = pool.allocate(3)
    suspend(pool, other)
    pool.take_moves()
    # One host page is free: one of other's pages goes there, mine[1] rises into its device
    # page, and the host page mine[1] left takes the next of other's pages.
    assert pool.acquire(mine) == []
    pool.check_invariants()
    assert [p.tier for p in mine] == [DEVICE, DEVICE]
    assert sorted(p.tier for p in other) == [DEVICE, HOST, HOST]
    moves = pool.take_moves()
    assert [(m.src_tier, m.dst_tier) for m in moves] == [
        (DEVICE, HOST),
        (HOST, DEVICE),
        (DEVICE, HOST),
        (HOST, DEVICE),
    ]
    assert moves[2].dst_page == moves[1].src_page  # the slot mine's first page vacated


def test_a_swap_between_full_tiers_is_refused_and_changes_nothing():
    pool = make(device=2, host=1)
    mine = pool.allocate(1)
    suspend(pool, mine)
    other = pool.allocate(1)  # mine goes to the host
    suspend(pool, other)
    pool.take_moves()
    before = state(pool)
    # Both pages would fit after a swap, but no page anywhere is free to stage it.
    assert pool.acquire(mine) is None
    assert state(pool) == before and pool.take_moves() == []


def test_pages_pushed_into_a_full_tier_continue_down():
    """Device full of suspended pages, a 2-page host, an empty disk: taking 3 pages at once
    ends where taking them one by one does."""

    def placed(one_by_one):
        pool = make(device=9, host=2, disk=32)
        held = pool.allocate(8)
        suspend(pool, held)
        taken = [pool.allocate(1) for _ in range(3)] if one_by_one else [pool.allocate(3)]
        assert all(pages is not None for pages in taken)
        pool.check_invariants()
        return [(p.tier, p.page_id if p.tier is DEVICE else None) for p in held]

    assert placed(one_by_one=False) == placed(one_by_one=True)
    assert [tier for tier, _ in placed(one_by_one=False)].count(DISK) == 1


def test_a_cache_spread_over_host_and_disk_resumes_when_the_tiers_have_room():
    pool = make(device=6, host=3, disk=4)
    mine = pool.allocate(5)
    suspend(pool, mine)
    other = pool.allocate(5)
    suspend(pool, other)
    assert {p.tier for p in mine} == {HOST, DISK}
    pool.take_moves()
    assert pool.acquire(mine) == []
    pool.check_invariants()
    assert all(p.tier is DEVICE and p.status is PageStatus.LOCKED for p in mine)
    assert sorted(p.tier for p in other) == [HOST] * 3 + [DISK] * 2


def test_resize_tier_relocates_survivors_and_evicts_the_rest():
    pool = make(tpb=1, device=6, host=4)
    cached = pool.allocate(3)  # device 1, 2, 3
    commit_chain(pool, cached, [1, 2, 3])
    close(pool, cached)
    held = pool.allocate(2)  # device 4, 5
    suspend(pool, held)
    assert pool.resize_tier(DEVICE, 3)  # 2 usable pages: the cached ones leave, held ones stay
    pool.check_invariants()
    assert pool.take_moves() == [
        PageMove(DEVICE, 3, HOST, 0),
        PageMove(DEVICE, 2, HOST, 1),
        PageMove(DEVICE, 1, HOST, 2),
        PageMove(DEVICE, 4, DEVICE, 2),
        PageMove(DEVICE, 5, DEVICE, 1),
    ]
    assert [(p.tier, p.page_id) for p in held] == [(DEVICE, 2), (DEVICE, 1)]
    assert pool.num_pages(DEVICE) == 3 and pool.num_free(DEVICE) == 0
    assert pool.resize_tier(HOST, 1)  # drops the two leaves; the root block moves to host page 0
    pool.check_invariants()
    assert pool.num_pages(HOST) == 1 and pool.num_dropped_blocks == 2
    assert pool.take_moves() == [PageMove(HOST, 2, HOST, 0)]
    assert pool.resize_tier(DEVICE, 8)
    assert pool.num_free(DEVICE) == 5
    pool.check_invariants()


def test_resize_tier_refuses_when_held_pages_would_not_fit():
    pool = make(tpb=1, device=4, host=1)
    held = pool.allocate(3)
    with pytest.raises(RuntimeError, match="is locked"):
        pool.resize_tier(DEVICE, 3)
    suspend(pool, held)
    before = state(pool)
    assert not pool.resize_tier(DEVICE, 2)  # 3 held pages, room for 1 here and 1 on host
    assert state(pool) == before and pool.num_pages(DEVICE) == 4 and pool.take_moves() == []
    with pytest.raises(ValueError, match="num_pages=1 must be >= 2"):
        pool.resize_tier(DEVICE, 1)


@pytest.mark.parametrize("host", [0, 2])
def test_hold_all_equals_holding_one_by_one_and_checks_every_page_first(host):
    """The batched hold of a prefix hit files each page exactly as `hold` does (held pages
    queue only where a colder tier can take them), and a bad page anywhere changes nothing."""
    pools = [make(tpb=1, device=4, host=host) for _ in range(2)]
    chains = []
    for pool in pools:
        pages = pool.allocate(3)
        commit_chain(pool, pages, [1, 2, 3])
        close(pool, pages)
        chains.append(pages)
    for _ in range(2):  # a second holder takes the fast path of pages already held
        pools[0].hold_all(chains[0])
        for page in chains[1]:
            pools[1].hold(page)
    for pool in pools:
        pool.check_invariants()
    assert [p.num_holders for p in chains[0]] == [p.num_holders for p in chains[1]] == [2] * 3
    for tier in pools[0].tiers:
        assert ids(pools[0].eviction_order(tier)) == ids(pools[1].eviction_order(tier))
    with pytest.raises(ValueError, match="not a live page"):
        pools[0].hold_all([chains[0][0], object(), chains[0][1]])
    assert [p.num_holders for p in chains[0]] == [2] * 3
    pools[0].check_invariants()
