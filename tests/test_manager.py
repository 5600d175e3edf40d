"""KVCacheManager and KVCache scenarios, ported from the reference suite, with real bytes.

Every scenario writes per-token patterns into the pool (`FillCheckEngine`) and checks every history
token of every active cache, plus `check_invariants()`, after each operation.
"""

import math

import numpy as np
import pytest

from kvjax.cache import (
    NULL_PAGE,
    CacheConfig,
    CacheStatus,
    CommitState,
    KVCacheManager,
    MultimodalItem,
    OutOfPagesError,
    Tier,
    splice_multimodal_tokens,
)
from kvjax.cache.stats import BlockRemoved, BlockStored
from kvjax.runtime.storage import KVStorage
from tests.fill_check import FillCheckEngine
from tests.scopes import DISTINCT_SCOPES

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


def make(tpb=4, device=8, host=0, disk=0, disk_dir=None, **kwargs):
    config = CacheConfig(
        num_layers=2,
        num_kv_heads=1,
        head_dim=4,
        tokens_per_block=tpb,
        dtype="float32",
        device_pages=device,
        host_pages=host,
        disk_dir=disk_dir if disk else None,
        disk_pages=disk or None,
        **{k: v for k, v in kwargs.items() if k in ("enable_partial_reuse", "max_util_for_resume")},
    )
    storage = KVStorage.for_config(config)
    manager = KVCacheManager(config, storage, max_events=kwargs.get("max_events", 1024))
    return manager, FillCheckEngine(manager)


def start(manager, engine, tokens=None, **kwargs):
    cache = manager.create_kv_cache(tokens, **kwargs)
    engine.register(cache)
    assert cache.resume()
    engine.check_all()
    return cache


def prefill(engine, cache, tokens):
    """Computes and commits the prompt tokens the cache did not reuse."""
    assert engine.run_step(cache, list(tokens)[cache.num_committed_tokens :])
    engine.check_all()


def device_pages(cache):
    return [page.page_id for page in cache.pages() if page.tier is DEVICE]


def test_new_cache_is_suspended_and_holds_its_reused_prefix():
    manager, _ = make()
    cache = manager.create_kv_cache()
    assert cache.status is CacheStatus.SUSPENDED
    assert (cache.num_committed_tokens, cache.history_length, cache.capacity) == (0, 0, 0)
    assert cache.page_ids() == []
    cache.close()
    assert cache.status is CacheStatus.CLOSED
    manager.check_invariants()


def test_shrink_capacity_one_token_at_a_time():
    manager, engine = make(tpb=4, device=12)
    cache = start(manager, engine)
    prefill(engine, cache, range(5))
    assert cache.resize(capacity=40)
    assert cache.num_blocks == 10 and manager.pages.num_free(DEVICE) == 1
    engine.write(cache, list(range(100, 135)), start=5)  # speculative tokens past history
    for capacity in range(39, 4, -1):
        assert cache.resize(capacity=capacity)
        assert cache.num_blocks == math.ceil(capacity / 4)
        assert manager.pages.num_free(DEVICE) == 11 - cache.num_blocks
        engine.check_all()
    assert (cache.num_committed_tokens, cache.history_length, cache.capacity) == (5, 5, 5)


def test_small_quota_fails_cleanly_and_changes_nothing():
    manager, engine = make(tpb=4, device=4)
    assert manager.quota(DEVICE) == 4 * manager.config.page_bytes
    cache = start(manager, engine)
    prefill(engine, cache, range(12))
    before = (cache.capacity, cache.page_ids(), manager.pages.num_free(DEVICE))
    assert not cache.resize(capacity=13)
    assert (cache.capacity, cache.page_ids(), manager.pages.num_free(DEVICE)) == before
    engine.check_all()


