"""Layer groups with pages of their own (`GroupedKVCacheManager`): the reference's layers (even
layers windowed with sinks, odd layers full attention) served by one manager per group. The
windowed group gives back stale pages while the full group keeps every block; both groups of a
sequence hold the same lengths, reuse the same prefix and grow or resume all or nothing. Every
step writes and checks real bytes in each group's pool (`FillCheckEngine`)."""

import pytest

from kvjax.cache import CacheConfig, CacheStatus, Tier
from kvjax.cache.grouped import GroupedKVCacheManager, group_configs
from kvjax.cache.life_cycles import LayerAttention
from kvjax.runtime.storage import KVStorage
from tests.fill_check import FillCheckEngine

TPB, WINDOW, SINKS = 4, 8, 2


def reference_layers(num_layers=4, window=WINDOW):
    return [LayerAttention(window, SINKS) if i % 2 == 0 else LayerAttention() for i in range(4)]


def make(device=40, host=0, max_seq_len=128, layers=None):
    config = CacheConfig(
        num_layers=4, num_kv_heads=1, head_dim=4, tokens_per_block=TPB, dtype="float32",
        device_pages=device, host_pages=host, layer_attention=layers or reference_layers(),
    )  # fmt: skip
    configs = group_configs(config, max_seq_len=max_seq_len, chunk_tokens=8)
    storages = [KVStorage.for_config(c) for c in configs]
    manager = GroupedKVCacheManager(configs, storages, max_seq_len=max_seq_len)
    return manager, Fill(manager)


class Fill:
    """A `FillCheckEngine` per group, driven as one."""

    def __init__(self, manager):
        self.manager = manager
        self.engines = [FillCheckEngine(m) for m in manager.managers]

    def start(self, tokens=None):
        cache = self.manager.create_kv_cache(tokens)
        for engine, group_cache in zip(self.engines, cache.caches, strict=True):
            engine.register(group_cache)
        assert cache.resume()
        self.check_all()
        return cache

    def step(self, cache, tokens, *, commit=True):
        if not cache.resize(max(cache.capacity, cache.history_length + len(tokens))):
            return False
        for engine, group_cache in zip(self.engines, cache.caches, strict=True):
            engine.write(group_cache, tokens)
        if commit:
            cache.commit(tokens)
        else:
            cache.resize(history_length=cache.history_length + len(tokens))
        self.check_all()
        return True

    def decode(self, cache, tokens):
        for token in tokens:
            assert self.step(cache, [token])

    def check_all(self):
        for engine in self.engines:
            engine.check_all()
        self.manager.check_invariants()


def test_groups_get_their_layers_and_a_quota_by_what_a_request_holds():
    config = CacheConfig(
        num_layers=4, num_kv_heads=1, head_dim=4, tokens_per_block=TPB, dtype="float32",
        device_pages=40, host_pages=20, layer_attention=reference_layers(),
    )  # fmt: skip
    windowed, full = group_configs(config, max_seq_len=128, chunk_tokens=8)
    assert windowed.layer_attention == (LayerAttention(WINDOW, SINKS),) * 2
    assert full.layer_attention is None and windowed.num_layers == full.num_layers == 2
    # A request holds 32 blocks under full attention and 1 + 4 + 1 under the window.
    assert (windowed.device_pages, full.device_pages) == (12, 67)
    assert windowed.page_bytes * 12 + full.page_bytes * 67 <= config.page_bytes * 40


def test_the_windowed_group_gives_back_stale_pages_while_the_full_group_keeps_them():
    manager, fill = make()
    cache = fill.start()
    fill.decode(cache, range(100))
    windowed, full = cache.caches
    assert len(windowed.held_pages()) == 3 and windowed.released_blocks == range(1, 23)
    assert len(full.held_pages()) == 25 and not full.released_blocks
    cache.close()
    manager.check_no_leaks()


