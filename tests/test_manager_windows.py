"""Sliding windows in the manager: stale blocks give their pages back as decoding advances, a
window's evicted page leaves its block in the tree, and matches stop where attention would
read a missing page. Ported from the reference's SWA scenarios, with real bytes: every step is
checked by `FillCheckEngine` (stale blocks hold `NULL_PAGE`, the sinks and the live window hold
exactly the bytes their tokens wrote) and by `check_invariants()`."""

import gc

import pytest

from kvjax.cache import NULL_PAGE, CacheConfig, CommitState, KVCacheManager, Tier
from kvjax.cache.life_cycles import LayerAttention, LifeCycle
from kvjax.runtime.storage import KVStorage
from tests.fill_check import FillCheckEngine

TPB, WINDOW, SINKS = 4, 8, 2  # the sinks fill part of block 0: one sink block


def make(device=32, host=0, layers=None, max_seq_len=None, **options):
    layers = layers or [LayerAttention(WINDOW, SINKS)] * 2
    config = CacheConfig(
        num_layers=len(layers),
        num_kv_heads=1,
        head_dim=4,
        tokens_per_block=TPB,
        dtype="float32",
        device_pages=device,
        host_pages=host,
        layer_attention=layers,
        **options,
    )
    manager = KVCacheManager(config, KVStorage.for_config(config), max_seq_len=max_seq_len)
    return manager, FillCheckEngine(manager)


def start(manager, engine, tokens=None):
    cache = manager.create_kv_cache(tokens)
    engine.register(cache)
    assert cache.resume()
    engine.check_all()
    return cache


def decode(engine, cache, tokens):
    for token in tokens:
        assert engine.run_step(cache, [token])
        engine.check_all()


def test_one_page_per_block_goes_only_when_every_layer_is_done_with_it():
    """The reference's layers (even windowed with sinks, odd full): a page holds both, so the
    full-attention layers keep every block; all layers windowed: the widest window and the
    most sinks decide."""
    mixed = [LayerAttention(WINDOW, SINKS), LayerAttention()]
    assert make(layers=mixed)[0].pages.life_cycle == LifeCycle(None, 0)
    widest = [LayerAttention(8, 2), LayerAttention(12, 5)]
    assert make(layers=widest)[0].pages.life_cycle == LifeCycle(12, 2)
    manager, engine = make(layers=mixed)
    cache = start(manager, engine)
    decode(engine, cache, range(40))
    assert not cache.released_blocks and None not in cache.pages()


def test_a_decoding_windowed_request_holds_a_bounded_number_of_pages():
    manager, engine = make()
    cache = start(manager, engine)
    held = []
    for token in range(100):
        decode(engine, cache, [token])
        held.append(len(cache.held_pages()))
    # One sink block and the blocks of the window in flight (positions h - 7 .. h - 1 and the
    # token at h span at most 3 blocks of 4): never more, however long the sequence.
    assert max(held) == 1 + 3 == max(held[-8:])
    start_, end = LifeCycle(WINDOW, 1).stale_range(100, TPB)
    assert cache.released_blocks == range(start_, end) == range(1, 23)
    assert cache.page_ids()[1:23] == [NULL_PAGE] * 22
    used = manager.pages.num_usable(Tier.DEVICE) - manager.pages.num_free(Tier.DEVICE)
    assert used == 25  # 25 committed blocks, stale ones cached in the tree as DROPPABLE
    cache.close()
    manager.check_no_leaks()


def test_a_reused_prefix_holds_only_what_its_window_reads():
    manager, engine = make()
    tokens = list(range(60))
    first = start(manager, engine)
    decode(engine, first, tokens)
    first.close()
    second = start(manager, engine, tokens)
    assert second.num_reused_tokens == 60
    assert second.released_blocks == range(1, 13) and len(second.held_pages()) == 3
    decode(engine, second, [7, 8, 9])  # the reused bytes are what attention reads next
    second.close()
    manager.check_no_leaks()


