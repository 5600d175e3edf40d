"""Running scheduled steps on the device, the next one prepared while the previous one runs.

JAX dispatch is asynchronous: `StepRunner.run` builds a step's padded inputs, dispatches the
compiled step and the sampler, and returns before the device is done. The step's tokens stay on
the device; the rows that continue in the next step read their input token there (the sampler's
`fed` array, `kvjax.runtime.step.fed_tokens`), so the host schedules and builds step N+1 while
the device computes step N, and waits for step N's tokens only after dispatching step N+1.

Applying a step is split in two. When it is dispatched, each row's cache advances by the KV the
step writes and the token the row will emit is marked pending (`Request.num_pending_tokens`:
sampling keys, lengths and recomputation count it). When its tokens arrive, one step later,
they are appended and the stop checks run. A request that a token of step N finishes may already
sit in step N+1: its row there is void, and the KV the row wrote went with its closed cache.
Requests that their pending tokens end by length are never scheduled again. So every request
emits exactly the tokens of the serial loop. Steps with drafts stay serial (`run_serial`): the
drafter needs the previous step's tokens on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Collection

from kvjax.engine.batch import StepBatch, build_step_batch
from kvjax.engine.preflight import check_batch_agrees
from kvjax.runtime.sampling import SampledTokens, SamplingInputs, score_rows
from kvjax.runtime.step import allow_compile
from kvjax.serving.interrupts import interrupts_deferred
from kvjax.serving.request import Request, RequestState
from kvjax.serving.results import (
    advance_dispatched,
    apply_picks,
    apply_results,
    record_prompt_logprobs,
)
from kvjax.serving.scheduler import SchedulerOutput

__all__ = ["InFlightStep", "StepLost", "StepRunner"]


class StepLost(RuntimeError):
    """A dispatched step failed on the device: its tokens, and those of any step after it, are
    lost (the pool it returned cannot be trusted)."""


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose tokens the host has not applied yet."""

    batch: StepBatch
    output: SchedulerOutput
    sampled: SampledTokens
    start: float  # perf_counter seconds at scheduling's end
    emitting: list[int] = dataclasses.field(default_factory=list)  # rows whose token is pending

    def feeds(self) -> dict[int, int]:
        """Request id -> row, for each request whose pending token this step samples."""
        return {self.batch.requests[row].request_id: row for row in self.emitting}


