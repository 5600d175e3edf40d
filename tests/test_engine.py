"""The engine end to end with a tiny Llama: greedy outputs equal dense greedy decoding under prefix
reuse, chunked prefill, partial-block reuse and suspend/resume under memory pressure; the cache's
invariants hold after every step; bad requests leave nothing behind; serving never compiles."""

import numpy as np
import pytest

from kvjax.cache.multimodal import MultimodalItem
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.serving.request import FinishReason, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig, SchedulerPolicy
from tests.dense_llama import dense_greedy as reference_greedy
from tests.test_llama import random_model, tiny_config

TPB = 4
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def make_engine(model, *, device_pages=40, host_pages=40, scheduler=None, kv_dtype=None, **options):
    config = cache_config_for(
        model, tokens_per_block=TPB, device_pages=device_pages, host_pages=host_pages,
        dtype=kv_dtype,
    )  # fmt: skip
    scheduler = scheduler or SchedulerConfig(max_batch_size=4, max_num_tokens=32, chunk_unit=4)
    return Engine(model, config, scheduler, **options)


def dense_greedy(model, prompt, num_tokens=GREEDY.max_new_tokens):
    return tuple(reference_greedy(model, prompt, num_tokens))


def serve_checked(engine, prompts, params=GREEDY, **request_options):
    """Serves through `step()`, checking the cache's invariants after every step and that
    nothing compiles."""
    ids = [engine.add_request(p, params, **request_options) for p in prompts]
    outputs = {}
    compiled_before = engine.compiles.total
    while engine.num_unfinished:
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
    assert engine.compiles.total == compiled_before and engine.registry.stats.fallbacks == 0
    return [outputs[i] for i in ids]


def assert_all_pages_free(engine):
    """Nothing leaks while serving, and after shutdown (which aborts live requests and empties
    the tree) every page is free."""
    if not engine.num_unfinished:
        engine.manager.check_no_leaks()
    engine.shutdown()
    tiers = engine.manager.pages
    for tier in tiers.tiers:
        assert tiers.num_free(tier) == tiers.num_usable(tier), tier


def prompts_with_shared_prefix(rng, prefix_len, suffix_lens, vocab=64):
    prefix = list(rng.integers(0, vocab, prefix_len))
    return [prefix + list(rng.integers(0, vocab, n)) for n in suffix_lens]


def test_greedy_equals_dense_under_reuse_chunking_and_partial_blocks(model):
    rng = np.random.default_rng(0)
    # A 13-token system prompt: reuse ends mid-block (partial-block reuse with copy-on-write);
    # 40- and 50-token prompts exceed the 32-token budget (chunked prefill).
    prompts = prompts_with_shared_prefix(rng, 13, [3, 27, 9, 37])
    engine = make_engine(model)
    cold = serve_checked(engine, prompts[:1])
    warm = serve_checked(engine, prompts[1:])
    for prompt, output in zip(prompts, cold + warm, strict=True):
        assert output.token_ids == dense_greedy(model, prompt)
        assert output.finish_reason is FinishReason.LENGTH
    assert cold[0].metrics.num_reused_tokens == 0
    reused = [o.metrics.num_reused_tokens for o in warm]
    assert min(reused) >= 13 and any(r % TPB for r in reused)
    assert max(s.num_tokens for s in engine.metrics.steps) <= 32
    assert_all_pages_free(engine)


def test_a_prompt_served_cold_and_warm_gives_the_same_tokens(model):
    prompt = list(np.random.default_rng(1).integers(0, 64, 22))
    engine = make_engine(model)
    (cold,) = serve_checked(engine, [prompt])
    (warm,) = serve_checked(engine, [prompt])
    assert warm.token_ids == cold.token_ids == dense_greedy(model, prompt)
    assert warm.metrics.num_reused_tokens == len(prompt) - 1  # the last token is recomputed
    without_reuse = make_engine(model, enable_block_reuse=False)
    (plain,) = serve_checked(without_reuse, [prompt, prompt][:1])
    assert plain.token_ids == cold.token_ids and plain.metrics.num_reused_tokens == 0
    assert_all_pages_free(engine)
    assert_all_pages_free(without_reuse)


@pytest.mark.parametrize("policy", list(SchedulerPolicy))
def test_memory_pressure_suspends_and_resumes_with_exact_outputs(model, policy):
    # 13 device pages (12 usable, 48 tokens) for 4 requests needing 24 tokens each at the end.
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 64, n)) for n in (9, 12, 10, 11)]
    params = SamplingParams(max_new_tokens=13, temperature=0.0)
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=32, chunk_unit=4, policy=policy)
    engine = make_engine(model, device_pages=13, host_pages=64, scheduler=scheduler)
    outputs = serve_checked(engine, prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, 13)
    preemptions = sum(o.metrics.num_preemptions for o in outputs)
    if policy is SchedulerPolicy.MAX_UTILIZATION:
        assert preemptions > 0  # the tail was suspended to the host and resumed
    else:
        assert preemptions == 0  # admitted only with room for its whole life
    assert_all_pages_free(engine)


def test_guaranteed_no_evict_serves_a_request_longer_than_max_seq_len_allows(model):
    """A lifetime (prompt + max_new_tokens) past max_seq_len reserves only what max_seq_len
    lets the sequence reach: the request runs and ends at max_seq_len (it used to wait forever,
    its reservation one block larger than the device)."""
    scheduler = SchedulerConfig(
        max_batch_size=4, max_num_tokens=32, chunk_unit=4,
        policy=SchedulerPolicy.GUARANTEED_NO_EVICT,
    )  # fmt: skip
    engine = make_engine(model, device_pages=8, host_pages=0, scheduler=scheduler)
    max_seq_len = engine.manager.max_seq_len
    prompt = list(np.random.default_rng(3).integers(0, 64, 10))
    (output,) = serve_checked(engine, [prompt], SamplingParams(max_new_tokens=100))
    assert output.finish_reason is FinishReason.LENGTH
    assert len(prompt) + len(output.token_ids) == max_seq_len == 7 * TPB
    engine.shutdown()