@pytest.mark.parametrize("cold_tiers", ["host", "host+disk"])
def test_suspended_request_holds_no_device_page(tmp_path, cold_tiers):
    host, disk = (12, 0) if cold_tiers == "host" else (4, 8)
    manager, engine = make(tpb=4, device=5, host=host, disk=disk, disk_dir=tmp_path)
    caches = []
    for base in (0, 100, 200):  # each fills the whole device; the ones before move down
        if caches:
            caches[-1].suspend()
            assert caches[-1].page_ids() == [NULL_PAGE] * 4
        caches.append(start(manager, engine))
        prefill(engine, caches[-1], range(base, base + 16))
    first, second, third = caches
    assert {page.tier for page in first.pages()} == {DISK if disk else HOST}
    assert {page.tier for page in second.pages()} == {HOST}
    capacity, free = third.capacity, manager.pages.num_free(DEVICE)
    assert not third.resize(capacity=17)  # one token more than the device holds
    assert (third.capacity, manager.pages.num_free(DEVICE)) == (capacity, free)
    engine.check_all()
    assert not first.resume()  # the device is all locked by the third
    third.suspend()
    assert first.resume()  # straight back from the coldest tier: its bytes are checked
    engine.check_all()
    assert manager.stats.onboarded_pages == 4


def test_reuse_ending_mid_block_copies_on_first_resume():
    manager, engine = make(tpb=4, device=10)
    prompt = list(range(11))
    writer = start(manager, engine)
    prefill(engine, writer, prompt)
    writer.close()  # blocks [0..3] [4..7] [8..10] stay in the tree

    reader = manager.create_kv_cache(prompt[:6])
    assert reader.num_reused_tokens == 6
    engine.register(reader)
    shared = reader.pages()[1]
    assert shared.is_committed
    assert reader.resume()
    private = reader.pages()[1]
    assert private is not shared and not private.is_committed
    assert manager.stats.copied_pages == 1 and manager.stats.partially_reused_blocks == 1
    engine.check_all()  # positions 4 and 5 came over by the copy
    assert engine.run_step(reader, [900, 901])  # diverges inside block 1, in its own page
    engine.check_all()

    again = start(manager, engine, prompt)  # the writer's bytes at positions 6 and 7 survived
    assert again.num_reused_tokens == 11


def test_partial_block_not_rebased_onto_a_full_tree_block():
    """The seed PR's regression: B's partial block must not take A's full page."""
    manager, engine = make(tpb=8, device=12)
    tokens = list(range(1, 17))
    a0 = start(manager, engine)
    prefill(engine, a0, tokens[:13])
    a0.stop_committing()
    a = start(manager, engine)
    prefill(engine, a, tokens)  # block 1 full; replaces a0's partial block in the tree
    b = manager.create_kv_cache(tokens[:12])
    assert b.num_reused_tokens == 12
    engine.register(b)
    assert b.resume()
    prefill(engine, b, tokens[:13])
    b.stop_committing()
    assert not b.pages()[1].is_committed  # kept its private page
    assert b.page_ids()[1] not in a.page_ids()
    assert b.resize(capacity=15)
    engine.write(b, [700, 701], start=13)  # offsets 5 and 6 of block 1
    b.resize(history_length=15)
    engine.check_all()  # A's bytes at offsets 5 and 6 are unchanged


def test_identical_full_blocks_rebase_onto_the_tree_page():
    manager, engine = make(tpb=4, device=8)
    first, second = start(manager, engine), start(manager, engine)
    for cache in (first, second):
        assert cache.resize(capacity=8)
        engine.write(cache, list(range(8)))
    first.commit(list(range(8)))
    free = manager.pages.num_free(DEVICE)
    second.commit(list(range(8)))
    assert second.page_ids() == first.page_ids()
    assert manager.pages.num_free(DEVICE) == free + 2
    assert manager.stats.rebased_blocks == 2
    engine.check_all()


