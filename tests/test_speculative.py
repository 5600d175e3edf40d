"""Speculative decoding parts on their own: the draft-length schedule, the n-gram drafter, the
padding extension and the rewind on a real manager, budgets of padded drafts, and verification
(greedy acceptance, and rejection sampling keeping the target distribution)."""

import dataclasses

import jax
import numpy as np
import pytest

from kvjax.cache.config import CacheConfig
from kvjax.cache.manager import KVCacheManager
from kvjax.runtime.sampling import sample_tokens, verify_tokens
from kvjax.runtime.storage import KVStorage
from kvjax.serving.request import Request, RequestState, SamplingParams
from kvjax.serving.resources import CacheResources
from kvjax.serving.scheduler import Scheduler, SchedulerConfig
from kvjax.serving.speculative import (
    DraftPlanner,
    NgramDrafter,
    SpeculativeConfig,
    draft_len_for_batch_size,
)
from tests.test_scheduler import FakeCache

TPB = 4


def test_draft_len_schedule_keys_are_batch_size_upper_bounds():
    schedule = {4: 4, 8: 2, 32: 1}
    got = [draft_len_for_batch_size(schedule, n) for n in (1, 4, 5, 8, 9, 32, 33)]
    assert got == [4, 4, 2, 2, 1, 1, 0]
    config = SpeculativeConfig(NgramDrafter(), 4, schedule)
    assert config.draft_lengths == (0, 1, 2, 4) and config.draft_len(6) == 2
    assert SpeculativeConfig(NgramDrafter(), 3).draft_len(1000) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_draft_tokens": 0}, "max_draft_tokens=0 must be >= 1"),
        ({"draft_len_schedule": {4: 5}}, r"draft_len_schedule\[4\]=5 must be in \[0, 4\]"),
        ({"draft_len_schedule": {0: 1}}, "draft_len_schedule key=0 must be >= 1"),
        ({"draft_len_schedule": {}}, "draft_len_schedule is empty"),
    ],
)
def test_bad_speculative_configs_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**{"drafter": NgramDrafter(), "max_draft_tokens": 4, **options})


def test_ngram_lookup_prefers_the_longest_suffix_then_the_latest_match():
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    # The suffix (7, 8, 9) occurred once, followed by 1, 2; (9,) alone last occurred before 5.
    tokens = [7, 8, 9, 1, 2, 3, 9, 5, 6, 7, 8, 9]
    assert drafter.lookup(tokens, 2) == [1, 2]
    assert drafter.lookup(tokens, 10) == [1, 2, 3, 9, 5, 6, 7, 8, 9]
    assert drafter.lookup([4, 9, 5, 9, 6, 9], 1) == [6]  # latest match of (9,)
    assert drafter.lookup([1, 2, 3], 3) == [] and drafter.lookup([5], 3) == []
    assert drafter.lookup(tokens, 0) == []
    assert NgramDrafter(max_ngram=3, min_ngram=2).lookup([4, 9, 5, 9], 2) == []
    with pytest.raises(ValueError, match="max_ngram=1 must be >= 2"):
        NgramDrafter(max_ngram=1, min_ngram=2)


def make_resources(device_pages=12, max_draft_tokens=4, host_pages=0):
    config = CacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB, device_pages=device_pages,
        host_pages=host_pages,
    )  # fmt: skip
    storage = KVStorage.for_config(config)
    manager = KVCacheManager(
        config, storage, max_seq_len=32, max_total_draft_tokens=max_draft_tokens
    )
    return CacheResources(manager, max_draft_tokens=max_draft_tokens)


def generating(resources, request_id=0, prompt_len=6, drafts=()):
    """A request whose prompt has KV and whose first token is sampled."""
    first = 1 + 10 * request_id  # distinct prompts share no block
    request = Request(request_id, list(range(first, first + prompt_len)))
    assert resources.prepare_context(request)
    assert resources.resize_context(request, prompt_len)
    resources.context_computed(request, prompt_len)
    request.state = RequestState.GENERATION_IN_PROGRESS
    request.output_token_ids.append(99)
    request.draft_tokens = list(drafts)
    return request