def test_without_a_host_tier_pressure_recomputes_instead_of_deadlocking(model):
    """Suspended pages have nowhere to go: requests that cannot resume are preempted by
    recomputation (their KV dropped, their committed blocks left cached), and every output is
    still exactly the dense model's (this used to raise a deadlock)."""
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 64, n)) for n in (9, 12, 10, 11)]
    engine = make_engine(model, device_pages=13, host_pages=0)
    params = SamplingParams(max_new_tokens=13, temperature=0.0)
    outputs = serve_checked(engine, prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, 13)
    assert sum(o.metrics.num_recomputations for o in outputs) > 0
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_bad_requests_are_refused_and_leave_nothing_allocated(model):
    engine = make_engine(model, lora_pages={3: 1})
    max_seq_len = engine.manager.max_seq_len
    cases = [
        ([], "must have 1 to"),
        ([1] * max_seq_len, f"{max_seq_len} tokens must have 1 to {max_seq_len - 1}"),
        ([1, 64, 2], r"token 64 at index 1 is outside the vocabulary \[0, 64\)"),
        ([1, -1], "outside the vocabulary"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match=r"lora_id=5 is unknown; known: \[3\]"):
        engine.add_request([1, 2], lora_id=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2, 3], [4, 99]], GREEDY, use_tqdm=False)  # the good one is dropped
    assert engine.num_unfinished == 0 and engine.manager.live_caches == []
    engine.add_request([1, 2], request_id=7)
    with pytest.raises(ValueError, match="request_id=7 is already live"):
        engine.add_request([1, 2], request_id=7)
    engine.abort(7)
    engine.manager.check_no_leaks()
    assert_all_pages_free(engine)
    with pytest.raises(RuntimeError, match=r"add_request\(\) after shutdown\(\)"):
        engine.add_request([1, 2])


def test_sampling_is_seeded_per_request_and_stops_on_stop_tokens(model):
    engine = make_engine(model, eos_token_ids=[])
    prompt = [5, 6, 7, 8, 9]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    (alone,) = engine.generate([prompt], sampled, use_tqdm=False)
    others = [[1, 2, 3], [4, 4, 4, 4, 4, 4, 4]]
    batched = engine.generate([*others, prompt], sampled, use_tqdm=False)
    assert batched[2].token_ids == alone.token_ids  # same seed, other neighbours: same tokens
    top1 = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1, seed=3)
    assert engine.generate([prompt], top1, use_tqdm=False)[0].token_ids == dense_greedy(
        model, prompt
    )
    greedy = dense_greedy(model, prompt)
    stop = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(greedy[2],))
    (stopped,) = engine.generate([prompt], stop, use_tqdm=False)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == greedy[: greedy.index(greedy[2]) + 1]
    engine.eos_token_ids = frozenset({greedy[1]})
    (eos,) = engine.generate([prompt], GREEDY, use_tqdm=False)
    assert eos.token_ids == greedy[: greedy.index(greedy[1]) + 1]
    ignore = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert engine.generate([prompt], ignore, use_tqdm=False)[0].token_ids == greedy
    assert_all_pages_free(engine)


def test_reuse_scopes_multimodal_items_and_committed_generations(model):
    engine = make_engine(model, lora_pages={1: 0, 2: 0}, commit_generated=True)
    prompt = list(np.random.default_rng(3).integers(0, 64, 17))
    serve_checked(engine, [prompt], lora_id=1)
    (same,) = serve_checked(engine, [prompt], lora_id=1)
    (other,) = serve_checked(engine, [prompt], lora_id=2)
    (salted,) = serve_checked(engine, [prompt], lora_id=1, salt="tenant")
    assert same.metrics.num_reused_tokens == 16
    assert other.metrics.num_reused_tokens == salted.metrics.num_reused_tokens == 0
    # Identical placeholder ids, different images: reuse stops at the image.
    image = [MultimodalItem(bytes([i]) * 32, position=8, length=4) for i in (1, 2)]
    (first,) = serve_checked(engine, [prompt], multimodal_items=image[:1], lora_id=1)
    (second,) = serve_checked(engine, [prompt], multimodal_items=image[1:], lora_id=1)
    assert first.metrics.num_reused_tokens == 8 and second.metrics.num_reused_tokens == 8
    (again,) = serve_checked(engine, [prompt], multimodal_items=image[1:], lora_id=1)
    assert again.metrics.num_reused_tokens == 16
    # A follow-up turn reuses the generated tokens too (they were committed).
    turn2 = [*prompt, *same.token_ids, 9, 9]
    (follow,) = serve_checked(engine, [turn2], lora_id=1)
    assert follow.metrics.num_reused_tokens == len(prompt) + len(same.token_ids) - 1
    assert follow.token_ids == dense_greedy(model, turn2)
    assert_all_pages_free(engine)


def test_sequences_end_at_max_seq_len(model):
    engine = make_engine(model, max_seq_len=20)
    prompt = list(range(1, 17))
    (output,) = serve_checked(engine, [prompt], SamplingParams(max_new_tokens=10, temperature=0))
    assert len(output.token_ids) == 4 and output.finish_reason is FinishReason.LENGTH
    assert output.token_ids == dense_greedy(model, prompt, 4)
    assert_all_pages_free(engine)
