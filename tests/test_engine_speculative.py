"""Speculative decoding through the engine with a tiny Llama: greedy speculative outputs equal
dense greedy decoding for both drafters, under prefix reuse and under memory pressure with
suspend/resume; every step's writes (padded drafts included) land inside the writing request's
own pages; the rewind leaves capacity exactly at history; the draft-length schedule holds."""

import numpy as np
import pytest

import kvjax.engine.runner
from kvjax.engine.batch import build_step_batch
from kvjax.engine.draft_model import DraftModelDrafter
from kvjax.engine.geometry import cache_config_for
from kvjax.runtime.buckets import Buckets, default_buckets
from kvjax.serving.request import FinishReason, RequestState, SamplingParams
from kvjax.serving.resources import CacheResources
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from tests.test_engine import (
    GREEDY,
    TPB,
    assert_all_pages_free,
    dense_greedy,
    make_engine,
    serve_checked,
)
from tests.test_llama import random_model, tiny_config

MAX_DRAFT = 3
NEW_TOKENS = 13


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def workload(seed=2):
    """Random prompts and repetitive ones (prompt lookup finds their continuations)."""
    rng = np.random.default_rng(seed)
    pattern = list(rng.integers(0, 64, 5))
    randoms = [list(rng.integers(0, 64, n)) for n in (9, 12)]
    return [*randoms, pattern * 3, [*pattern, *pattern, 7]]


def check_writes_stay_private(engine, batch):
    """Every position a live row writes (its new tokens and padded drafts) is within its cache's
    capacity and maps to one of its own pages that no other live cache holds."""
    inputs, manager = batch.inputs, engine.manager
    cu, kv_lens = inputs.cu_q_lens, inputs.kv_lens
    others = {
        id(r.cache): set(r.cache.page_ids())
        for r in engine._queue.live()
        if r.cache is not None and r.cache.is_active
    }
    for row, request in enumerate(batch.requests):
        cache = request.cache
        first, end = int(kv_lens[row] - (cu[row + 1] - cu[row])), int(kv_lens[row])
        assert end <= cache.capacity, (request.request_id, end, cache.capacity)
        pages = cache.page_ids()
        foreign = set().union(*(p for key, p in others.items() if key != id(cache)))
        for block in range(first // TPB, -(-end // TPB)):
            page = int(inputs.page_table[row, block])
            assert page == pages[block] and page not in foreign, (request.request_id, block)
    assert inputs.page_table.shape[1] == manager.max_blocks


def serve_speculative(engine, monkeypatch, prompts, params):
    """`serve_checked`, also checking each step's writes and, after it, that every generating
    request's capacity was rewound exactly to its history."""
    batches = []

    def checked_build(output, manager, buckets, draft_len=0, feeds=None):
        batch = build_step_batch(output, manager, buckets, draft_len, feeds)
        check_writes_stay_private(engine, batch)
        batches.append(batch)
        return batch

    monkeypatch.setattr(kvjax.engine.runner, "build_step_batch", checked_build)
    step = engine.step

    def checked_step():
        finished = step()
        for request in engine._queue.live():
            if request.state is RequestState.GENERATION_IN_PROGRESS and not request.is_paused:
                assert request.cache.capacity == request.cache.history_length
        return finished

    monkeypatch.setattr(engine, "step", checked_step)
    return serve_checked(engine, prompts, params), batches


def greedy(max_new_tokens=NEW_TOKENS):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


def assert_dense_greedy(model, prompts, outputs, num_tokens=NEW_TOKENS):
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, num_tokens)


def draft_model_drafter(draft, device_pages=40, host_pages=40):
    config = cache_config_for(
        draft, tokens_per_block=TPB, device_pages=device_pages, host_pages=host_pages
    )
    return DraftModelDrafter(draft, config)


def test_ngram_greedy_equals_dense_under_pressure_and_reuse(model, monkeypatch):
    # 13 device pages (12 usable) for 4 requests of up to 29 tokens: the tail is suspended.
    engine = make_engine(
        model, device_pages=13, host_pages=64, speculative=SpeculativeConfig(NgramDrafter(), 3)
    )
    # Page tables count the drafts and the decode token past max_seq_len.
    manager = engine.manager
    assert manager.max_blocks == -(-(manager.max_seq_len + MAX_DRAFT + 1) // TPB)
    prompts = workload()
    outputs, batches = serve_speculative(engine, monkeypatch, prompts, greedy())
    assert_dense_greedy(model, prompts, outputs)
    summary = engine.metrics.summary()
    assert summary["preemptions"] > 0 and summary["acceptance_rate"] > 0
    assert {b.draft_len for b in batches} >= {0, MAX_DRAFT}
    # Warm: the same prompts again reuse their prefixes and give the same tokens.
    again, _ = serve_speculative(engine, monkeypatch, prompts, greedy())
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]
    assert all(o.metrics.num_reused_tokens > 0 for o in again)
    # Seeded sampling emits the very tokens plain decoding does, drafts or not.
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=16, seed=4)
    accepted_before = engine.metrics.summary()["acceptance_rate"]
    speculative, _ = serve_speculative(engine, monkeypatch, prompts, sampled)
    assert engine.metrics.summary()["acceptance_rate"] != accepted_before  # drafts ran
    plain = make_engine(model, device_pages=13, host_pages=64)
    expected = plain.generate(prompts, sampled, use_tqdm=False)
    assert [o.token_ids for o in speculative] == [o.token_ids for o in expected]
    assert_all_pages_free(plain)
    assert_all_pages_free(engine)