def test_scope_isolation():
    manager, engine = make(tpb=4, device=16)
    prompt = list(range(8))
    for scope in DISTINCT_SCOPES:
        kwargs = {"lora_id": scope.lora_id, "salt": scope.salt}
        assert manager.probe_reuse(prompt, **kwargs) == 0
        cache = start(manager, engine, **kwargs)
        prefill(engine, cache, prompt)
        cache.close()
        assert manager.probe_reuse(prompt, **kwargs) == 8
    assert len(manager.pages.tree) == 2 * len(DISTINCT_SCOPES)


def test_multimodal_reuse_stops_where_the_image_differs():
    manager, engine = make(tpb=4, device=16)
    vocab = 1000
    prompt = [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 7, 8]  # six placeholders at 6..11
    first = splice_multimodal_tokens(prompt, [MultimodalItem.from_content(b"cat", 6, 6)], vocab)
    second = splice_multimodal_tokens(prompt, [MultimodalItem.from_content(b"dog", 6, 6)], vocab)
    cache = start(manager, engine)
    prefill(engine, cache, first)
    cache.close()
    assert manager.probe_reuse(first) == 14
    assert manager.probe_reuse(second) == 6
    reader = start(manager, engine, second)
    assert reader.num_reused_tokens == 6


def test_quota_resize_across_tiers(tmp_path):
    manager, engine = make(tpb=4, device=9, host=8, disk=8, disk_dir=tmp_path)
    for base in range(0, 60, 12):  # cached blocks on every tier
        cache = start(manager, engine)
        prefill(engine, cache, range(base, base + 12))
        cache.close()
    a, b = start(manager, engine), start(manager, engine)
    prefill(engine, a, range(200, 216))
    prefill(engine, b, range(300, 316))
    b.suspend()
    a.suspend()
    assert manager.resize_quota(DEVICE, num_pages=5)
    assert manager.resize_quota(HOST, num_pages=2)
    assert manager.resize_quota(DISK, num_pages=6)
    assert manager.stats.dropped_blocks > 0
    manager.check_invariants()
    assert not manager.resize_quota(DISK, num_pages=1)  # 8 held pages, room for 4 + 2 + 1
    assert manager.quota(DISK) == 6 * manager.config.page_bytes
    assert a.resume()
    assert not b.resume()
    engine.check_all()
    a.suspend()
    for tier, num_pages in ((DEVICE, 9), (HOST, 8), (DISK, 8)):
        assert manager.resize_quota(tier, num_pages=num_pages)
    assert a.resume() and b.resume()
    engine.check_all()


def test_page_table_and_sizes():
    manager, engine = make(tpb=4, device=9)
    assert manager.clamp_max_seq_len(1, 1000) == 32
    assert manager.clamp_max_seq_len(3, 1000) == 24
    assert manager.clamp_max_seq_len(1, 10) == 10
    # clamped to 32 first, then + 2 extra + 3 draft + 1 decode token: 38 tokens, 10 blocks
    assert manager.max_blocks_per_seq(1000, 2, 3) == 10
    assert manager.max_blocks == 9
    caches = [start(manager, engine) for _ in range(2)]
    prefill(engine, caches[0], range(6))
    prefill(engine, caches[1], range(50, 55))
    table = manager.page_table(caches, 4)
    assert table.shape == (4, 9) and table.dtype.name == "int32"
    assert table[0, :2].tolist() == caches[0].page_ids() and not table[0, 2:].any()
    assert table[1, :2].tolist() == caches[1].page_ids() and not table[2:].any()
    assert manager.get_batch_cache_indices(caches) == [c.page_ids() for c in caches]


