"""The two-phase scheduler against a fake cache: the reference's scheduler V2 scenarios (budgets,
draft tokens, tail eviction and self-eviction, LoRA dedup and pre-claim, chunk sizing, two-phase
ordering, sorting, deadlock)."""

import pytest

from kvjax.serving.request import Request, RequestState
from kvjax.serving.scheduler import Scheduler, SchedulerConfig, SchedulerPolicy

GEN, CTX = RequestState.GENERATION_IN_PROGRESS, RequestState.CONTEXT_INIT


class FakeCache:
    """Device memory in units (one unit per token); suspended requests' units leave the device."""

    def __init__(self, free=10**9, fail_prepare=(), reuse=None, host=None):
        self.free = free
        self.host = host  # units the colder tiers can take (None: any number)
        self.active: dict[int, int] = {}
        self.suspended: dict[int, int] = {}
        self.fail_prepare = set(fail_prepare)
        self.reuse = dict(reuse or {})
        self.calls: list[tuple[str, int]] = []
        self.lost: set[int] = set()  # request ids whose KV a disk failure lost

    def start(self, request, units=1):
        self.active[request.request_id] = units
        self.free -= units
        return request

    def _resume(self, rid):
        units = self.suspended[rid]
        if units > self.free:
            return False
        self.free -= units
        self.active[rid] = self.suspended.pop(rid)
        return True

    def _take(self, rid, units):
        if units > self.free:
            return False
        self.free -= units
        self.active[rid] = self.active.get(rid, 0) + units
        return True

    def prepare_context(self, request):
        rid = request.request_id
        self.calls.append(("prepare", rid))
        if rid in self.fail_prepare:
            return False
        if rid in self.suspended:
            return self._resume(rid)
        if rid not in self.active:
            self.active[rid] = 0
            request.context_position = self.reuse.get(rid, request.context_position)
        return True

    def resize_context(self, request, num_tokens, reserve_tokens=0):
        self.calls.append(("resize", request.request_id, num_tokens, reserve_tokens))
        if self._take(request.request_id, max(num_tokens, reserve_tokens)):
            return True
        self.release_unstarted(request)
        return False

    def release_unstarted(self, request):
        if not request.context_started and request.request_id in self.active:
            self.free += self.active.pop(request.request_id)

    def try_allocate_generation(self, request):
        rid = request.request_id
        self.calls.append(("generation", rid))
        if rid in self.suspended and not self._resume(rid):
            return False
        return self._take(rid, 1 + request.num_draft_tokens)

    def extend_capacity_for_tokens(self, request, padded_draft_len):
        self.calls.append(("extend", request.request_id, padded_draft_len))
        return self._take(request.request_id, padded_draft_len - request.num_draft_tokens)

    def can_suspend(self, request):
        return self.host is None or self.host >= self.active[request.request_id]

    def suspend_request(self, request):
        rid = request.request_id
        self.calls.append(("suspend", rid))
        units = self.active.pop(rid)
        self.suspended[rid] = units
        self.free += units
        if self.host is not None:
            self.host -= units

    def recompute_lost(self, requests):
        lost = [r for r in requests if r.request_id in self.lost]
        for request in lost:
            self.recompute_request(request)
        self.lost = set()
        return lost

    def recompute_request(self, request):
        rid = request.request_id
        self.calls.append(("recompute", rid))
        if rid in self.suspended:
            units = self.suspended.pop(rid)
            self.host = None if self.host is None else self.host + units
        else:
            self.free += self.active.pop(rid)
        request.restart_for_recompute()

    def is_request_active(self, request):
        return request.request_id in self.active


def gen(rid, lora_id=None, drafts=0):
    return Request(rid, [1] * 8, state=GEN, lora_id=lora_id, draft_tokens=[0] * drafts)


def ctx(rid, length=8, lora_id=None, drafts=0, position=0):
    request = Request(rid, [1] * length, lora_id=lora_id, draft_tokens=[0] * drafts)
    request.context_position = position
    request.context_started = position > 0
    return request


def schedule(requests, cache=None, lora_pages=None, **config):
    cache = cache or FakeCache()
    config.setdefault("chunk_unit", 1)
    scheduler = Scheduler(SchedulerConfig(**config), cache, lora_pages)
    return scheduler.schedule(requests)


def ids(requests):
    return [r.request_id for r in requests]