class StepRunner:
    """Builds, dispatches and applies the engine's steps (see the module docstring).

    Threads: not thread-safe; the engine calls it under its step lock.

    Args:
        engine: the `Engine` whose registry, params, manager, resources, buckets, metrics and
            `_finish` the steps use.
        overlap: keep a step in flight between calls (False: every `run` waits for its tokens).
    """

    def __init__(self, engine, overlap: bool) -> None:
        self.engine = engine
        self.overlap = overlap
        self.inflight: InFlightStep | None = None
        # A step was lost and none has delivered its tokens since (the engine recovers once).
        self.recovering = False

    def ends_by_length(self, requests: Collection[Request]) -> set[int]:
        """Ids of requests whose pending tokens already end them: no step needs them again."""
        max_seq_len = self.engine.manager.max_seq_len
        return {
            r.request_id for r in requests if r.num_pending_tokens and r.ends_by_length(max_seq_len)
        }

    def run(self, output: SchedulerOutput) -> None:
        """Dispatches the scheduled step (no drafts), then applies the previous step's tokens
        (waiting for them), then advances this step's caches.

        Raises:
            StepLost: the previous step failed on the device; this one is dropped too.
            Exception: the dispatch failed (the previous step's tokens are applied first).
        """
        start = time.perf_counter()
        previous = self.inflight
        batch, sampling = self.build(output, 0, previous.feeds() if previous else None)
        try:
            sampled = self._dispatch(batch, sampling, previous and previous.sampled.fed)
        except Exception:
            self.drain()
            raise
        step = InFlightStep(batch, output, sampled, start)
        with interrupts_deferred():  # each cache advances with its request's tokens
            self.inflight = None
            if previous is not None:
                self._apply(previous)
            step.emitting = advance_dispatched(
                batch.requests, batch.chunk_sizes, self.engine.resources,
                finish=self.engine._finish, start=start,
            )  # fmt: skip
            self.inflight = step
        if not self.overlap:
            self.drain()

    def settle_penalized(self, queue: list[Request]) -> list[Request]:
        """Before scheduling: penalties count every output, so when a penalized request has a
        token in flight, waits for that step and applies it (the requests it finishes leave
        the returned queue). Done before scheduling, so no scheduled row's request can end
        under it."""
        if self.inflight is None or not any(
            r.num_pending_tokens and r.sampling_params.penalized for r in queue
        ):
            return queue
        self.drain()
        return [r for r in queue if r.state is not RequestState.COMPLETE]

    def drain(self) -> None:
        """Waits for the step in flight, if any, and applies its tokens."""
        step, self.inflight = self.inflight, None
        if step is not None:
            with interrupts_deferred():
                self._apply(step)

    def drop(self) -> None:
        """Forgets the step in flight (its requests were closed or recompute)."""
        step, self.inflight = self.inflight, None
        if step is not None:
            for row in step.emitting:
                step.batch.requests[row].num_pending_tokens = 0

    def build(self, output: SchedulerOutput, draft_len: int, feeds=None):
        """The padded step inputs and each row's sampling parameters."""
        engine = self.engine
        batch = build_step_batch(output, engine.manager, engine.buckets, draft_len, feeds)
        sampling = SamplingInputs(batch.inputs.key.num_seqs, engine.manager.max_seq_len)
        requests = batch.requests
        params = [r.sampling_params for r in requests]
        histories = None
        if any(p.penalized for p in params):  # settle_penalized left no token pending
            histories = [(r.prompt_token_ids, r.output_token_ids) for r in requests]
        sampling.fill(params, [r.num_outputs for r in requests], histories)
        if engine.check_agreement:
            check_batch_agrees(engine.metrics.num_steps, batch, sampling, engine.manager)
        return batch, sampling

    def _dispatch(self, batch: StepBatch, sampling: SamplingInputs, fed) -> SampledTokens:
        """Runs the compiled step (the pool donated) and the sampler, without waiting. A step
        that scores prompt tokens has its own shapes, compiled here unless warm-up did
        (`sampler_variants`)."""
        engine = self.engine
        manager, registry = engine.manager, engine.registry
        scoring = batch.sample_rows is not None
        with allow_compile() if scoring else contextlib.nullcontext():
            logits, manager.pool = registry(engine._params, manager.pool, batch.inputs, fed)
        prompt_logprobs = None
        if scoring:
            logits, prompt_logprobs = score_rows(logits, batch.sample_rows, batch.next_tokens)
        sampled = sampling.verify(logits, batch.draft_tokens, batch.num_drafts, engine.feed_size)
        return dataclasses.replace(sampled, prompt_logprobs=prompt_logprobs)

    def _apply(self, step: InFlightStep) -> None:
        engine = self.engine
        try:
            _, tokens = step.sampled.fetch()
        except Exception as error:
            self.inflight = step
            self.drop()
            raise StepLost(f"a step failed on the device: {error!r}") from error
        now = time.perf_counter()
        self.recovering = False
        record_prompt_logprobs(step.batch, step.sampled.fetch_prompt_logprobs())
        num_generated = apply_picks(
            step.batch.requests, step.emitting, tokens, eos_token_ids=engine.eos_token_ids,
            max_seq_len=engine.manager.max_seq_len, finish=engine._finish, now=now,
            logprobs=step.sampled.fetch_logprobs(),
        )  # fmt: skip
        engine.metrics.record_step(step.start, now, step.batch, step.output, num_generated, 0)

    def run_serial(self, output: SchedulerOutput, draft_len: int) -> None:
        """Runs a step with drafts to its end: dispatch, wait, verify and apply."""
        self.drain()
        engine = self.engine
        start = time.perf_counter()
        batch, sampling = self.build(output, draft_len)
        sampled = self._dispatch(batch, sampling, None)
        accepted, tokens = sampled.fetch()
        logprobs = sampled.fetch_logprobs()
        record_prompt_logprobs(batch, sampled.fetch_prompt_logprobs())
        now = time.perf_counter()
        self.recovering = False
        with interrupts_deferred():  # each cache advances with its request's tokens
            num_generated, num_accepted = apply_results(
                batch.requests, batch.chunk_sizes, accepted, tokens, batch.draft_len,
                engine.resources, eos_token_ids=engine.eos_token_ids,
                max_seq_len=engine.manager.max_seq_len, finish=engine._finish, start=start,
                now=now, logprobs=logprobs,
            )  # fmt: skip
        engine.metrics.record_step(start, now, batch, output, num_generated, num_accepted)
