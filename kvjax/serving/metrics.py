"""Serving metrics: a timeline of steps and the figures users compare engines by (throughput,
TTFT and TPOT percentiles, prefix hit rate, preemptions). Host side: imports no JAX."""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.cache.pages import Tier
from kvjax.serving.request import RequestOutput

__all__ = ["EngineMetrics", "StepRecord", "percentiles"]


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


class EngineMetrics:
    def __init__(self, manager) -> None:
        self._tiers = manager.pages
        self.steps: list[StepRecord] = []
        self.finished: list[RequestOutput] = []

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

    def record_finished(self, output: RequestOutput) -> None:
        self.finished.append(output)

    def summary(self) -> dict:
        """Figures over the recorded steps and finished requests."""
        steps, done = self.steps, self.finished
        elapsed = steps[-1].end - steps[0].start if steps else 0.0
        generated = sum(len(o.token_ids) for o in done)
        prompt = sum(len(o.prompt_token_ids) for o in done)
        reused = sum(o.metrics.num_reused_tokens for o in done)
        computed = sum(s.num_tokens for s in steps)
        padded = sum(s.num_padded_tokens for s in steps)
        drafted = sum(s.num_drafted for s in steps)
        accepted = sum(s.num_accepted for s in steps)
        decode_steps = [s for s in steps if s.num_verified_seqs]
        verified = sum(s.num_verified_seqs for s in decode_steps)
        return {
            "requests": len(done),
            "steps": len(steps),
            "elapsed_s": elapsed,
            "output_tokens": generated,
            "prompt_tokens": prompt,
            "output_tokens_per_s": generated / elapsed if elapsed else 0.0,
            "total_tokens_per_s": (generated + prompt) / elapsed if elapsed else 0.0,
            "ttft_s": percentiles(o.metrics.ttft for o in done),
            "tpot_s": percentiles(o.tpot for o in done),
            "prefix_hit_rate": reused / prompt if prompt else 0.0,
            "preemptions": sum(o.metrics.num_preemptions for o in done),
            "padding_waste": 1 - computed / padded if padded else 0.0,
            "draft_tokens": drafted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            # Tokens a generation request gains per step it is verified in (1 without drafts).
            "tokens_per_step": (verified + accepted) / verified if verified else 0.0,
        }