def test_guaranteed_no_evict_reserves_room_for_padded_drafts(model, monkeypatch):
    """Whole-life reservations include the most drafts: padding takes no page, rewinds keep
    the reservation, nothing is ever suspended, outputs are exact."""
    from kvjax.serving.scheduler import SchedulerConfig, SchedulerPolicy

    scheduler = SchedulerConfig(
        max_batch_size=4, max_num_tokens=32, chunk_unit=4,
        policy=SchedulerPolicy.GUARANTEED_NO_EVICT,
    )  # fmt: skip
    engine = make_engine(
        model, device_pages=13, host_pages=64, scheduler=scheduler,
        speculative=SpeculativeConfig(NgramDrafter(), MAX_DRAFT),
    )  # fmt: skip
    checks = []

    def no_growth_on_extension(request, padded_draft_len):
        before = request.cache.num_blocks
        grown = CacheResources.extend_capacity_for_tokens(
            engine.resources, request, padded_draft_len
        )
        checks.append(request.cache.num_blocks == before)
        return grown

    monkeypatch.setattr(engine.resources, "extend_capacity_for_tokens", no_growth_on_extension)
    prompts = workload()
    outputs = serve_checked(engine, prompts, greedy())
    assert_dense_greedy(model, prompts, outputs)
    assert sum(o.metrics.num_preemptions for o in outputs) == 0
    assert checks and all(checks)
    assert engine.metrics.summary()["draft_tokens"] > 0
    assert_all_pages_free(engine)


def test_self_drafting_accepts_everything_and_advances_several_tokens(model, monkeypatch):
    """The target as its own draft model: drafts are the target's argmax, so (up to float
    noise between batch shapes) all are accepted; both managers suspend under pressure."""
    drafter = draft_model_drafter(model, device_pages=13, host_pages=64)
    engine = make_engine(
        model, device_pages=13, host_pages=64, speculative=SpeculativeConfig(drafter, MAX_DRAFT)
    )
    prompts = workload(seed=5)
    outputs, _ = serve_speculative(engine, monkeypatch, prompts, greedy())
    assert_dense_greedy(model, prompts, outputs)
    summary = engine.metrics.summary()
    assert summary["acceptance_rate"] > 0.9 and summary["tokens_per_step"] > 2.5
    assert summary["preemptions"] > 0
    drafter.manager.check_invariants()
    assert_all_pages_free(engine)
    assert drafter.manager.live_caches == []  # the engine closed every draft cache


def test_other_draft_model_with_a_schedule_and_sampling(model, monkeypatch):
    """A different (random) draft model mostly misses: outputs stay exact; a schedule of
    {1: 3, 2: 1} drafts 3 tokens for one running request, 1 for two, none past two."""
    draft = random_model(tiny_config(vocab_size=64), seed=7)
    drafter = draft_model_drafter(draft)
    spec = SpeculativeConfig(drafter, MAX_DRAFT, draft_len_schedule={1: 3, 2: 1})
    engine = make_engine(model, speculative=spec)
    prompts = workload(seed=9)
    lengths = {}
    for group in (prompts[:1], prompts[1:3], prompts):  # 1, 2 and 4 running requests
        outputs, batches = serve_speculative(engine, monkeypatch, group, greedy())
        assert_dense_greedy(model, group, outputs)
        for batch in batches:
            num_generating = batch.chunk_sizes.count(0)
            assert batch.draft_len <= spec.draft_len(num_generating)
        lengths[len(group)] = {b.draft_len for b in batches if b.chunk_sizes.count(0)}
    assert 3 in lengths[1] and 1 in lengths[2] and lengths[4] >= {0}
    assert engine.metrics.summary()["draft_tokens"] > 0
    # Sampling: a seeded request gives the same tokens alone or batched, drafts or not.
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, seed=4)
    (alone,) = engine.generate(prompts[2:3], sampled, use_tqdm=False)
    batched = engine.generate(prompts, sampled, use_tqdm=False)
    assert batched[2].token_ids == alone.token_ids and len(alone.token_ids) == 10
    engine.manager.check_invariants()
    assert_all_pages_free(engine)