def test_reuse_is_the_prefix_every_group_serves():
    manager, fill = make(device=40)
    tokens = list(range(48))
    first = fill.start()
    fill.decode(first, tokens)
    first.close()
    assert manager.probe_reuse(tokens) == 48
    # Pressure on the windowed group evicts its stale pages (their blocks stay, page-less);
    # the full group still has everything, so the whole prefix is served.
    other = fill.start()
    fill.decode(other, range(1000, 1016))
    other.close()
    assert any(b.page is None for b in manager.managers[0].pages.tree.iter_blocks())
    assert manager.probe_reuse(tokens) == 48
    # A shorter lookup ends where the windowed group lacks a page its window reads.
    missing = min(b.ordinal for b in manager.managers[0].pages.tree.iter_blocks() if b.page is None)
    assert manager.probe_reuse(tokens[: (missing + 1) * TPB]) <= missing * TPB
    again = fill.start(tokens)
    assert again.num_reused_tokens == 48
    assert [c.num_reused_tokens for c in again.caches] == [48, 48]
    fill.decode(again, [1, 2, 3])
    again.close()
    # Dropping the full group's blocks (its tree loses them) ends every group's reuse.
    manager.managers[1].clear_reusable_blocks()
    assert manager.probe_reuse(tokens) == 0
    manager.check_no_leaks()


def test_growth_is_all_or_nothing_across_groups(monkeypatch):
    manager, fill = make(device=40)
    cache = fill.start()
    fill.decode(cache, range(8))
    # The windowed group has 12 pages: a 60-token step does not fit it; the full group's
    # growth is undone.
    before = [len(c.held_pages()) for c in cache.caches]
    assert not cache.resize(capacity=cache.history_length + 60)
    assert [len(c.held_pages()) for c in cache.caches] == before
    assert {c.capacity for c in cache.caches} == {8}
    fill.check_all()
    # The full group (grown second) out of pages: the windowed group's growth is undone.
    full = cache.caches[1]
    monkeypatch.setattr(full, "resize", lambda capacity=None, history_length=None: False)
    assert not cache.resize(capacity=cache.history_length + 8)
    monkeypatch.undo()
    assert [len(c.held_pages()) for c in cache.caches] == before
    assert {c.capacity for c in cache.caches} == {8}
    fill.check_all()
    with pytest.raises(ValueError, match="capacity=4 must be >= history_length=8"):
        cache.resize(capacity=4)
    fill.check_all()
    cache.close()
    manager.check_no_leaks()


def test_resume_is_all_or_nothing_across_groups(monkeypatch):
    """The full group (resumed second) cannot resume: the windowed one is suspended again."""
    manager, fill = make(device=40)
    sleeper = fill.start()
    fill.decode(sleeper, range(30))
    sleeper.suspend()
    full = sleeper.caches[1]
    monkeypatch.setattr(full, "resume", lambda: False)
    assert not sleeper.resume()
    assert {c.status for c in sleeper.caches} == {CacheStatus.SUSPENDED}
    fill.check_all()
    monkeypatch.undo()
    assert sleeper.resume()
    fill.decode(sleeper, [1, 2])
    sleeper.close()
    manager.check_no_leaks()


def test_suspend_moves_each_groups_pages_to_its_host_tier():
    manager, fill = make(device=40, host=40)
    cache = fill.start()
    fill.decode(cache, range(40))
    cache.suspend()
    hog = fill.start()
    assert fill.step(hog, list(range(500, 540)))
    hog.close()
    assert Tier.HOST in {page.tier for page in cache.held_pages()}
    assert cache.resume()
    fill.decode(cache, [5, 6])
    cache.close()
    manager.check_no_leaks()


