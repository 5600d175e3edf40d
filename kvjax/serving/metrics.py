"""Serving metrics: a timeline of steps and the figures users compare engines by (throughput,
TTFT and TPOT percentiles, prefix hit rate, preemptions). Host side: imports no JAX."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from kvjax.cache.pages import Tier
from kvjax.serving.request import RequestOutput

__all__ = ["EngineMetrics", "StepRecord", "Totals", "percentiles"]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    start: float  # perf_counter seconds
    end: float
    num_seqs: int
    num_tokens: int  # real tokens computed
    num_padded_tokens: int  # tokens of the bucket it ran in
    num_generated: int  # tokens sampled into outputs
    num_drafted: int  # draft tokens proposed (padding excluded)
    num_accepted: int  # draft tokens the target accepted (and the request kept)
    num_verified_seqs: int  # generation rows (each emits 1 + its accepted drafts)
    num_paused: int  # requests the scheduler suspended
    device_in_use: float  # fraction of device pages held by requests
    device_evictable: float  # fraction of device pages that may go: cache, suspended requests
    host_in_use: float  # fraction of host pages held (0 without a host tier)


def percentiles(values, points=(50, 90, 99)) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    return {f"p{p}": float(np.percentile(values, p)) if values else None for p in points}


@dataclasses.dataclass
class Totals:
    """Running sums since the engine started (kept whatever the window drops)."""

    steps: int = 0
    requests: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verified_seqs: int = 0
    preemptions: int = 0
    recomputations: int = 0
    first_start: float | None = None
    last_end: float = 0.0

    def add_step(self, record: StepRecord) -> None:
        if self.first_start is None:
            self.first_start = record.start
        self.last_end = record.end
        self.steps += 1
        self.computed_tokens += record.num_tokens
        self.padded_tokens += record.num_padded_tokens
        self.drafted += record.num_drafted
        self.accepted += record.num_accepted
        self.verified_seqs += record.num_verified_seqs

    def add_request(self, output: RequestOutput) -> None:
        self.requests += 1
        self.output_tokens += len(output.token_ids)
        self.prompt_tokens += len(output.prompt_token_ids)
        self.reused_tokens += output.metrics.num_reused_tokens
        self.preemptions += output.metrics.num_preemptions
        self.recomputations += output.metrics.num_recomputations


class EngineMetrics:
    """Totals since the start and the last `window` steps and finished requests (the timeline
    and the percentiles), so that a long-running engine keeps bounded memory.

    Written by the stepping thread; `summary` from another thread may see a step half-counted.
    """

    def __init__(self, manager, window: int = 100_000) -> None:
        self._tiers = manager.pages
        self.totals = Totals()
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=window)
        self.finished: collections.deque[RequestOutput] = collections.deque(maxlen=window)

    @property
    def num_steps(self) -> int:
        return self.totals.steps

    def record_step(
        self, start, end, batch, output, num_generated: int, num_accepted: int = 0
    ) -> None:
        tiers = self._tiers
        num_device = tiers.num_usable(Tier.DEVICE)
        evictable = tiers.num_evictable(Tier.DEVICE) / num_device
        host = tiers.utilization(Tier.HOST) if Tier.HOST in tiers.tiers else 0.0
        record = StepRecord(
            start=start, end=end, num_seqs=len(batch.requests),
            # The scheduler charged every generation row its padded drafts: not real tokens.
            num_tokens=output.num_tokens - batch.num_draft_padding,
            num_padded_tokens=int(batch.inputs.tokens.shape[0]), num_generated=num_generated,
            num_drafted=int(batch.num_drafts.sum()), num_accepted=num_accepted,
            num_verified_seqs=len(output.generation_requests),
            num_paused=len(output.paused_requests), device_in_use=tiers.utilization(),
            device_evictable=evictable, host_in_use=host,
        )  # fmt: skip
        self.steps.append(record)
        self.totals.add_step(record)

    def record_finished(self, output: RequestOutput) -> None:
        self.finished.append(output)
        self.totals.add_request(output)

    def summary(self) -> dict:
        """Totals since the start; TTFT and TPOT percentiles over the window."""
        t, done = self.totals, self.finished
        elapsed = t.last_end - t.first_start if t.first_start is not None else 0.0
        generated, prompt, verified, drafted = (
            t.output_tokens,
            t.prompt_tokens,
            t.verified_seqs,
            t.drafted,
        )
        return {
            "requests": t.requests,
            "steps": t.steps,
            "elapsed_s": elapsed,
            "output_tokens": generated,
            "prompt_tokens": prompt,
            "output_tokens_per_s": generated / elapsed if elapsed else 0.0,
            "total_tokens_per_s": (generated + prompt) / elapsed if elapsed else 0.0,
            "ttft_s": percentiles(o.metrics.ttft for o in done),
            "tpot_s": percentiles(o.tpot for o in done),
            "prefix_hit_rate": t.reused_tokens / prompt if prompt else 0.0,
            "preemptions": t.preemptions,
            "recomputations": t.recomputations,
            "padding_waste": 1 - t.computed_tokens / t.padded_tokens if t.padded_tokens else 0.0,
            "draft_tokens": drafted,
            "acceptance_rate": t.accepted / drafted if drafted else 0.0,
            # Tokens a generation request gains per step it is verified in (1 without drafts).
            "tokens_per_step": (verified + t.accepted) / verified if verified else 0.0,
        }