def test_padding_extension_makes_the_rewind_land_exactly_on_history():
    resources = make_resources()
    request = generating(resources, drafts=[5])
    cache = request.cache
    assert resources.try_allocate_generation(request)
    assert (cache.history_length, cache.capacity) == (6, 8)  # 1 input + 1 draft
    assert resources.extend_capacity_for_tokens(request, 4)  # padded to 4 drafts
    assert cache.capacity == 11 and cache.num_blocks == 3
    with pytest.raises(ValueError, match="was not grown for generation this step"):
        resources.extend_capacity_for_tokens(request, 4)  # once per step
    # The draft was accepted: 2 tokens have KV; 3 padded positions are rewound.
    resources.tokens_computed(request, [99, 5], num_rejected=3)
    assert (cache.history_length, cache.capacity, cache.num_blocks) == (8, 8, 2)
    resources.manager.check_invariants()


def test_without_the_extension_the_padded_rewind_would_go_below_history():
    resources = make_resources()
    request = generating(resources, drafts=[5])
    assert resources.try_allocate_generation(request)
    # The reference's bug: capacity 8, rewind computed from 4 padded drafts (1 accepted).
    with pytest.raises(ValueError, match="capacity=5 must be >= history_length=8"):
        resources.tokens_computed(request, [99, 5], num_rejected=3)


def test_a_whole_life_reservation_holds_the_padding_and_survives_rewinds():
    """GUARANTEED_NO_EVICT reserves prompt + max_new_tokens + the most drafts at admission: the
    padding needs no page and rejected drafts never shrink the reservation."""
    resources = make_resources()
    request = Request(0, [1, 2, 3, 4, 5, 6], SamplingParams(max_new_tokens=5))
    assert resources.prepare_context(request)
    assert resources.resize_context(request, 6, reserve_tokens=request.lifetime_tokens)
    cache = request.cache
    assert cache.capacity == 6 + 5 + 4 and cache.num_blocks == 4
    resources.context_computed(request, 6)
    request.output_token_ids.append(9)
    for accepted in (0, 1, 0):
        request.draft_tokens = [7, 7]
        assert resources.try_allocate_generation(request)
        assert resources.extend_capacity_for_tokens(request, 4)
        assert cache.capacity == 15 and cache.num_blocks == 4  # no page taken
        resources.tokens_computed(request, [9] + [7] * accepted, num_rejected=4 - accepted)
        assert cache.capacity == 15
    resources.free(request)
    resources.manager.check_invariants()


def test_extension_without_pages_changes_nothing_and_can_be_retried():
    resources = make_resources(device_pages=3)  # 2 usable pages (page 0 is the null page)
    request = generating(resources, drafts=[5])
    assert resources.try_allocate_generation(request)
    capacity = request.cache.capacity
    assert not resources.extend_capacity_for_tokens(request, 4)  # needs a third page
    assert request.cache.capacity == capacity
    assert resources.extend_capacity_for_tokens(request, 1)  # the record was kept
    with pytest.raises(ValueError, match="padded_draft_len=0 is below the 1 draft tokens"):
        resources.try_allocate_generation(request) and resources.extend_capacity_for_tokens(
            request, 0
        )


class _Fixed:
    """A drafter proposing a fixed list, recording what it was asked and told."""

    def __init__(self, drafts):
        self.drafts, self.asked, self.suspended = drafts, [], []

    def propose(self, requests, max_lens):
        self.asked.append([(r.request_id, k) for r, k in zip(requests, max_lens, strict=True)])
        return [self.drafts[:k] for k in max_lens]

    def suspend(self, request):
        self.suspended.append(request.request_id)

    def release(self, request):
        pass

    def shutdown(self):
        pass


def test_planner_drafts_running_generation_requests_at_a_compiled_length():
    resources = make_resources(device_pages=7)  # 6 usable: 2 pages for each of 3 prompts
    drafter = _Fixed([7, 7])
    config = SpeculativeConfig(drafter, 4, {1: 4, 2: 2})
    scheduler_config = SchedulerConfig(max_batch_size=4, max_num_tokens=64, chunk_unit=4)
    planner = DraftPlanner(config, resources, scheduler_config, vocab_size=100)
    first = generating(resources, 0)
    second = generating(resources, 1, drafts=[1])
    near_end = generating(resources, 2)
    near_end.sampling_params = SamplingParams(max_new_tokens=3)  # room for one draft only
    waiting = Request(3, [1, 2])
    # Three running generation requests: the schedule gives 0 drafts past a batch of 2.
    assert planner.propose([first, second, near_end, waiting]) == 0
    assert all(r.draft_tokens == [] for r in (first, second, near_end))
    second.cache.suspend()  # paused: asked nothing, and not counted
    drafter.drafts = [7, 7, 7]
    assert planner.propose([first, second, near_end, waiting]) == 2  # holds the 2 proposed
    assert drafter.asked[-1] == [(0, 2), (2, 1)]
    assert first.draft_tokens == [7, 7] and near_end.draft_tokens == [7]
    # A token budget of 5 holds 2 requests of 1 + 1 drafts: 1 is not compiled, so none.
    planner.scheduler_config = SchedulerConfig(max_batch_size=4, max_num_tokens=5, chunk_unit=1)
    assert planner.propose([first, near_end]) == 0 and first.draft_tokens == []
    planner.scheduler_config = scheduler_config
    drafter.drafts = [7, 1000]
    with pytest.raises(ValueError, match=r"proposed \[7, 1000\] for request 0"):
        planner.propose([first])
    for request in (first, second, near_end):
        resources.free(request)
    resources.manager.check_invariants()


