"""Speculative decoding on the host: the drafter interface, the n-gram (prompt lookup) drafter,
the draft-length schedule and the drafting of each step.

A drafter proposes up to k tokens per generation request before the step is scheduled; the
target model verifies them all in one ragged step (q_len = 1 + k per request). Drafts are point
proposals (no draft distribution): greedy verification accepts a draft while it equals the
target's argmax, sampled verification accepts it with the target probability of that token and
otherwise samples from the target with the token removed, which keeps the target distribution
exactly (`kvjax.runtime.sampling.verify_tokens` does both by comparing each draft with the
target's own pick). Host side: imports no JAX.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from kvjax.cache.checks import check_int
from kvjax.serving.request import Request, RequestState
from kvjax.serving.resources import CacheResources
from kvjax.serving.scheduler import SchedulerConfig

__all__ = [
    "DraftLimits",
    "DraftPlanner",
    "Drafter",
    "NgramDrafter",
    "SpeculativeConfig",
    "check_speculative",
    "draft_len_for_batch_size",
]


@dataclasses.dataclass(frozen=True)
class DraftLimits:
    """The target engine's limits, given once to a drafter that defines `bind` (see
    `Drafter`)."""

    max_draft_tokens: int  # the most drafts per request and call
    max_seq_len: int  # the target's longest sequence (prompt and outputs)
    max_batch_size: int  # the most requests per call
    max_num_tokens: int  # the target's tokens per step (a catch-up is chunked to it)


class Drafter(Protocol):
    """Proposes draft tokens. The engine calls `propose` once per step for the generation
    requests whose caches are active, and tells the drafter when a request is suspended or
    ends, so a drafter with its own KV cache mirrors the target's allocations.

    A drafter that needs the engine's limits (its own cache, compiled steps) also defines
    `bind(limits: DraftLimits) -> None`, which the engine calls once while it is built.
    """

    def propose(self, requests: Sequence[Request], max_lens: Sequence[int]) -> list[list[int]]:
        """Up to `max_lens[i]` draft tokens to follow `requests[i]`'s prompt and outputs."""
        ...

    def suspend(self, request: Request) -> None:
        """The target suspended the request's cache."""
        ...

    def release(self, request: Request) -> None:
        """The request finished or was aborted."""
        ...

    def shutdown(self) -> None:
        """The engine shuts down (idempotent)."""
        ...


def draft_len_for_batch_size(schedule: Mapping[int, int], batch_size: int) -> int:
    """The draft length of the smallest batch-size key >= `batch_size` (keys are upper bounds:
    `{4: 4, 8: 2, 32: 1}` gives 4 up to 4 requests, 2 up to 8, 1 up to 32, 0 past 32)."""
    keys = sorted(schedule)
    index = bisect.bisect_left(keys, batch_size)
    return 0 if index == len(keys) else schedule[keys[index]]


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding for an `Engine`.

    Args:
        drafter: proposes the tokens (`NgramDrafter`, `kvjax.engine.draft_model.DraftModelDrafter`).
        max_draft_tokens: the most draft tokens per request and step; page tables count them.
        draft_len_schedule: batch-size upper bound -> draft length (each <= max_draft_tokens);
            None drafts `max_draft_tokens` at every batch size. Every length it yields is a
            compiled step shape, and each step pads its drafts to that length.
    """

    drafter: Drafter
    max_draft_tokens: int
    draft_len_schedule: Mapping[int, int] | None = None

    def __post_init__(self) -> None:
        check_int("max_draft_tokens", self.max_draft_tokens, minimum=1)
        for key, value in (self.draft_len_schedule or {}).items():
            check_int("draft_len_schedule key", key, minimum=1)
            check_int(f"draft_len_schedule[{key}]", value, minimum=0, maximum=self.max_draft_tokens)
        if self.draft_len_schedule is not None and not self.draft_len_schedule:
            raise ValueError("draft_len_schedule is empty; use None to always draft the max")

    def draft_len(self, batch_size: int) -> int:
        """Draft tokens per request in a step of `batch_size` generation requests."""
        if self.draft_len_schedule is None:
            return self.max_draft_tokens
        return draft_len_for_batch_size(self.draft_len_schedule, batch_size)

    @property
    def draft_lengths(self) -> tuple[int, ...]:
        """Every draft length a step may pad to, and 0 (steps without drafts)."""
        schedule = self.draft_len_schedule or {1: self.max_draft_tokens}
        return tuple(sorted({0, *schedule.values()}))


class NgramDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens (n from `max_ngram` down to `min_ngram`), in prompt and outputs.

    Args:
        max_ngram, min_ngram: the suffix lengths tried, longest first.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.min_ngram = check_int("min_ngram", min_ngram, minimum=1)
        self.max_ngram = check_int("max_ngram", max_ngram, minimum=min_ngram)

    def propose(self, requests: Sequence[Request], max_lens: Sequence[int]) -> list[list[int]]:
        return [
            self.lookup([*r.prompt_token_ids, *r.output_token_ids], k)
            for r, k in zip(requests, max_lens, strict=True)
        ]

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens continuing `tokens` by its longest matched suffix (most recent
        match), or none."""
        seq = np.asarray(tokens, np.int64)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            # Windows that end before the last token, so a match is followed by >= 1 token.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            (starts,) = np.nonzero(np.all(windows == seq[-n:], axis=1))
            if len(starts):
                start = int(starts[-1]) + n
                return [int(t) for t in seq[start : start + k]]
        return []

    def suspend(self, request: Request) -> None:
        pass  # no state

    def release(self, request: Request) -> None:
        pass

    def shutdown(self) -> None:
        pass