def ctx_ids(output):
    return [(c.request.request_id, c.chunk_size, c.is_last_chunk) for c in output.context_requests]


# -- budgets ----------------------------------------------------------------------------------


def test_generation_token_budget_and_batch_size():
    out = schedule([gen(i) for i in range(5)], max_num_tokens=3, max_batch_size=8)
    assert ids(out.generation_requests) == [0, 1, 2] and out.num_tokens == 3
    out = schedule([gen(i) for i in range(5)], max_num_tokens=100, max_batch_size=2)
    assert ids(out.generation_requests) == [0, 1]
    out = schedule([gen(i) for i in range(5)], max_num_tokens=None, max_batch_size=8)
    assert len(out.generation_requests) == 5


def test_draft_tokens_count_in_generation_and_last_chunk_budgets():
    out = schedule([gen(0, drafts=2), gen(1, drafts=2)], max_num_tokens=5)
    assert ids(out.generation_requests) == [0]  # 3 + 3 > 5
    out = schedule([gen(0, drafts=2), gen(1, drafts=1)], max_num_tokens=5)
    assert ids(out.generation_requests) == [0, 1] and out.num_tokens == 5  # exact fit
    cache = FakeCache()
    out = schedule([ctx(0, length=8, drafts=3)], cache, max_num_tokens=11, chunk_unit=4)
    assert ctx_ids(out) == [(0, 8, True)] and out.num_tokens == 11
    assert ("resize", 0, 11, 0) in cache.calls  # the whole draft joins the last chunk
    # The prompt fits but its drafts do not: end it in a later step.
    out = schedule([ctx(0, length=8, drafts=3)], max_num_tokens=10, chunk_unit=4)
    assert ctx_ids(out) == [(0, 4, False)]


# -- generation: tail eviction ----------------------------------------------------------------


def test_generation_shortage_without_victims_schedules_earlier_ones_and_pauses_itself():
    cache = FakeCache(free=6)  # 2 units free once the four hold theirs
    requests = [cache.start(gen(i)) for i in range(4)]
    out = schedule(requests, cache)
    # 0 and 1 grow; 2 fails: victim 3 is suspended, then 2 succeeds; nothing is left for 3.
    assert ids(out.generation_requests) == [0, 1, 2]
    assert ids(out.paused_requests) == [3]


def test_victims_come_from_the_tail_and_the_end_pointer_shrinks():
    cache = FakeCache(free=4)  # nothing free once the four hold theirs
    requests = [cache.start(gen(i)) for i in range(4)]
    out = schedule(requests, cache)
    # 0 needs one unit: victim 3 frees one. 1 needs one: victim 2 frees one. Then the end.
    assert ids(out.generation_requests) == [0, 1]
    assert ids(out.paused_requests) == [3, 2]
    assert ("generation", 2) not in cache.calls and ("generation", 3) not in cache.calls


def test_one_request_evicts_several_victims():
    cache = FakeCache(free=4)
    requests = [cache.start(gen(0, drafts=2))] + [cache.start(gen(i)) for i in (1, 2, 3)]
    out = schedule(requests, cache)
    assert ids(out.generation_requests) == [0]  # needs 3 units: three victims
    assert ids(out.paused_requests) == [3, 2, 1]


def test_insufficient_eviction_pauses_the_victim_and_then_itself():
    cache = FakeCache(free=2)
    big = cache.start(gen(0, drafts=4), units=1)
    small = cache.start(gen(1), units=1)
    out = schedule([big, small], cache)
    assert out.generation_requests == []
    assert ids(out.paused_requests) == [1, 0]
    assert cache.active == {}


def test_suspended_unstarted_and_finished_requests_are_not_victims():
    def setup(with_started_chunk):
        cache = FakeCache(free=3 + with_started_chunk)
        head = cache.start(gen(0))
        paused = gen(1)
        cache.suspended[1] = 1  # already suspended: holds nothing on the device
        first_chunk = cache.start(ctx(2), units=1)  # prepared, but its prompt has not started
        done = cache.start(gen(3), units=1)
        done.state = RequestState.COMPLETE
        requests = [head, paused, first_chunk, done]
        if with_started_chunk:  # a non-first chunk is a victim
            requests.append(cache.start(ctx(4, position=4), units=1))
        return cache, requests

    cache, requests = setup(False)
    # No active victim: the paused request is recomputed (its KV dropped), then the head
    # suspends itself; the next pass has nothing left to preempt: a deadlock.
    out = schedule(requests, cache, max_num_tokens=1)
    assert ids(out.paused_requests) == [1, 0] and cache.suspended == {0: 1}
    assert (
        requests[1].state is RequestState.CONTEXT_INIT and requests[1].num_recomputed_outputs == 0
    )
    with pytest.raises(RuntimeError, match="deadlock"):  # self-eviction is no progress
        schedule(requests, cache, max_num_tokens=1)
    assert cache.suspended == {0: 1}
    cache, requests = setup(True)
    out = schedule(requests, cache, max_num_tokens=1)
    assert ids(out.generation_requests) == [0] and ids(out.paused_requests) == [4]