def test_uncommitted_stale_blocks_wait_for_their_commit():
    """A stale block that may still be committed keeps its page (the reference keeps it as a
    holder); once committing stops, it goes."""
    manager, engine = make()
    cache = start(manager, engine)
    for token in range(30):
        assert engine.run_step(cache, [token], commit=False)  # history moves, nothing commits
        engine.check_all()
    assert cache.commit_state is CommitState.ALLOWED and not cache.released_blocks
    cache.stop_committing()
    engine.check_all()
    assert cache.released_blocks == range(1, 5)
    cache.close()
    manager.check_no_leaks()


def test_evicted_window_pages_keep_later_blocks_reusable():
    """No colder tier: a second request's growth evicts the first one's stale pages. Their
    blocks stay in the tree without pages (they have children; the sink block is not one of
    them), so the whole sequence is still reusable, while a match ending where attention
    reads an evicted block is cut back to where it does not."""
    manager, engine = make(device=14)
    tokens = list(range(48))  # 12 blocks
    first = start(manager, engine)
    decode(engine, first, tokens)
    first.close()
    other = start(manager, engine)
    decode(engine, other, range(1000, 1024))  # takes 6 pages: the oldest cached ones go
    other.close()
    tree_blocks = {block.ordinal: block for block in manager.pages.tree.iter_blocks()
                   if block.root is manager.pages.tree.roots()[0]}  # fmt: skip
    missing = sorted(ordinal for ordinal, block in tree_blocks.items() if block.page is None)
    assert missing and 0 not in missing
    engine.check_all()
    assert manager.probe_reuse(tokens) == 48  # the window at the end still has its pages
    # A match ending right after a missing block would read it: it stops before that block.
    end = (missing[-1] + 1) * TPB
    assert manager.probe_reuse(tokens[:end]) <= missing[-1] * TPB
    again = start(manager, engine, tokens)
    assert again.num_reused_tokens == 48
    decode(engine, again, [5, 6])
    again.close()
    manager.check_no_leaks()


def test_a_commit_onto_a_block_without_page_gives_it_ours():
    manager, engine = make(device=14)
    tokens = list(range(48))
    first = start(manager, engine)
    decode(engine, first, tokens)
    first.close()
    other = start(manager, engine)
    decode(engine, other, range(1000, 1024))
    other.close()
    tree = manager.pages.tree
    pageless = [block for block in tree.iter_blocks() if block.page is None]
    assert pageless
    ordinal = min(block.ordinal for block in pageless)
    # A cold run of the same tokens commits every block: the page-less ones adopt its pages.
    cold = start(manager, engine)
    decode(engine, cold, tokens[: (ordinal + 1) * TPB])
    assert all(block.page is not None for block in tree.iter_blocks() if block.ordinal <= ordinal)
    cold.close()
    manager.check_no_leaks()


def test_suspend_resume_moves_only_the_pages_still_held():
    manager, engine = make(device=12, host=16)
    cache = start(manager, engine)
    decode(engine, cache, range(40))
    held = cache.held_pages()
    cache.suspend()
    blocker = start(manager, engine)
    # One 44-token step takes every usable device page: the suspended pages go to the host.
    assert engine.run_step(blocker, list(range(500, 544)))
    engine.check_all()
    blocker.close()
    assert {page.tier for page in cache.held_pages()} == {Tier.HOST}
    assert cache.resume()
    engine.check_all()
    assert len(cache.held_pages()) == len(held)
    decode(engine, cache, range(40, 44))
    cache.close()
    manager.check_no_leaks()


def test_speculative_rewind_never_reaches_released_pages():
    manager, engine = make()
    cache = start(manager, engine)
    decode(engine, cache, range(30))
    released = cache.released_blocks
    # Verify three drafts, accept none: capacity grows by the drafts, then shrinks back.
    assert cache.resize(capacity=cache.history_length + 4)
    engine.write(cache, [1, 2, 3, 4])
    cache.commit([1])
    assert cache.resize(capacity=cache.history_length)
    engine.check_all()
    assert cache.released_blocks.start == released.start and cache.released_blocks.stop >= (
        released.stop
    )
    cache.close()
    manager.check_no_leaks()