def test_padding_is_allocated_before_prompts_are_admitted_and_evicts_like_growth():
    """Phase 1 grows a generation request by 1 + drafts and then by its padding, before phase 2
    admits prompts: a new prompt never takes the pages a running request's padding needs; a
    padding that does not fit suspends the tail as growth does."""
    # 4 usable device pages of 4 tokens; suspended pages go to the host.
    resources = make_resources(device_pages=5, max_draft_tokens=5, host_pages=8)
    running = generating(resources, 0, drafts=[5])  # 2 pages, history 6
    scheduler = Scheduler(SchedulerConfig(max_batch_size=4, max_num_tokens=32, chunk_unit=4),
                          resources)  # fmt: skip
    # The padding takes the third page; the prompt (2 pages) then waits. (Extended after
    # scheduling, the prompt would take 2 and the padding would suspend the running request.)
    prompt = Request(1, list(range(50, 58)))
    output = scheduler.schedule([running, prompt], padded_draft_len=4)
    assert output.generation_requests == [running] and output.context_requests == []
    assert running.cache.capacity == 6 + 1 + 4 and running.cache.num_blocks == 3
    resources.tokens_computed(running, [99], num_rejected=4)  # nothing accepted
    assert running.cache.capacity == running.cache.history_length == 7
    # Two running requests (3 pages), padding for one: the tail is suspended, the head runs.
    tail = generating(resources, 2, prompt_len=4)  # 1 page
    running.draft_tokens, tail.draft_tokens = [5], []
    output = scheduler.schedule([running, tail], padded_draft_len=5)  # head: 7 + 1 + 5, 4 pages
    assert output.generation_requests == [running] and output.paused_requests == [tail]
    assert tail.is_paused and tail.metrics.num_preemptions == 1
    for request in (running, tail):
        resources.free(request)
    resources.manager.check_invariants()


def test_scheduler_charges_padded_drafts_but_grows_by_real_ones():
    cache = FakeCache()
    requests = [cache.start(Request(i, [1, 2], state=RequestState.GENERATION_IN_PROGRESS))
                for i in range(3)]  # fmt: skip
    requests[0].draft_tokens = [5]
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, max_num_tokens=10, chunk_unit=2), cache)
    output = scheduler.schedule(requests, padded_draft_len=3)
    assert output.generation_requests == requests[:2]  # 4 tokens each; a third would need 12
    assert output.num_tokens == 8
    assert cache.calls.count(("extend", 0, 3)) == 1  # grown by 1 + 1 draft, then 2 of padding
    assert cache.active[0] == cache.active[1] == 1 + 1 + 3  # start unit + 1 + padded drafts
    with pytest.raises(ValueError, match="padded_draft_len=-1 must be >= 0"):
        scheduler.schedule(requests, padded_draft_len=-1)


# -- verification ---------------------------------------------------------------------------


def rows_of(n, temperature=0.0, top_k=0, top_p=1.0, seed=0, counter=0):
    seeds = (np.arange(n) + seed).astype(np.uint32)
    return (np.full(n, temperature, np.float32), np.full(n, top_k, np.int32),
            np.full(n, top_p, np.float32), seeds, np.full(n, counter, np.int32))  # fmt: skip