def test_a_paused_generation_request_resumes_when_memory_allows():
    cache = FakeCache(free=5)
    request = gen(0)
    cache.suspended[0] = 3
    out = schedule([request], cache)
    assert ids(out.generation_requests) == [0] and cache.active == {0: 4}


# -- context ----------------------------------------------------------------------------------


def test_context_prepare_and_resize_failures_skip_without_consuming_budget():
    cache = FakeCache(free=10, fail_prepare=[0])
    requests = [ctx(0, 4), ctx(1, 12), ctx(2, 6), gen(3)]
    cache.start(requests[3], units=0)
    out = schedule(requests, cache, max_num_tokens=8, enable_chunked_prefill=False)
    # 0 cannot be prepared; 1 exceeds the budget (a whole prompt): STOP, as the reference does.
    assert ids(out.generation_requests) == [3] and ctx_ids(out) == []
    out = schedule([ctx(0, 4), ctx(1, 12), ctx(2, 6)], FakeCache(free=8), max_num_tokens=20)
    # 0 takes 4 units; 1 fails to resize (12 > 4 left) and is skipped; 2 needs 6 > 4: skipped.
    assert ctx_ids(out) == [(0, 4, True)]
    out = schedule([ctx(1, 12), ctx(0, 4)], FakeCache(free=8), max_num_tokens=14)
    assert ctx_ids(out) == [(0, 4, True)] and out.num_tokens == 4  # 1 consumed nothing


def test_reuse_found_while_preparing_shortens_what_remains():
    cache = FakeCache(reuse={0: 28})
    out = schedule([ctx(0, 32)], cache, max_num_tokens=8, chunk_unit=4)
    assert ctx_ids(out) == [(0, 4, True)]  # prepared first: only 4 tokens remain
    partial = FakeCache(reuse={0: 13})  # reuse ending mid-block is the cache's business
    out = schedule([ctx(0, 32)], partial, max_num_tokens=8, chunk_unit=4)
    assert ctx_ids(out) == [(0, 8, False)] and ("resize", 0, 8, 0) in partial.calls


def test_chunk_sizes():
    def chunks(length, position=0, **config):
        config = {"chunk_unit": 4, **config}
        return ctx_ids(schedule([ctx(0, length, position=position)], **config))

    assert chunks(30, max_num_tokens=10) == [(0, 8, False)]  # budget, rounded down to the unit
    assert chunks(30, position=24, max_num_tokens=10) == [(0, 6, True)]  # the last: unrounded
    assert chunks(30, max_num_tokens=32, max_context_length=12) == [(0, 12, False)]
    with pytest.raises(ValueError, match="chunk_unit=4 exceeds the per-step prompt limit 3"):
        SchedulerConfig(max_num_tokens=3, chunk_unit=4)  # no chunk could ever fit
    # Less than one unit left: skipped, unless the whole prompt fits.
    out = schedule([gen(5), gen(6), ctx(0, 2), ctx(1, 30)], max_num_tokens=5, chunk_unit=4)
    assert ctx_ids(out) == [(0, 2, True)]
    out = schedule([ctx(0, 6), ctx(1, 30), ctx(2, 30)], max_num_tokens=16, chunk_unit=4)
    assert ctx_ids(out) == [(1, 8, False), (0, 6, True)]  # share the budget; 2 gets < 1 unit


def test_generation_goes_first_even_behind_context_in_the_queue():
    out = schedule([ctx(0), ctx(1), gen(2)], max_batch_size=2)
    assert ids(out.generation_requests) == [2] and ctx_ids(out) == [(0, 8, True)]