def test_five_local_layers_per_global_one_hold_a_fifth_of_the_pages_at_long_context():
    """The issue's target on the bytes held: 5:1 layers with a window of 8 tokens, 160 tokens
    of context (20 windows): the groups together hold <= 25% of what full attention would."""
    layers = [LayerAttention(WINDOW) if i % 6 != 5 else LayerAttention() for i in range(6)]
    config = CacheConfig(
        num_layers=6, num_kv_heads=1, head_dim=4, tokens_per_block=TPB, dtype="float32",
        device_pages=80, host_pages=0, layer_attention=layers,
    )  # fmt: skip
    configs = group_configs(config, max_seq_len=200, chunk_tokens=8)
    manager = GroupedKVCacheManager(configs, [KVStorage.for_config(c) for c in configs])
    fill = Fill(manager)
    cache = fill.start()
    fill.decode(cache, range(160))
    held_bytes = sum(
        len(c.held_pages()) * cfg.page_bytes for c, cfg in zip(cache.caches, configs, strict=True)
    )
    full_bytes = 40 * config.page_bytes  # 160 tokens in 40 blocks of every layer
    assert held_bytes / full_bytes <= 0.25
    cache.close()
    manager.check_no_leaks()


def test_suspending_needs_room_in_each_groups_colder_tier():
    from kvjax.serving.request import Request
    from kvjax.serving.resources import CacheResources

    manager, fill = make(device=40, host=20)
    cache = fill.start()
    fill.decode(cache, range(60))  # the windowed group holds 3 pages, the full one 15
    request = Request(request_id=0, prompt_token_ids=list(range(4)))
    request.cache = cache
    resources = CacheResources(manager)
    windowed_host, full_host = (m.pages.num_usable(Tier.HOST) for m in manager.managers)
    # 6 host pages take the windowed group's 3, 33 the full group's 15: all 18 pages at
    # once would not fit the windowed group's tier.
    assert (windowed_host, full_host) == (6, 33) and resources.can_suspend(request)
    assert manager.pages.num_usable(Tier.HOST) <= windowed_host + full_host
    events = manager.take_events()  # the full group's tree: every stored block once
    assert len(events) == 15 and manager.num_lost_events == 0
    cache.close()
    manager.check_no_leaks()


@pytest.mark.parametrize("first", ["full", "windowed"])
def test_groups_are_built_at_the_length_they_hold(first):
    """A window the sequences never outgrow is full attention: with 6 device pages the full
    group holds 24 tokens, so a 32-token window is no group of its own; with 40 it is."""
    import warnings

    from kvjax.cache import KVCacheManager
    from kvjax.engine.assembly import new_cache_manager

    layers = [LayerAttention(), LayerAttention(32)]
    layers = layers if first == "full" else layers[::-1]
    for device, grouped in ((6, False), (40, True)):
        config = CacheConfig(
            num_layers=2, num_kv_heads=1, head_dim=4, tokens_per_block=TPB, dtype="float32",
            device_pages=device, host_pages=0, layer_attention=layers,
        )  # fmt: skip
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            manager = new_cache_manager(config, None, 4, max_seq_len=64)
        assert isinstance(manager, GroupedKVCacheManager) == grouped
        assert isinstance(manager, KVCacheManager) != grouped
        if grouped:
            assert len({m.max_blocks for m in manager.managers}) == 1
            fill = Fill(manager)
            cache = fill.start()
            fill.decode(cache, range(manager.max_seq_len - 1))
            cache.close()
        manager.check_no_leaks()
        manager.shutdown()


def test_partial_reuse_copies_the_shared_block_in_every_group_or_in_none(monkeypatch):
    manager, fill = make(device=40)
    tokens = list(range(20))
    first = fill.start()
    fill.decode(first, tokens)
    first.close()
    reader = manager.create_kv_cache(tokens[:18])  # ends inside block 4
    for engine, group_cache in zip(fill.engines, reader.caches, strict=True):
        engine.register(group_cache)
    assert [c.num_reused_tokens for c in reader.caches] == [18, 18]
    # The full group (resumed second) has no page for its copy: it fails rather than drop
    # the partial block, and the windowed group is suspended again, still 18 tokens long.
    monkeypatch.setattr(manager.managers[1].pages, "acquire", lambda *args, **kwargs: None)
    assert not reader.resume()
    monkeypatch.undo()
    assert {(c.status, c.num_committed_tokens) for c in reader.caches} == {
        (CacheStatus.SUSPENDED, 18)
    }
    fill.check_all()
    assert reader.resume()
    fill.check_all()
    fill.decode(reader, [7, 8, 9])
    reader.close()
    manager.check_no_leaks()