def test_a_dropped_cache_with_released_blocks_is_released():
    manager, engine = make()
    cache = start(manager, engine)
    decode(engine, cache, range(30))
    del cache
    gc.collect()
    with pytest.warns(ResourceWarning):
        manager.check_no_leaks()


def test_bad_layer_attention_is_refused():
    with pytest.raises(ValueError, match="names 1 layers; num_layers=2"):
        CacheConfig(
            num_layers=2, num_kv_heads=1, head_dim=4, device_pages=8,
            layer_attention=[LayerAttention(8)],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"layer_attention\[1\]=8 is not a LayerAttention"):
        make(layers=[LayerAttention(8), 8])


def test_suspending_a_windowed_request_needs_room_for_its_held_pages_only():
    from kvjax.serving.request import Request
    from kvjax.serving.resources import CacheResources

    manager, engine = make(device=32, host=6)
    cache = start(manager, engine)
    decode(engine, cache, range(60))  # 15 blocks, 3 held
    request = Request(request_id=0, prompt_token_ids=list(range(4)))
    request.cache = cache
    caches = CacheResources(manager)
    assert cache.num_blocks == 15 and len(cache.held_pages()) == 3
    assert caches.can_suspend(request)  # 6 host pages take the 3 held ones, not 15 blocks
    cache.close()


def test_a_windowed_sequence_may_outgrow_the_device():
    """Stale pages go back, so `max_seq_len` is not clamped to what the device holds: 12 pages
    serve a 200-token sequence (50 blocks)."""
    manager, engine = make(device=12, max_seq_len=256)
    config = manager.config
    assert manager.max_seq_len == 256 and manager.max_blocks == 65
    cache = start(manager, engine)
    decode(engine, cache, range(200))
    cache.close()
    full = CacheConfig(**{**vars(config), "layer_attention": None})
    with pytest.warns(UserWarning, match="clamped to 44"):
        KVCacheManager(full, KVStorage.for_config(full), max_seq_len=256)


def test_a_resume_that_would_drop_the_shared_block_keeps_what_its_window_reads():
    """A 19-token match gave back blocks 0-2 (window 8); resuming on a full device would fall
    back to the 16 full tokens, whose window reads block 2 again: the resume refuses instead."""
    manager, engine = make(
        device=9, layers=[LayerAttention(8)], max_seq_len=64, max_util_for_resume=1.0
    )
    tokens = list(range(100, 120))
    first = start(manager, engine)
    decode(engine, first, tokens)
    first.close()
    reader = manager.create_kv_cache(tokens[:19])
    engine.register(reader)
    assert reader.released_blocks == range(0, 3)
    hog = start(manager, engine)
    while hog.resize(capacity=hog.capacity + TPB):
        pass
    assert not reader.resume() and reader.num_committed_tokens == 19
    engine.check_all()
    hog.close()
    assert reader.resume()
    decode(engine, reader, [1, 2])
    reader.close()
    manager.check_no_leaks()


def test_a_quota_resize_keeps_the_window():
    """Shrinking the device below the window must not turn the window into full attention:
    the tree still holds blocks whose pages the window let go."""
    manager, engine = make(device=32, layers=[LayerAttention(40)])
    tokens = list(range(100, 180))
    first = start(manager, engine)
    decode(engine, first, tokens)
    first.close()
    hog = start(manager, engine)
    assert hog.resize(capacity=15 * TPB)
    hog.close()
    assert manager.resize_quota(Tier.DEVICE, num_pages=10)
    assert manager.pages.life_cycle == LifeCycle(40, 0)
    manager.check_invariants()
    cache = manager.create_kv_cache(tokens[:20])  # its window would read evicted blocks
    assert cache.num_reused_tokens == 0
    cache.close()
    manager.check_no_leaks()
