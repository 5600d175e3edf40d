"""Random life cycles of many caches under tight quotas, with real bytes checked after every step.

Tokens come from a tiny alphabet so prompts share prefixes: reuse, partial reuse, copy-on-write,
rebasing and VIRTUAL_STOP all happen. After every operation the fill-and-check engine verifies every
history token of every active cache and `check_invariants()` runs; at the end, with every cache
closed and the tree cleared, every page must be free.
"""

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvjax.cache import CacheStatus, CommitState, Tier
from tests.test_manager import make

# Steps are the common case; the rest change state.
OPERATIONS = ("create", "resume", "suspend", "step", "step", "step", "draft", "rewind", "stop")
OPERATIONS += ("close", "misuse", "quota", "clear")
DIGEST = bytes(range(32))  # a multimodal content digest as a token
token_strategy = st.one_of(st.integers(0, 2), st.integers(0, 2), st.just(DIGEST))


@pytest.fixture(scope="module")
def disk_dir():
    with tempfile.TemporaryDirectory() as path:
        yield path


def snapshot(cache):
    return (cache.status, cache.num_committed_tokens, cache.history_length, cache.capacity)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_life_cycles_keep_bytes_and_invariants(data, disk_dir):
    tpb = data.draw(st.sampled_from([1, 2, 4, 8]), label="tpb")
    device = data.draw(st.integers(3, 8), label="device")
    host = data.draw(st.integers(0, 6), label="host")
    disk = data.draw(st.integers(0, 4), label="disk")
    manager, engine = make(tpb=tpb, device=device, host=host, disk=disk, disk_dir=disk_dir)
    caches = []
    for _ in range(data.draw(st.integers(20, 80), label="length")):
        operation = data.draw(st.sampled_from(OPERATIONS))
        live = [cache for cache in caches if cache.status is not CacheStatus.CLOSED]
        if operation == "create" or not live:
            caches.append(create(manager, engine, caches, data))
        elif operation == "quota":
            resize_quota(manager, data)
        elif operation == "clear":
            manager.clear_reusable_blocks()  # live caches keep what they hold
        else:
            cache = data.draw(st.sampled_from(live), label="cache")
            apply(operation, cache, data, engine)
        engine.check_all()
    for cache in caches:
        cache.close()
        engine.check_all()
    manager.clear_reusable_blocks()
    for tier in manager.pages.tiers:
        assert manager.pages.num_free(tier) == manager.pages.num_usable(tier), tier
    manager.check_invariants()


def resize_quota(manager, data):
    """Suspends every cache, then resizes one tier (shrinking may fail and change nothing)."""
    for cache in manager.live_caches:
        if cache.is_active:
            cache.suspend()
    tier = data.draw(st.sampled_from(manager.pages.tiers), label="tier")
    minimum = 2 if tier is Tier.DEVICE else 1
    size = data.draw(st.integers(minimum, manager.pages.num_pages(tier) + 2), label="size")
    before = manager.quota(tier)
    if not manager.resize_quota(tier, num_pages=size):
        assert manager.quota(tier) == before


def room(cache, engine):
    """Tokens the cache may still take past its history (its page-table row is that wide)."""
    return engine.manager.max_blocks * cache.tokens_per_block - cache.history_length


def create(manager, engine, caches, data):
    """A cache whose prompt often extends an earlier sequence; resumed and prefilled if it can."""
    prompt = []
    if caches and data.draw(st.booleans(), label="extends"):
        earlier = engine.tokens(data.draw(st.sampled_from(caches), label="earlier"))
        prompt = earlier[: data.draw(st.integers(0, len(earlier)), label="cut")]
    prompt += data.draw(st.lists(token_strategy, max_size=8), label="new tokens")
    prompt = prompt[: manager.max_seq_len]
    lookup = prompt
    if DIGEST not in prompt and data.draw(st.booleans(), label="numpy"):
        lookup = np.array(prompt, np.int64)
    cache = manager.create_kv_cache(lookup, salt=data.draw(st.sampled_from([None, 1])))
    engine.register(cache)
    if prompt[cache.num_reused_tokens :] and cache.resume():
        engine.run_step(cache, prompt[cache.num_reused_tokens :])
    return cache


def apply(operation, cache, data, engine):
    active = cache.is_active
    if operation == "resume" and not active:
        cache.resume()
    elif operation == "suspend" and active:
        cache.suspend()
    elif operation == "step" and active:
        tokens = data.draw(st.lists(token_strategy, min_size=1, max_size=6), label="tokens")
        tokens = tokens[: room(cache, engine)]
        engine.run_step(cache, tokens, commit=cache.commit_state is not CommitState.USER_STOP)
    elif operation == "draft" and active:
        count = min(data.draw(st.integers(1, 5), label="draft"), room(cache, engine))
        if count and cache.resize(capacity=cache.history_length + count):
            engine.write(cache, [3] * count)  # written past history, never committed
    elif operation == "rewind" and active:
        count = data.draw(st.integers(1, 5), label="rewind")
        assert cache.resize(capacity=max(cache.history_length, cache.capacity - count))
    elif operation == "stop":
        cache.stop_committing()
    elif operation == "close":
        cache.close()
    elif operation == "misuse":
        before = snapshot(cache)
        if active:
            with pytest.raises(ValueError):
                cache.resize(capacity=cache.history_length - 1)
            with pytest.raises(ValueError, match="max_blocks"):
                cache.resize(capacity=cache.history_length + room(cache, engine) + 1)
            stopped = cache.commit_state is CommitState.USER_STOP
            with pytest.raises(RuntimeError if stopped else ValueError):
                cache.commit([0] * (cache.capacity - cache.num_committed_tokens + 1))
        else:
            with pytest.raises(RuntimeError):
                cache.resize(capacity=cache.capacity + 1)
            with pytest.raises(RuntimeError):
                cache.commit([0])
        assert snapshot(cache) == before