def test_events_and_stats():
    manager, engine = make(tpb=4, device=5, max_events=4)
    cache = start(manager, engine)
    prefill(engine, cache, range(10))
    cache.close()
    events = manager.take_events()
    assert [type(e) for e in events] == [BlockStored] * 3
    assert events[1].parent_key == events[0].key and events[2].tokens == (8, 9)
    assert events[0].parent_key == manager.pages.tree.roots()[0].key
    assert manager.stats.stored_blocks == 3 and manager.stats.missed_blocks == 0
    reader = start(manager, engine, [*range(9), 77])
    assert manager.stats.reused_blocks == 3 and manager.stats.missed_blocks == 0
    assert manager.stats.hit_rate == 1.0
    reader.close()
    manager.clear_reusable_blocks()
    assert {type(e) for e in manager.take_events()} == {BlockRemoved}
    for round_ in range(3):  # 6 stored events into a buffer of 4
        cache = start(manager, engine)
        prefill(engine, cache, range(round_ * 8, round_ * 8 + 8))
        cache.close()
    assert manager.num_lost_events > 0 and len(manager.take_events()) == 4


def test_close_leaves_committed_blocks_droppable_and_frees_private_pages():
    manager, engine = make(tpb=4, device=8)
    cache = start(manager, engine)
    prefill(engine, cache, range(6))
    assert cache.resize(capacity=12)
    cache.close()
    assert manager.pages.num_free(DEVICE) == 7 - 2  # block 0 full, block 1 partial stay cached
    assert manager.pages.num_evictable(DEVICE) == 2
    manager.check_invariants()
    manager.clear_reusable_blocks()
    assert manager.pages.num_free(DEVICE) == 7
    manager.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        manager.create_kv_cache()


def test_misuse_raises_and_changes_nothing():
    manager, engine = make(tpb=4, device=8)
    cache = manager.create_kv_cache()
    engine.register(cache)
    with pytest.raises(RuntimeError, match=r"resize.*SUSPENDED"):
        cache.resize(capacity=4)
    with pytest.raises(RuntimeError, match=r"commit.*SUSPENDED"):
        cache.commit([1])
    with pytest.raises(RuntimeError, match=r"suspend.*SUSPENDED"):
        cache.suspend()
    assert cache.resume()
    prefill(engine, cache, range(6))
    state = (cache.num_committed_tokens, cache.history_length, cache.capacity, cache.page_ids())
    with pytest.raises(ValueError, match="capacity=3 must be >= history_length=6"):
        cache.resize(capacity=3)
    with pytest.raises(ValueError, match="history_length=2 must not decrease below 6"):
        cache.resize(history_length=2)
    with pytest.raises(ValueError, match=r"makes 7 > capacity=6"):
        cache.commit([1])
    with pytest.raises(ValueError, match="token -1 at index 6"):
        cache.commit([-1])
    with pytest.raises(RuntimeError, match="resize_quota needs every cache suspended"):
        manager.resize_quota(DEVICE, num_pages=4)
    with pytest.raises(RuntimeError, match="shutdown with 1 caches still open"):
        manager.shutdown()
    with pytest.raises(ValueError, match="is not configured"):
        cache.suspend() or manager.resize_quota(HOST, num_pages=4)
    assert cache.resume()
    assert state == (
        cache.num_committed_tokens,
        cache.history_length,
        cache.capacity,
        cache.page_ids(),
    )
    cache.stop_committing()
    cache.stop_committing()  # idempotent
    with pytest.raises(RuntimeError, match="after stop_committing"):
        cache.commit([1])
    with pytest.raises(ValueError, match="priority"):
        manager.create_kv_cache(priority=101)
    with pytest.raises(ValueError, match="batch_size=9"):
        manager.clamp_max_seq_len(9, 10)
    cache.close()
    cache.close()  # idempotent
    for operation in (cache.resume, cache.stop_committing, lambda: cache.resize(4)):
        with pytest.raises(RuntimeError, match="CLOSED"):
            operation()
    with pytest.raises(ValueError, match="not a live cache"):
        manager.page_table([cache], 1)
    engine.check_all()
    assert manager.pages.num_free(DEVICE) + manager.pages.num_evictable(DEVICE) == 7