def test_state_filter_and_inflight_requests():
    done, finishing = gen(0), gen(1)
    done.state, finishing.state = RequestState.COMPLETE, RequestState.GENERATION_TO_COMPLETE
    requests = [done, finishing, gen(2), gen(3), ctx(4)]
    out = Scheduler(SchedulerConfig(), FakeCache()).schedule(requests, inflight_ids={3, 4})
    assert ids(out.generation_requests) == [2] and ctx_ids(out) == []
    assert schedule([]).is_empty


# -- LoRA -------------------------------------------------------------------------------------


def test_lora_pages_are_charged_once_per_adapter():
    requests = [gen(0, lora_id=7), gen(1, lora_id=7), gen(2, lora_id=8), gen(3)]
    out = schedule(requests, lora_pages={7: 3, 8: 2}, max_lora_pages=4)
    # 7 costs 3 once; 8 would make 5 > 4: STOP in phase 1, as the reference does.
    assert ids(out.generation_requests) == [0, 1]
    out = schedule(requests, lora_pages={7: 3, 8: 2}, max_lora_pages=5)
    assert ids(out.generation_requests) == [3, 0, 1, 2]  # sorted: no LoRA first, then by id


def test_lora_check_comes_before_any_kv_call_and_skips_in_phase_two():
    cache = FakeCache()
    requests = [ctx(0, lora_id=1), ctx(1, lora_id=2), ctx(2, lora_id=1)]
    out = schedule(requests, cache, lora_pages={1: 2, 2: 2}, max_lora_pages=3)
    assert [c[0] for c in ctx_ids(out)] == [0, 2]
    assert ("prepare", 1) not in cache.calls


def test_lora_pages_are_charged_only_after_kv_success():
    cache = FakeCache(free=4)
    requests = [ctx(0, 8, lora_id=1), ctx(1, 4, lora_id=2)]
    out = schedule(requests, cache, lora_pages={1: 2, 2: 2}, max_lora_pages=2)
    assert [c[0] for c in ctx_ids(out)] == [1]  # 0 failed to resize: its adapter is not held


def test_finishing_requests_pre_claim_their_adapters():
    finishing = gen(0, lora_id=1)
    finishing.state = RequestState.GENERATION_TO_COMPLETE
    requests = [finishing, ctx(1, lora_id=2), ctx(2, lora_id=1)]
    out = schedule(requests, lora_pages={1: 2, 2: 2}, max_lora_pages=3)
    assert [c[0] for c in ctx_ids(out)] == [2]  # adapter 1 is in use: 2 does not fit beside it
    # The budget starts afresh each pass.
    out = schedule(requests[1:], lora_pages={1: 2, 2: 2}, max_lora_pages=3)
    assert [c[0] for c in ctx_ids(out)] == [1]


# -- order, policy, deadlock ------------------------------------------------------------------


def test_output_order_lora_then_non_last_chunks_first():
    requests = [ctx(0, 4, lora_id=5), ctx(2, 4), ctx(1, 40), gen(3, lora_id=2), gen(4)]
    out = schedule(requests, max_num_tokens=32, chunk_unit=4, lora_pages={5: 1, 2: 1})
    assert ctx_ids(out) == [(1, 20, False), (2, 4, True), (0, 4, True)]
    assert ids(out.generation_requests) == [4, 3]


def test_guaranteed_no_evict_reserves_the_whole_life_and_never_pauses():
    cache = FakeCache(free=30)
    first = ctx(0, 8)  # 8 prompt + 16 new tokens: reserves 24
    second = ctx(1, 8)
    out = schedule([first, second], cache, policy=SchedulerPolicy.GUARANTEED_NO_EVICT)
    assert ctx_ids(out) == [(0, 8, True)]  # the second would need 24 more: not admitted
    assert ("resize", 0, 8, 24) in cache.calls
    cache = FakeCache(free=0)
    running = [cache.start(gen(i)) for i in range(3)]
    with pytest.raises(RuntimeError, match="deadlock"):
        schedule(running, cache, policy=SchedulerPolicy.GUARANTEED_NO_EVICT)
    assert not any(call[0] == "suspend" for call in cache.calls)


