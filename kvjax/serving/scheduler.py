"""The two-phase scheduler of the seed PR: generation first, then context, in one pass that
allocates KV as it decides ("try and see").

Phase 1 grows every generation request by 1 + its draft tokens; on a shortage it preempts
started requests from the tail of the queue, then itself: by suspension while the colder tiers
can take their pages (they stay queued, paused), else by recomputation (their KV dropped, the
committed blocks left in the tree; they return to the context phase). Phase 2 takes the context
requests it deferred, in arrival order: it prepares the cache first (prefix reuse may shorten
what remains), then takes a chunk within the token budget; while a started request stays paused
it admits no new prompt (admission control), so the paused ones get the memory first. LoRA
adapters are charged once each against a device-page budget, and adapters of requests finishing
are pre-claimed. A pass
that schedules nothing, evicts nothing and could not grow a started request is a deadlock: it
raises saying what to change. Host side: imports no JAX.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from kvjax.cache.checks import check_int
from kvjax.serving.budget import BudgetTracker
from kvjax.serving.request import Request, RequestState

__all__ = [
    "BudgetTracker",
    "CacheOps",
    "ScheduledContext",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerPolicy",
]


class SchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = "max_utilization"  # admit greedily; suspend started requests on shortage
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"  # reserve each request's whole life; never pause


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step.

    Args:
        max_batch_size: sequences per step.
        max_num_tokens: tokens per step (None: unlimited).
        policy: see `SchedulerPolicy`.
        enable_chunked_prefill: split prompts over steps; otherwise a prompt runs whole.
        chunk_unit: non-last chunks are rounded down to a multiple of it.
        max_context_length: most prompt tokens of one request per step (default
            `max_num_tokens`).
        max_lora_pages: device pages LoRA adapters may take in one step (None: unlimited).
    """

    max_batch_size: int = 8
    max_num_tokens: int | None = 256
    policy: SchedulerPolicy = SchedulerPolicy.MAX_UTILIZATION
    enable_chunked_prefill: bool = True
    chunk_unit: int = 16
    max_context_length: int | None = None
    max_lora_pages: int | None = None

    def __post_init__(self) -> None:
        check_int("max_batch_size", self.max_batch_size, minimum=1)
        for name in ("max_num_tokens", "max_context_length", "max_lora_pages"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_int("chunk_unit", self.chunk_unit, minimum=1)
        if self.enable_chunked_prefill and self.chunk_unit > self.context_limit:
            raise ValueError(
                f"chunk_unit={self.chunk_unit} exceeds the per-step prompt limit "
                f"{self.context_limit} (max_num_tokens / max_context_length): no chunk would fit"
            )
        if not isinstance(self.policy, SchedulerPolicy):
            raise ValueError(f"policy={self.policy!r} is not a SchedulerPolicy")

    @property
    def context_limit(self) -> float:
        limit = self.max_context_length or self.max_num_tokens
        return math.inf if limit is None else limit


class CacheOps(Protocol):
    """What the scheduler asks of the KV cache (`CacheResources` on a `KVCacheManager`)."""

    def prepare_context(self, request: Request) -> bool:
        """Creates (with prefix reuse) or resumes the request's cache; False when it can't."""

    def resize_context(self, request: Request, num_tokens: int, reserve_tokens: int = 0) -> bool:
        """Room for `num_tokens` more prompt tokens (and `reserve_tokens` in all); False, and an
        unstarted request's cache released, when the device can't hold them."""

    def release_unstarted(self, request: Request) -> None:
        """Drops the cache of a request whose prompt has not started, if it has one."""

    def try_allocate_generation(self, request: Request) -> bool:
        """Resumes if needed and grows by 1 + draft tokens; False when the device can't."""

    def extend_capacity_for_tokens(self, request: Request, padded_draft_len: int) -> bool:
        """Grows a request just grown for generation by its draft padding, once per step;
        False, with nothing changed, when the device can't."""

    def suspend_request(self, request: Request) -> None: ...

    def can_suspend(self, request: Request) -> bool:
        """Whether suspending the active request keeps its KV: colder tiers have room for it
        (else suspending frees no device page, and only recomputation makes room)."""

    def recompute_request(self, request: Request) -> None:
        """Preemption by recomputation: drops the request's KV (its committed blocks stay in
        the tree as cache) and sends it back to the context phase."""

    def is_request_active(self, request: Request) -> bool: ...

    def recompute_lost(self, requests: Sequence[Request]) -> list[Request]:
        """Sends back to recompute the requests whose KV a failed disk read or write lost;
        returns them."""


@dataclasses.dataclass(frozen=True)
class ScheduledContext:
    request: Request
    chunk_size: int  # prompt tokens this step computes
    is_last_chunk: bool  # the prompt ends in this step (its draft tokens run with it)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    context_requests: list[ScheduledContext]
    generation_requests: list[Request]
    paused_requests: list[Request]  # suspended by this pass
    num_tokens: int  # tokens this step computes
    # Requests whose cache operations raised: each fails alone (`Request.fail`).
    failed_requests: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return len(self.context_requests) + len(self.generation_requests)

    @property
    def is_empty(self) -> bool:
        return self.num_requests == 0


def _is_started(request: Request) -> bool:
    """Whether the request holds KV a step computed (a preemption candidate)."""
    if request.state is RequestState.GENERATION_IN_PROGRESS:
        return True
    return request.state is RequestState.CONTEXT_INIT and request.context_started


def _lora_order(lora_id: int | None) -> tuple[int, int]:
    return (0, 0) if lora_id is None else (1, lora_id)


class Scheduler:
    """Decides each step's batch; see the module docstring.

    Args:
        config: the limits.
        cache: the KV operations (`CacheResources` for a real manager).
        lora_pages: device pages of each known LoRA adapter, for `max_lora_pages`.
    """

    def __init__(
        self, config: SchedulerConfig, cache: CacheOps, lora_pages: Mapping[int, int] | None = None
    ) -> None:
        self.config = config
        self.cache = cache
        self.lora_pages = dict(lora_pages or {})
        limit = config.max_lora_pages
        for lora_id, pages in self.lora_pages.items():
            check_int(f"lora_pages[{lora_id}]", pages, minimum=0, maximum=limit)

    def schedule(
        self,
        requests: Sequence[Request],
        inflight_ids: Collection[int] = (),
        padded_draft_len: int = 0,
    ) -> SchedulerOutput:
        """One pass over the queue (arrival order; earlier requests win memory).

        `padded_draft_len`: the step pads every generation request's drafts to this many
        tokens (a compiled shape), so each is charged `1 + max(drafts, padded_draft_len)`
        tokens; its KV grows by `1 + drafts`, then by the padding (`extend_capacity_for_tokens`),
        both in phase 1: memory goes to running requests before any prompt is admitted.

        Raises:
            RuntimeError: a deadlock: started requests exist, none could be scheduled or grown,
                and nothing could be suspended to make room.
        """
        budget = BudgetTracker(self.config, self.lora_pages)
        for request in requests:
            if request.state is RequestState.GENERATION_TO_COMPLETE:
                budget.pre_claim_lora(request.lora_id)
        check_int("padded_draft_len", padded_draft_len, minimum=0)
        generation, deferred, paused, stuck = self._generation_phase(
            requests, inflight_ids, budget, padded_draft_len
        )
        # Admission control: while a started request stays paused, no new prompt takes memory.
        active = self.cache.is_request_active
        if any(_is_started(r) and not active(r) for r in requests):
            deferred = [r for r in deferred if r.context_started]
        failed: list[Request] = []
        context = self._context_phase(deferred, budget, failed)
        if stuck and not generation and not context and not failed:
            raise RuntimeError(
                "scheduler deadlock: started requests cannot grow, none can be suspended to make "
                "room and nothing else fits; give the KVCacheManager a host tier (host_pages or "
                "host_bytes in CacheConfig) to suspend to, or more device pages"
            )
        lost = set(map(id, self.cache.recompute_lost(requests)))
        if lost:  # a disk read or write failed (in this pass or since the last): recompute
            context = [c for c in context if id(c.request) not in lost]
            generation = [r for r in generation if id(r) not in lost]
        context.sort(key=lambda c: (c.is_last_chunk, _lora_order(c.request.lora_id)))
        generation.sort(key=lambda r: _lora_order(r.lora_id))
        num_tokens = sum(
            c.chunk_size + c.is_last_chunk * c.request.num_draft_tokens for c in context
        )
        num_tokens += sum(1 + max(r.num_draft_tokens, padded_draft_len) for r in generation)
        return SchedulerOutput(context, generation, paused, num_tokens, failed)

    def _generation_phase(self, requests, inflight_ids, budget: BudgetTracker, padded_draft_len):
        cache, no_evict = self.cache, self.config.policy is SchedulerPolicy.GUARANTEED_NO_EVICT
        generation: list[Request] = []
        deferred: list[Request] = []
        paused: list[Request] = []
        kv_failed, num_victims = False, 0
        end, index = len(requests), 0
        while index < end and not budget.is_full:
            request = requests[index]
            index += 1
            if request.request_id in inflight_ids:
                continue
            if request.state is RequestState.CONTEXT_INIT:
                deferred.append(request)  # context waits for phase 2: generation goes first
                continue
            if request.state is not RequestState.GENERATION_IN_PROGRESS:
                continue
            lora_pages = budget.lora_pages_needed(request.lora_id)
            if lora_pages is None:
                break
            num_tokens = 1 + max(request.num_draft_tokens, padded_draft_len)
            if num_tokens > budget.tokens_left:
                break
            while not self._grow(request, padded_draft_len):
                victim = None if no_evict else self._tail_victim(requests, index, end)
                if victim is not None:  # preempt the newest started request and retry
                    self._preempt(requests[victim])
                    paused.append(requests[victim])
                    num_victims += 1
                    end = victim
                    continue
                kv_failed = True
                if not no_evict and cache.is_request_active(request):
                    self._preempt(request)  # itself: no progress, the next pass retries
                    paused.append(request)
                break
            else:
                budget.commit(num_tokens, request.lora_id, lora_pages)
                generation.append(request)
                continue
            if not no_evict:
                break
        return generation, deferred, paused, kv_failed and not num_victims

    def _grow(self, request: Request, padded_draft_len: int) -> bool:
        cache = self.cache
        if not cache.try_allocate_generation(request):
            return False
        return padded_draft_len == 0 or cache.extend_capacity_for_tokens(request, padded_draft_len)

    def _tail_victim(self, requests: Sequence[Request], start: int, end: int) -> int | None:
        """The index of the last started request in `[start, end)` whose cache is active; else
        of the last paused one (recomputing it frees the pages it holds)."""
        started = [i for i in range(start, end) if _is_started(requests[i])]
        active = [i for i in started if self.cache.is_request_active(requests[i])]
        return (active or started or [None])[-1]

    def _preempt(self, request: Request) -> None:
        """Suspends `request` when that keeps its KV, else recomputes it."""
        cache = self.cache
        if cache.is_request_active(request) and cache.can_suspend(request):
            cache.suspend_request(request)
        else:
            cache.recompute_request(request)

    def _context_phase(self, deferred: list[Request], budget: BudgetTracker, failed: list):
        config, cache = self.config, self.cache
        chunked = config.enable_chunked_prefill
        reserve = config.policy is SchedulerPolicy.GUARANTEED_NO_EVICT
        scheduled: list[ScheduledContext] = []
        for request in deferred:
            if budget.is_full:
                break
            lora_pages = budget.lora_pages_needed(request.lora_id)
            if lora_pages is None:
                continue
            if chunked and budget.tokens_left < min(config.chunk_unit, request.context_remaining):
                continue
            try:
                if not cache.prepare_context(request):
                    continue
            except Exception as error:  # this request's failure: it ends alone
                request.fail(error)
                failed.append(request)
                continue
            draft = request.num_draft_tokens
            chunk = self._chunk_size(request.context_remaining, draft, budget.tokens_left)
            if chunk is None:
                cache.release_unstarted(request)
                if chunked:
                    continue
                break  # a whole prompt that does not fit the budget waits its turn
            is_last = chunk == request.context_remaining
            num_tokens = chunk + draft * is_last
            lifetime = request.lifetime_tokens if reserve else 0
            if not cache.resize_context(request, num_tokens, lifetime):
                continue  # nothing consumed; a smaller request behind may still fit
            budget.commit(num_tokens, request.lora_id, lora_pages)
            scheduled.append(ScheduledContext(request, chunk, is_last))
        return scheduled

    def _chunk_size(self, remaining: int, draft: int, tokens_left: float) -> int | None:
        """Prompt tokens to compute now, or None when not even one chunk fits."""
        config = self.config
        if remaining + draft <= tokens_left and remaining <= config.context_limit:
            return remaining
        if not config.enable_chunked_prefill:
            return None
        chunk = int(min(tokens_left, config.context_limit, remaining))
        if chunk == remaining:  # the prompt fits but its draft tokens don't: end it next step
            chunk -= 1
        chunk -= chunk % config.chunk_unit
        return chunk or None