def test_host_tier_is_provisioned_automatically_unless_turned_off():
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, device_pages=6)
    manager = KVCacheManager(config, KVStorage.for_config(config))
    # min(device quota, half of the available host memory): a test machine has far more than 6.
    assert manager.pages.tiers == (DEVICE, HOST) and manager.pages.num_pages(HOST) == 6
    assert manager.storage.host.shape == (6, *config.page_shape)
    storage = KVStorage.for_config(config, auto_host_tier=False)
    assert KVCacheManager(config, storage).pages.tiers == (DEVICE,)
    explicit = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, device_pages=6, host_pages=0)
    assert KVCacheManager(explicit, KVStorage.for_config(explicit)).pages.tiers == (DEVICE,)


def test_caches_that_fill_a_device_without_colder_tiers_resume_again():
    manager, engine = make(tpb=4, device=9)  # no host tier: suspended pages stay on the device
    first, second = start(manager, engine), start(manager, engine)
    prefill(engine, first, range(16))
    prefill(engine, second, range(100, 116))
    first.suspend()
    second.suspend()
    assert manager.pages.utilization() == 1.0
    assert first.resume() and second.resume()  # they take no new page, so they always may
    engine.check_all()


def test_commit_token_forms_and_the_length_setters():
    manager, engine = make(tpb=4, device=9)
    cache = start(manager, engine)
    with pytest.raises(ValueError, match="is not a token sequence"):
        cache.commit(bytes(range(32)))  # a digest must be wrapped: [digest]
    cache.capacity = 6
    engine.write(cache, [5, 6, 7, 8, 9, bytes(range(32))])
    cache.commit(np.array([5, 6, 7, 8, 9]))
    cache.commit([bytes(range(32))])
    assert cache.committed_tokens == (5, 6, 7, 8, 9, bytes(range(32)))
    assert all(type(token) is int for token in cache.committed_tokens[:5])
    cache.history_length = 6
    engine.check_all()
    with pytest.raises(ValueError, match=r"capacity=37 needs 10 blocks > max_blocks=9"):
        cache.capacity = 37
    other = start(manager, engine)
    other.capacity = 24  # the 6 remaining pages
    with pytest.raises(OutOfPagesError, match="capacity=25"):
        other.capacity = 25
    assert other.capacity == 24
    with pytest.raises(ValueError, match="33 lookup tokens exceed max_seq_len=32"):
        manager.create_kv_cache(list(range(33)))
    engine.check_all()


def test_max_seq_len_follows_the_device_quota():
    manager, _ = make(tpb=4, device=9)
    assert (manager.max_seq_len, manager.max_blocks) == (32, 9)
    assert manager.resize_quota(DEVICE, num_pages=17)
    assert (manager.max_seq_len, manager.max_blocks) == (64, 17)
    storage = KVStorage.for_config(manager.config)
    explicit = KVCacheManager(manager.config, storage, max_seq_len=20, max_total_draft_tokens=3)
    assert (explicit.max_seq_len, explicit.max_blocks) == (20, 6)
    with pytest.raises(ValueError, match="max_seq_len=0 must be >= 1"):
        KVCacheManager(manager.config, storage, max_seq_len=0)
    with pytest.warns(UserWarning, match="max_seq_len=100 is clamped to 32"):
        assert KVCacheManager(manager.config, storage, max_seq_len=100).max_seq_len == 32
    with pytest.raises(ValueError, match=r"num_bytes=10 must be >= \d+"):
        manager.resize_quota(DEVICE, num_bytes=10)


def test_resume_refuses_above_max_util_for_resume():
    manager, engine = make(tpb=4, device=5, host=4, max_util_for_resume=0.5)
    busy, waiting = start(manager, engine), start(manager, engine)
    prefill(engine, busy, range(12))
    prefill(engine, waiting, range(50, 54))
    waiting.suspend()  # its page stays on the device but becomes evictable
    assert manager.pages.utilization() == 0.75
    assert not waiting.resume() and waiting.status is CacheStatus.SUSPENDED
    busy.suspend()
    assert waiting.resume()
    engine.check_all()