class DraftPlanner:
    """The engine's drafting before each step is scheduled.

    Args:
        config: the drafter and draft lengths.
        resources: the target's caches.
        scheduler_config: its batch size caps the batch the schedule is read at; its token
            budget caps the draft length so that every generating request still fits.
        vocab_size: proposals outside the vocabulary are refused.
    """

    def __init__(
        self,
        config: SpeculativeConfig,
        resources: CacheResources,
        scheduler_config: SchedulerConfig,
        vocab_size: int,
    ) -> None:
        self.config = config
        self.drafter = config.drafter
        self.resources = resources
        self.scheduler_config = scheduler_config
        self.vocab_size = vocab_size

    def propose(self, queue: Sequence[Request]) -> int:
        """Sets the drafts of the generation requests that can run (not paused), at the
        schedule's length for their number; returns the step's draft length: the smallest
        compiled one holding the longest proposal."""
        for request in queue:
            request.draft_tokens = []
        # Paused requests get none: they resume only if memory allows, without drafts.
        candidates = [
            r for r in queue if r.state is RequestState.GENERATION_IN_PROGRESS and not r.is_paused
        ]
        wanted = self._draft_len(len(candidates))
        asks = [(r, min(wanted, self._room_for_drafts(r))) for r in candidates]
        asks = [(r, k) for r, k in asks if k > 0]
        if not asks:
            return 0
        proposals = self.drafter.propose([r for r, _ in asks], [k for _, k in asks])
        longest = 0
        for (request, k), drafts in zip(asks, proposals, strict=True):
            drafts = [int(t) for t in drafts]
            if len(drafts) > k or any(not 0 <= t < self.vocab_size for t in drafts):
                raise ValueError(
                    f"the drafter proposed {drafts} for request {request.request_id}: at most "
                    f"{k} tokens in [0, {self.vocab_size}) were asked for"
                )
            request.draft_tokens = drafts
            longest = max(longest, len(drafts))
        return min(d for d in self.config.draft_lengths if d >= longest)

    def _draft_len(self, num_candidates: int) -> int:
        """The schedule's length for the batch, lowered to a compiled length at which every
        generating request fits the token budget (drafting never shrinks the batch)."""
        batch = max(1, min(num_candidates, self.scheduler_config.max_batch_size))
        wanted = self.config.draft_len(batch)
        budget = self.scheduler_config.max_num_tokens
        if budget is not None:
            wanted = min(wanted, budget // batch - 1)
        return max(d for d in self.config.draft_lengths if d <= wanted)

    def _room_for_drafts(self, request: Request) -> int:
        """Drafts that could still be emitted: the token after them must fit the request's
        `max_new_tokens` and `max_seq_len`."""
        generated = len(request.output_token_ids)
        left = min(
            request.sampling_params.max_new_tokens - generated,
            self.resources.manager.max_seq_len - request.prompt_length - generated,
        )
        return left - 1


def check_speculative(
    speculative: SpeculativeConfig | None, config: SchedulerConfig
) -> tuple[int, ...]:
    """The draft lengths steps may pad to ((0,) without speculation); raises when a step
    budget cannot hold one request's verification row."""
    if speculative is None:
        return (0,)
    if not isinstance(speculative, SpeculativeConfig):
        raise ValueError(f"speculative={speculative!r} is not a SpeculativeConfig")
    most = speculative.max_draft_tokens
    if config.max_num_tokens is not None and config.max_num_tokens < 1 + most:
        raise ValueError(
            f"max_num_tokens={config.max_num_tokens} cannot hold one verification row of "
            f"1 + max_draft_tokens={most} tokens"
        )
    return speculative.draft_lengths