def test_greedy_verification_accepts_the_argmax_prefix_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 8)).astype(np.float32)  # 3 rows, W = 3
    best = logits.argmax(-1)
    drafts = np.array(
        [
            [best[0, 0], best[0, 1], (best[0, 2] + 1) % 8],  # third wrong
            [best[1, 0], best[1, 1], best[1, 2]],  # all right
            [best[2, 0], best[2, 1], best[2, 2]],  # right, but only 1 real draft
        ],
        np.int32,
    )
    num_drafts = np.array([3, 3, 1], np.int32)
    accepted, tokens = verify_tokens(logits.reshape(12, 8), drafts, num_drafts, *rows_of(3))
    assert accepted.tolist() == [2, 3, 1]
    assert tokens[0, :3].tolist() == [best[0, 0], best[0, 1], best[0, 2]]  # correction
    assert tokens[1].tolist() == best[1].tolist()  # 3 drafts and the bonus token
    assert tokens[2, :2].tolist() == best[2, :2].tolist()  # padding never counts
    # Without drafts it is `sample_tokens`, stream for stream.
    sampled = rows_of(3, temperature=0.8, seed=5, counter=7)
    _, alone = verify_tokens(logits[:, 0], np.zeros((3, 0), np.int32), np.zeros(3, np.int32),
                             *sampled)  # fmt: skip
    assert alone[:, 0].tolist() == sample_tokens(logits[:, 0], *sampled).tolist()


def empirical(counts_of, vocab):
    counts = np.bincount(counts_of, minlength=vocab)
    return counts / counts.sum()


@pytest.mark.parametrize("top_k", [0, 3])
def test_rejection_sampling_keeps_the_target_distribution(top_k):
    """Many independent rows (seeds) verifying the same two drafts: the first emitted token is
    distributed as the target's (filtered) distribution at position 0, and after an accepted
    first draft the next token as the target's at position 1."""
    vocab, n, temperature = 5, 40_000, 0.7
    logits = np.array([[1.0, 0.2, -0.5, 0.9, 0.0], [0.1, 1.2, 0.3, -1.0, 0.8],
                       [0.0] * 5], np.float32)  # fmt: skip
    drafts = np.array([3, 4], np.int32)  # point proposals (p(3) ~ 0.26 at position 0)
    flat = np.tile(logits, (n, 1))
    accepted, tokens = verify_tokens(
        flat, np.tile(drafts, (n, 1)), np.full(n, 2, np.int32), *rows_of(n, temperature, top_k)
    )
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)

    def target(row):
        scaled = logits[row] / temperature
        if top_k:
            scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
        p = np.exp(scaled - scaled.max())
        return p / p.sum()

    # Binomial standard error at n = 40k is <= 0.0025: 0.012 is ~5 sigma.
    assert np.abs(empirical(tokens[:, 0], vocab) - target(0)).max() < 0.012
    assert abs((accepted >= 1).mean() - target(0)[3]) < 0.012
    after = tokens[accepted >= 1, 1]
    assert np.abs(empirical(after, vocab) - target(1)).max() < 0.02
    if top_k:
        assert not np.isin(tokens[:, 0], [2, 4]).any()  # outside the top 3 at position 0


def test_verification_streams_follow_the_seed_not_the_batch_nor_the_drafts():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4 * 3, 16)).astype(np.float32)
    params = rows_of(4, temperature=1.0, seed=3, counter=2)
    # What plain sampling emits at each position (counters 2, 3, 4) for every row.
    plain = np.stack(
        [sample_tokens(logits[j::3], *params[:4], params[4] + j) for j in range(3)], axis=1
    )
    for drafts in (rng.integers(0, 16, (4, 2)), plain[:, :2], np.zeros((4, 2))):
        drafts = np.asarray(drafts, np.int32)
        accepted, tokens = verify_tokens(logits, drafts, np.full(4, 2, np.int32), *params)
        for row in range(4):
            n = int(accepted[row])
            assert tokens[row, : n + 1].tolist() == plain[row, : n + 1].tolist()
    accepted, _ = verify_tokens(logits, plain[:, :2], np.full(4, 2, np.int32), *params)
    assert accepted.tolist() == [2, 2, 2, 2]  # the target's own picks are all accepted
    alone = verify_tokens(logits[6:9], plain[2:3, :2], np.full(1, 2, np.int32),
                          *[a[2:3] for a in params])  # fmt: skip
    assert alone[1][0].tolist() == plain[2].tolist()
    jax.block_until_ready(alone)


def test_request_with_drafts_is_a_plain_record():
    request = Request(0, [1, 2, 3])
    request.draft_tokens = [4, 5]
    assert request.num_draft_tokens == 2
    assert dataclasses.replace(request).draft_tokens == [4, 5]
