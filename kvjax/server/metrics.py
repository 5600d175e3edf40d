"""The server's Prometheus metrics: request latencies observed as requests finish, and the
engine's counts and the cache's occupancy read at each scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvjax.engine.engine import Engine
from kvjax.serving.request import RequestOutput

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """A registry of its own (several servers may live in one process). `observe` from the
    engine loop's thread, scrapes from any thread (`prometheus_client` locks its histograms;
    the engine's totals may be read half-way through a step)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self._engine = engine
        self.registry.register(self)

        def histogram(name, text):
            return Histogram(name, text, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("kvjax_time_to_first_token_seconds", "Arrival to first token")
        self.tpot = histogram("kvjax_time_per_output_token_seconds", "Mean gap between tokens")
        self.e2e = histogram("kvjax_e2e_request_latency_seconds", "Arrival to finish")

    def observe(self, output: RequestOutput) -> None:
        """Records a finished request's latencies."""
        metrics = output.metrics
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if output.tpot is not None:
            self.tpot.observe(output.tpot)
        if metrics.finish_time is not None:
            self.e2e.observe(metrics.finish_time - metrics.arrival_time)

    def collect(self):
        engine = self._engine
        running, waiting = engine.request_counts()
        yield GaugeMetricFamily("kvjax_requests_running", "Requests holding device pages",
                                value=running)  # fmt: skip
        yield GaugeMetricFamily("kvjax_requests_waiting", "Requests queued or suspended",
                                value=waiting)  # fmt: skip
        totals = engine.metrics.totals
        counters = [
            ("kvjax_prefix_cache_queries", "Prompt tokens (finished)", totals.prompt_tokens),
            ("kvjax_prefix_cache_hits", "Of those, reused", totals.reused_tokens),
            ("kvjax_generation_tokens", "Tokens generated (finished)", totals.output_tokens),
            ("kvjax_requests_finished", "Requests finished", totals.requests),
            ("kvjax_preemptions", "Suspensions of finished requests", totals.preemptions),
            ("kvjax_recomputations", "Preemptions by recomputation", totals.recomputations),
            ("kvjax_steps", "Engine steps", totals.steps),
        ]  # fmt: skip
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        usage = GaugeMetricFamily(
            "kvjax_kv_cache_usage_ratio", "Share of a tier's pages in use", labels=["tier"]
        )
        pages = engine.manager.pages
        for tier in pages.tiers:
            usage.add_metric([tier.name.lower()], pages.utilization(tier))
        yield usage