def test_deadlock_raises_with_what_to_change_but_eviction_is_progress():
    cache = FakeCache(free=0)
    cache.suspended = {0: 2, 1: 2}
    requests = [gen(0), gen(1)]
    out = schedule(requests, cache)  # the last resort: recompute the paused tail
    assert ids(out.paused_requests) == [1] and cache.suspended == {0: 2}
    with pytest.raises(RuntimeError, match="host tier"):  # nothing left to preempt
        schedule(requests, cache)
    cache = FakeCache(free=2)
    requests = [cache.start(gen(0), units=1), cache.start(gen(1), units=1)]
    requests[0].draft_tokens = [0] * 3
    out = schedule(requests, cache)  # nothing scheduled, but both were suspended: no raise
    assert out.generation_requests == [] and ids(out.paused_requests) == [1, 0]


def test_a_thousand_generation_requests():
    out = schedule([gen(i) for i in range(1000)], max_batch_size=512, max_num_tokens=None)
    assert len(out.generation_requests) == 512


def test_an_adapter_larger_than_the_lora_budget_is_refused():
    with pytest.raises(ValueError, match=r"lora_pages\[1\]=5 must be in \[0, 4\]"):
        Scheduler(SchedulerConfig(max_lora_pages=4), FakeCache(), {1: 5})


def test_bad_scheduler_config_is_refused():
    with pytest.raises(ValueError, match="max_batch_size=0 must be >= 1"):
        SchedulerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="chunk_unit"):
        SchedulerConfig(chunk_unit=0)
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="fcfs")


def test_new_prompts_wait_while_a_started_request_is_paused():
    """Admission control: memory freed while a paused request cannot resume goes to it, not to
    a new prompt; a prompt already started continues."""
    cache = FakeCache(free=7 + 5 + 4)  # 7 free once the two below are started
    running = cache.start(gen(0), units=5)
    paused = ctx(1, position=4)  # a chunked prompt suspended halfway
    cache.suspended[1] = 7  # more than is free once `running` grew
    # The new prompt would fit next to the started one: admission control keeps it out.
    started, fresh = cache.start(ctx(2, position=4), units=4), ctx(3, length=2)
    out = schedule([running, paused, started, fresh], cache)
    assert ids(out.generation_requests) == [0]
    assert [c.request.request_id for c in out.context_requests] == [2]
    assert 3 not in cache.active  # the new prompt took nothing
    out = schedule([running, fresh], FakeCache(free=50))
    assert [c.request.request_id for c in out.context_requests] == [3]  # nothing paused


def test_recomputation_when_the_colder_tiers_cannot_take_a_victim():
    """A victim whose pages the host cannot take is recomputed: its KV dropped, back to the
    context phase with its outputs as context; one the host can take is suspended."""
    cache = FakeCache(free=2 + 2 + 4, host=3)  # the device is full once they are started
    head = cache.start(gen(0), units=2)
    small, large = cache.start(gen(1), units=2), cache.start(gen(2), units=4)
    large.output_token_ids = [5, 6, 7]
    out = schedule([head, small, large], cache)
    assert ids(out.generation_requests) == [0, 1] and ids(out.paused_requests) == [2]
    assert ("recompute", 2) in cache.calls and large.state is RequestState.CONTEXT_INIT
    assert large.num_recomputed_outputs == 3 and large.context_length == 8 + 3
    assert (
        large.context_token_ids(6, 11) == [1, 1, 5, 6, 7] and large.metrics.num_recomputations == 1
    )
    cache.free = 0
    out = schedule([head, small], cache)
    assert ids(out.paused_requests) == [1] and ("suspend", 1) in cache.calls


def test_a_request_whose_cache_operation_raises_fails_alone():
    class Broken(FakeCache):
        def prepare_context(self, request):
            if request.request_id == 1:
                raise ValueError("a broken request")
            return super().prepare_context(request)

    requests = [ctx(0), ctx(1), ctx(2)]
    out = schedule(requests, Broken())
    assert [c.request.request_id for c in out.context_requests] == [0, 2]
    assert ids(out.failed_requests) == [1] and requests[1].error == "ValueError: a broken request"


def test_requests_whose_kv_a_disk_failure_lost_recompute_and_leave_the_batch():
    cache = FakeCache()
    requests = [cache.start(gen(0)), cache.start(gen(1)), cache.start(ctx(2, position=4))]
    cache.lost = {1, 2}
    out = schedule(requests, cache, max_num_tokens=100)
    assert ids(out.generation_requests) == [0] and ctx_ids(out) == []
    assert out.num_tokens == 1
    assert ("recompute", 1) in cache.calls and ("recompute", 2) in cache.calls
    assert requests[1].state is RequestState.CONTEXT_INIT  # back to its context phase