def test_without_the_padding_extension_the_rewind_would_underflow(model, monkeypatch):
    """The reference's bug, reproduced: skip the extension and padded drafts write past the
    capacity (outside the request's pages), and the rewind from the padded length goes below
    history, which the cache refuses."""

    def no_extension(self, request, padded_draft_len):
        self._allocated_draft_lens.pop(request.request_id, None)
        return True

    monkeypatch.setattr(CacheResources, "extend_capacity_for_tokens", no_extension)
    engine = make_engine(model, speculative=SpeculativeConfig(NgramDrafter(), MAX_DRAFT))
    flagged = []

    def build(output, manager, buckets, draft_len=0, feeds=None):
        batch = build_step_batch(output, manager, buckets, draft_len, feeds)
        try:
            check_writes_stay_private(engine, batch)
        except AssertionError:
            flagged.append(batch)
        return batch

    monkeypatch.setattr(kvjax.engine.runner, "build_step_batch", build)
    engine.add_request([1, 2, 3, 1, 2, 3, 1, 2], greedy(20))
    outputs = []
    for _ in range(30):
        outputs += engine.step()
        if outputs:
            break
    # The rewind's refusal fails the request alone (the engine goes on serving).
    (output,) = outputs
    assert output.finish_reason is FinishReason.ERROR
    assert "must be >= history_length" in output.error, output.error
    assert flagged and flagged[-1].draft_len > flagged[-1].num_drafts.max()
    engine.shutdown()


def test_bad_speculative_engine_configs_are_refused(model):
    from kvjax.runtime.buckets import Buckets
    from kvjax.serving.scheduler import SchedulerConfig

    small = SchedulerConfig(max_batch_size=2, max_num_tokens=3, chunk_unit=1)
    with pytest.raises(ValueError, match="max_num_tokens=3 cannot hold one verification row"):
        make_engine(model, scheduler=small, speculative=SpeculativeConfig(NgramDrafter(), 3))
    with pytest.raises(ValueError, match=r"draft lengths \[3\] .* not in buckets.draft_lengths"):
        make_engine(
            model,
            buckets=Buckets([1, 2, 4], [16, 32]),
            speculative=SpeculativeConfig(NgramDrafter(), 3),
        )
    with pytest.raises(ValueError, match="is not a SpeculativeConfig"):
        make_engine(model, speculative=NgramDrafter())
    other = random_model(tiny_config(vocab_size=32))
    drafter = DraftModelDrafter(
        other, cache_config_for(other, tokens_per_block=TPB, device_pages=8, host_pages=0)
    )
    with pytest.raises(ValueError, match="vocab_size=32 differs from the target's 64"):
        make_engine(model, speculative=SpeculativeConfig(drafter, 2))
    drafter.shutdown()


def test_a_draft_model_drafter_takes_the_engines_limits_once(model):
    """The drafter is built for the engine that binds it: its manager follows the engine's
    `max_seq_len` and draft length, its default buckets are the engine's own (not every power
    of two up to the token budget), and a second engine cannot bind it."""
    drafter = draft_model_drafter(model)
    assert drafter.manager is None
    engine = make_engine(model, speculative=SpeculativeConfig(drafter, MAX_DRAFT))
    assert drafter.manager.max_seq_len == min(engine.manager.max_seq_len, 39 * TPB)
    assert drafter.buckets.keys == default_buckets(4, 32).keys
    assert len(drafter.buckets.keys) < len(Buckets([1, 2, 4], [1, 2, 4, 8, 16, 32]).keys)
    with pytest.raises(RuntimeError, match="bound to an engine already"):
        make_engine(model, speculative=SpeculativeConfig(drafter, MAX_DRAFT))
    engine.shutdown()
    config = cache_config_for(model, tokens_per_block=TPB, device_pages=8, host_pages=0)
    small = DraftModelDrafter(model, config, buckets=Buckets([1, 2], [8]))
    with pytest.raises(ValueError, match="fits no allowed bucket"):
        make_engine(model, speculative=SpeculativeConfig(small, MAX_DRAFT))
    assert small.manager is None and small.buckets.batch_sizes == (1, 2)  # nothing kept


class _Echo:
    """A user's drafter without `bind` (it needs no limits): proposes the last token again."""

    def propose(self, requests, max_lens):
        return [[r.output_token_ids[-1]] * k for r, k in zip(requests, max_lens, strict=True)]

    def suspend(self, request):
        pass

    def release(self, request):
        pass

    def shutdown(self):
        pass


def test_a_drafter_without_bind_serves_exact_outputs(model):
    engine = make_engine(model, speculative=SpeculativeConfig(_Echo(), 2))
    prompts = workload(seed=3)[:2]
    outputs = serve_checked(engine, prompts)
    assert_dense_greedy(model, prompts, outputs, GREEDY.max_new_tokens)
    assert engine.metrics.summary()["draft_tokens"] > 0
    assert_all_pages_free(engine)
