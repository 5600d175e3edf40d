"""Requests' KV caches on a `KVCacheManager`: what the scheduler and the engine ask of them.

This is the glue of the reference's `KVCacheManagerV2` resource manager: the scheduler's cache
operations (`CacheOps`) and the updates after each step (commits for reuse, the history cursor,
closing). A request's lookup tokens leave out the last prompt token: its logits must be computed,
so its KV is never taken from the tree. Host side: imports no JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvjax.cache.checks import check_int
from kvjax.cache.kv_cache import CommitState
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.pages import Tier
from kvjax.serving.request import Request

__all__ = ["CacheResources"]


class CacheResources:
    """Creates, grows, suspends and closes the cache of each request.

    Args:
        manager: the pages.
        enable_block_reuse: look prompts up in the radix tree and commit them to it.
        commit_generated: also commit generated tokens (a follow-up turn then reuses them).
        max_draft_tokens: the most draft tokens a step pads to; a whole-lifetime reservation
            (GUARANTEED_NO_EVICT) includes them, so padding never needs pages it lacks.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        *,
        enable_block_reuse: bool = True,
        commit_generated: bool = False,
        max_draft_tokens: int = 0,
    ) -> None:
        self.manager = manager
        self.enable_block_reuse = enable_block_reuse
        self.commit_generated = commit_generated and enable_block_reuse
        self.max_draft_tokens = check_int("max_draft_tokens", max_draft_tokens, minimum=0)
        # Draft tokens each generation request was grown by this step, until the padding
        # extension pops it (the reference's `_allocated_draft_lens`).
        self._allocated_draft_lens: dict[int, int] = {}
        # Whole-life reservations (GUARANTEED_NO_EVICT): a rewind never shrinks below them.
        self._reserved: dict[int, int] = {}

    @property
    def max_tokens(self) -> int:
        """The most KV tokens one cache may have (the page-table width)."""
        return self.manager.max_blocks * self.manager.config.tokens_per_block

    # -- CacheOps, for the scheduler ----------------------------------------------------------

    def prepare_context(self, request: Request) -> bool:
        cache = request.cache
        if cache is not None:
            return cache.is_active or cache.resume()
        # Prompt log-probabilities need every prompt token's logits: none come from the cache.
        reuse = self.enable_block_reuse and not request.needs_prompt_logprobs
        lookup = request.context_key_tokens[:-1] if reuse else None
        cache = self.manager.create_kv_cache(
            lookup, lora_id=request.lora_id, salt=request.salt, priority=request.priority
        )
        if not self.enable_block_reuse:
            cache.stop_committing()
        if not cache.resume():
            cache.close()
            return False
        request.cache = cache
        request.context_position = cache.num_committed_tokens
        request.metrics.num_reused_tokens = cache.num_reused_tokens
        return True

    def resize_context(self, request: Request, num_tokens: int, reserve_tokens: int = 0) -> bool:
        cache = request.cache
        wanted = request.context_position + num_tokens
        if reserve_tokens:
            reserve_tokens = self._reservation(reserve_tokens)
        capacity = max(cache.capacity, wanted, reserve_tokens)
        if cache.resize(capacity=capacity):
            if reserve_tokens:
                self._reserved[request.request_id] = reserve_tokens
            return True
        self.release_unstarted(request)
        return False

    def _reservation(self, lifetime_tokens: int) -> int:
        """KV tokens a whole-life reservation takes: the lifetime, but never past what
        `max_seq_len` lets a sequence reach (plus drafts), nor what the device holds."""
        manager = self.manager
        tokens = min(lifetime_tokens, manager.max_seq_len) + self.max_draft_tokens
        device_tokens = manager.pages.num_usable(Tier.DEVICE) * manager.config.tokens_per_block
        return min(tokens, self.max_tokens, device_tokens)

    def release_unstarted(self, request: Request) -> None:
        if request.cache is not None and not request.context_started:
            request.cache.close()
            request.cache = None
            request.context_position = 0
            self._reserved.pop(request.request_id, None)

    def try_allocate_generation(self, request: Request) -> bool:
        cache = request.cache
        resumed = not cache.is_active
        if resumed and not cache.resume():
            return False
        # Exactly history + 1 + drafts (or the reservation): growth left by a step that did not
        # run is trimmed, so the padding and the rewind of this step land exactly on history.
        needed = cache.history_length + 1 + request.num_draft_tokens
        target = max(needed, self._reserved.get(request.request_id, 0))
        if cache.capacity == target or cache.resize(capacity=target):
            self._allocated_draft_lens[request.request_id] = request.num_draft_tokens
            return True
        if resumed:  # it stays paused as it was: not a new preemption
            cache.suspend()
        return False

    def extend_capacity_for_tokens(self, request: Request, padded_draft_len: int) -> bool:
        """Grows a scheduled generation request to hold its drafts padded to `padded_draft_len`:
        by exactly the padding (`padded_draft_len` minus the drafts it was grown by; its
        capacity was history + 1 + those), or by nothing when a whole-life reservation holds
        them already. The rewind computed from the padded length then never goes below
        history. Once per step: the record is popped.

        Returns:
            False, with nothing changed, when the device cannot hold the padding.

        Raises:
            ValueError: the request was not grown this step, or has more drafts than the pad.
        """
        allocated = self._allocated_draft_lens.pop(request.request_id, None)
        if allocated is None:
            raise ValueError(f"request {request.request_id} was not grown for generation this step")
        if padded_draft_len < allocated:
            raise ValueError(
                f"padded_draft_len={padded_draft_len} is below the {allocated} draft tokens "
                f"request {request.request_id} was grown by"
            )
        cache = request.cache
        needed = cache.history_length + 1 + padded_draft_len
        if cache.capacity >= needed or cache.resize(capacity=needed):
            return True
        self._allocated_draft_lens[request.request_id] = allocated
        return False

    def suspend_request(self, request: Request) -> None:
        self._allocated_draft_lens.pop(request.request_id, None)
        request.cache.suspend()
        request.metrics.num_preemptions += 1

    def can_suspend(self, request: Request) -> bool:
        """Whether the colder tiers can take the request's pages (free, or made free by moving
        or dropping cached pages); without a colder tier its pages stay on the device."""
        cache = request.cache
        # A cache per layer group (`GroupedKVCache`): each group's tiers take its own pages.
        grouped = hasattr(cache, "caches")
        parts = list(zip(self.manager.managers, cache.caches, strict=True)) if grouped else []
        for manager, part in parts or [(self.manager, cache)]:
            pages = manager.pages
            room = sum(pages.num_free(tier) + pages.num_evictable(tier) for tier in pages.tiers[1:])
            if pages.tiers[1:] and room < len(part.held_pages()):  # stale blocks hold none
                return False
        return True

    def recompute_request(self, request: Request) -> None:
        """Closes the request's cache (committed blocks stay in the tree, so the recomputation
        reuses what is still cached) and sends it back to the context phase."""
        self.free(request)
        request.restart_for_recompute()
        request.metrics.num_preemptions += 1

    def recompute_lost(self, requests: Sequence[Request]) -> list[Request]:
        """Sends back to recompute the requests whose cache lost KV to a failed disk read or
        write (`KVCacheManager.take_lost_caches`); returns them."""
        lost = set(map(id, self.manager.take_lost_caches()))
        hit = [r for r in requests if r.cache is not None and id(r.cache) in lost]
        for request in hit:
            self.recompute_request(request)
        return hit

    def is_request_active(self, request: Request) -> bool:
        return request.cache is not None and request.cache.is_active

    # -- after a step -------------------------------------------------------------------------

    def context_computed(self, request: Request, num_tokens: int) -> None:
        """`num_tokens` more prompt tokens have KV: commit them for reuse (or move the history),
        and stop committing at the prompt's end unless generated tokens are committed too."""
        cache = request.cache
        end = request.context_position + num_tokens
        if self._committing(request):
            cache.commit(request.context_key_tokens[cache.num_committed_tokens : end])
        else:
            cache.resize(history_length=end)
        request.context_position = end
        request.context_started = True
        if end == request.context_length and not self.commit_generated:
            cache.stop_committing()

    def tokens_computed(self, request: Request, tokens: list[int], num_rejected: int = 0) -> None:
        """Generated `tokens` have KV now (the input token of a generation step and the drafts
        accepted after it); the `num_rejected` draft positions past them (padding included)
        are rewound by shrinking capacity, which frees their trailing blocks (never below a
        whole-life reservation)."""
        cache = request.cache
        self._allocated_draft_lens.pop(request.request_id, None)
        if self.commit_generated and self._committing(request):
            cache.commit(tokens)
        else:
            cache.resize(history_length=cache.history_length + len(tokens))
        if num_rejected:
            floor = self._reserved.get(request.request_id, 0)
            cache.resize(capacity=max(cache.capacity - num_rejected, floor))

    def free(self, request: Request) -> None:
        """Closes the cache: committed blocks stay in the tree as reusable cache."""
        self._allocated_draft_lens.pop(request.request_id, None)
        self._reserved.pop(request.request_id, None)
        if request.cache is not None:
            request.cache.close()
            request.cache = None

    def _committing(self, request: Request) -> bool:
        return self.enable_block_reuse and request.cache.commit_state is not CommitState.USER_STOP