def test_given_storage_must_match_the_config():
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, device_pages=6, host_pages=2)
    storage = KVStorage(config.page_shape, config.dtype, 6, 2)
    assert KVCacheManager(config, storage).storage is storage
    with pytest.raises(ValueError, match="storage has 0 HOST pages; config needs 2"):
        KVCacheManager(config, KVStorage(config.page_shape, config.dtype, 6))
    with pytest.raises(ValueError, match="storage has 7 DEVICE pages; config needs 6"):
        KVCacheManager(config, KVStorage(config.page_shape, config.dtype, 7, 2))


def test_moves_digest_follows_the_page_moves():
    """Managers that moved the same pages in the same order have equal digests (what processes
    of a mesh compare); any other move sequence gives another."""

    def run(bases):
        manager, engine = make(tpb=4, device=5, host=12)
        digests = [manager.moves_digest]
        caches = []
        for base in bases:  # each fills the device: the one before moves to the host
            if caches:
                caches[-1].suspend()
            caches.append(start(manager, engine))
            prefill(engine, caches[-1], range(base, base + 16))
            digests.append(manager.moves_digest)
        caches[-1].suspend()
        assert caches[0].resume()  # back from the host
        digests.append(manager.moves_digest)
        return digests

    first, again = run((0, 100, 200)), run((0, 100, 200))
    assert first == again
    assert len(set(first)) > 2  # offloads and the onload each changed it
    assert run((0, 100))[-1] != first[-1]


def test_check_no_leaks_names_open_caches_and_held_pages():
    manager, engine = make(tpb=4, device=8, host=4)
    cache = start(manager, engine)
    prefill(engine, cache, range(10))
    with pytest.raises(AssertionError, match="1 caches are still open"):
        manager.check_no_leaks()
    cache.suspend()
    with pytest.raises(AssertionError, match="still open"):
        manager.check_no_leaks()
    cache.close()
    manager.check_no_leaks()  # 2 full blocks and the partial one stay cached: not leaked
    assert manager.pages.num_evictable(DEVICE) == 3
    manager.clear_reusable_blocks()
    manager.check_no_leaks()
    assert manager.pages.num_free(DEVICE) == manager.pages.num_usable(DEVICE) == 7


def test_a_colliding_commit_stops_committing_and_keeps_every_invariant(monkeypatch):
    import kvjax.cache.radix_tree as radix_tree
    from tests.test_radix_tree import ConstantHasher

    manager, engine = make(tpb=4, device=8)
    first = start(manager, engine)
    prefill(engine, first, [1, 2, 3, 4, 5])
    (block,) = manager.pages.tree.iter_blocks()
    monkeypatch.setattr(radix_tree, "BlockHasher", lambda: ConstantHasher(block.key))
    second = start(manager, engine)
    prefill(engine, second, [6, 7, 8, 9, 10])  # its first block collides with [1, 2, 3, 4]
    monkeypatch.undo()
    assert second.commit_state is CommitState.VIRTUAL_STOP
    assert second.num_committed_tokens == 5 and len(manager.pages.tree) == 1
    manager.check_invariants()
    third = manager.create_kv_cache([6, 7, 8, 9, 10])
    assert third.num_reused_tokens == 0  # the other block's KV is never served
    for cache in (first, second, third):
        cache.close()
    manager.check_no_leaks()


