"""Prometheus metrics: requests, latencies, attempts by provider and outcome, queue depth, cost.

Each app owns its registry (`Metrics().registry`), so several apps in one process (the tests) never
share or double-register collectors. `GET /metrics` serves `request.app.state.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("fluxport.metrics")

# Image generation takes from about a second (flash, dummy) to minutes (4 MP on a busy GPU).
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0)

QueueSource = Callable[[], dict[str, int]]


class _QueueDepth(Collector):
    """fluxport_queue_depth{provider, device}: values set explicitly, or read at scrape time."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], int] = {}
        self.sources: dict[str, QueueSource] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fluxport_queue_depth",
            "Jobs waiting or running per provider and device.",
            labels=["provider", "device"],
        )
        depths = dict(self.values)
        for provider, source in list(self.sources.items()):
            try:
                live = source()
            except Exception:  # a broken source must not break the scrape
                log.exception("queue depth source for %s failed", provider)
                continue
            depths.update({(provider, device): depth for device, depth in live.items()})
        for (provider, device), depth in sorted(depths.items()):
            family.add_metric([provider, device], depth)
        yield family


class Metrics:
    """The app's metrics; the gateway calls `observe_*` as requests and attempts finish."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fluxport_requests",
            "Image requests by model, operation and final status.",
            ["model", "operation", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fluxport_request_duration_seconds",
            "Time from receiving a request to its outcome.",
            ["model", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_cost = Counter(
            "fluxport_request_cost_usd",
            "What requests cost, in US dollars (all their billed attempts).",
            ["model", "operation"],
            registry=r,
        )
        self.attempts = Counter(
            "fluxport_attempts",
            "Provider attempts by model, provider and outcome (succeeded, failed, cancelled).",
            ["model", "provider", "outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "fluxport_attempt_duration_seconds",
            "Duration of one provider attempt.",
            ["model", "provider", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempt_cost = Counter(
            "fluxport_attempt_cost_usd",
            "What providers billed per attempt, in US dollars, hedge losers and billed failures included.",
            ["model", "provider"],
            registry=r,
        )
        self._queue = _QueueDepth()
        r.register(self._queue)

    def observe_request(
        self, model: str, operation: str, status: str, seconds: float, cost_usd: float | None = None
    ) -> None:
        self.requests.labels(model, operation, status).inc()
        self.request_seconds.labels(model, operation).observe(max(0.0, seconds))
        if cost_usd:
            self.request_cost.labels(model, operation).inc(cost_usd)

    def observe_attempt(
        self, model: str, provider: str, outcome: str, seconds: float, cost_usd: float | None = None
    ) -> None:
        self.attempts.labels(model, provider, outcome).inc()
        self.attempt_seconds.labels(model, provider, outcome).observe(max(0.0, seconds))
        if cost_usd:
            self.attempt_cost.labels(model, provider).inc(cost_usd)

    def set_queue_depth(self, provider: str, device: str, depth: int) -> None:
        self._queue.values[(provider, device)] = depth

    def track_queue(self, provider: str, source: QueueSource) -> None:
        """Read `provider`'s depth per device from `source()` at each scrape (LocalProvider.queue_depths)."""
        self._queue.sources[provider] = source

    def render(self) -> bytes:
        return generate_latest(self.registry)