def test_a_partial_reuse_resume_needs_no_more_device_pages_than_the_cold_run():
    """A 38-token prompt on 5 usable pages of 8 tokens: cold it takes 5 pages; warm, the match
    ends mid-block, and copying the shared page would take a 6th. The resume then reuses the
    full blocks only (the issue's repro: served once, the same prompt could never run again)."""
    manager, engine = make(tpb=8, device=6, host=8)
    prompt = list(range(1, 39))
    cold = start(manager, engine, prompt[:-1])
    assert cold.resize(capacity=38)
    prefill(engine, cold, prompt)
    cold.close()
    warm = manager.create_kv_cache(prompt[:-1])
    engine.register(warm)
    assert warm.num_reused_tokens == 37  # 4 full blocks and 5 tokens of the partial one
    assert warm.resume()
    assert warm.num_committed_tokens == warm.num_reused_tokens == 32  # full blocks only
    assert warm.resize(capacity=38)
    engine.check_all()
    prefill(engine, warm, prompt)
    warm.close()
    manager.check_no_leaks()


def test_a_cache_dropped_without_close_is_released_with_a_warning():
    manager, engine = make(tpb=4, device=8, host=4)
    cache = start(manager, engine)
    prefill(engine, cache, range(10))
    del cache  # dropped, active and unclosed: its three pages stay locked until released
    with pytest.warns(ResourceWarning, match="dropped without close"):
        manager.check_invariants()
    assert manager.live_caches == []
    manager.check_no_leaks()  # its full blocks stay cached, the rest is free
    assert manager.pages.num_evictable(DEVICE) == 2


class DiskFaults:
    """Makes the disk tier's `pwrite` or `preadv` fail with EIO while `failing` is set."""

    def __init__(self, monkeypatch, call):
        import errno
        import os

        real, self.failing, self.num_failed = getattr(os, call), False, 0

        def faulty(*args):
            if self.failing:
                self.num_failed += 1
                raise OSError(errno.EIO, "Input/output error")
            return real(*args)

        monkeypatch.setattr(os, call, faulty)


def fill_device_three_times(manager, engine):
    """Three 4-block caches on a 4-page device: the first ends on the disk, the second on the
    host, the third on the device."""
    caches = []
    for base in (0, 100, 200):
        if caches:
            caches[-1].suspend()
        caches.append(start(manager, engine))
        prefill(engine, caches[-1], range(base, base + 16))
    return caches


def test_a_failed_disk_write_loses_those_pages_not_their_bytes(tmp_path, monkeypatch):
    faults = DiskFaults(monkeypatch, "pwrite")
    manager, engine = make(tpb=4, device=5, host=4, disk=8, disk_dir=tmp_path)
    faults.failing = True  # every write to the disk fails
    with pytest.warns(RuntimeWarning, match="4 pages lost"):
        first, second, third = fill_device_three_times(manager, engine)
    assert faults.num_failed == 4
    assert first.kv_lost and not second.kv_lost and not third.kv_lost
    assert manager.take_lost_caches() == [first] and manager.take_lost_caches() == []
    assert manager.stats.lost_pages == 4
    assert manager.probe_reuse(range(16)) == 0  # the tree forgot the unwritten blocks
    engine.check_all()  # every block still in the tree holds its bytes
    first.close()
    third.suspend()
    faults.failing = False
    again = start(manager, engine, list(range(16)))  # recomputed from scratch, then checked
    prefill(engine, again, range(16))
    for cache in (second, third, again):
        cache.close()
    manager.check_no_leaks()


def test_a_failed_disk_read_loses_the_pages_it_brought_up(tmp_path, monkeypatch):
    faults = DiskFaults(monkeypatch, "preadv")
    manager, engine = make(tpb=4, device=5, host=4, disk=8, disk_dir=tmp_path)
    first, second, third = fill_device_three_times(manager, engine)
    third.suspend()
    faults.failing = True
    with pytest.warns(RuntimeWarning, match="pages lost"):
        assert first.resume()  # comes back from the disk: no read lands
    assert first.kv_lost and manager.take_lost_caches() == [first]
    assert manager.probe_reuse(range(16)) == 0
    faults.failing = False
    engine.check_all()  # second and third moved around first: their bytes are intact
    for cache in (first, second, third):
        cache.close()
    manager.check_no_leaks()
    engine.check_all()
