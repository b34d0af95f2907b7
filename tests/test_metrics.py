"""Prometheus metrics: the Metrics class, the /metrics route, and live queue depth from the local provider."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from fluxport.api import metrics as metrics_api
from fluxport.metrics import Metrics
from fluxport.providers.base import ProgressEvent
from fluxport.providers.local import LocalProvider
from fluxport.settings import Settings
from tests.test_local_provider import make_job


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and labels."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def app_with(m: Metrics) -> FastAPI:
    app = FastAPI()
    app.state.metrics = m
    app.include_router(metrics_api.router)
    return app


def test_requests_attempts_cost_and_latency() -> None:
    m = Metrics()
    m.observe_request("flux.2-dev", "generate", "succeeded", 3.0, 0.024)
    m.observe_request("flux.2-dev", "generate", "succeeded", 0.4, 0.012)
    m.observe_request("flux.2-dev", "edit", "failed", 1.0, None)
    m.observe_attempt("flux.2-dev", "fal", "succeeded", 2.9, 0.024)
    m.observe_attempt("flux.2-dev", "replicate", "cancelled", 1.5, 0.012)  # a billed hedge loser
    m.observe_attempt("flux.2-dev", "fal", "failed", 0.2)
    s = samples(m.render())

    gen = {"model": "flux.2-dev", "operation": "generate"}
    assert s[key("fluxport_requests_total", **gen, status="succeeded")] == 2
    assert s[key("fluxport_requests_total", model="flux.2-dev", operation="edit", status="failed")] == 1
    assert s[key("fluxport_request_duration_seconds_count", **gen)] == 2
    assert s[key("fluxport_request_duration_seconds_sum", **gen)] == 3.4
    assert s[key("fluxport_request_duration_seconds_bucket", **gen, le="0.5")] == 1
    assert s[key("fluxport_request_duration_seconds_bucket", **gen, le="5.0")] == 2
    assert abs(s[key("fluxport_request_cost_usd_total", **gen)] - 0.036) < 1e-12
    assert key("fluxport_request_cost_usd_total", model="flux.2-dev", operation="edit") not in s

    fal_ok = {"model": "flux.2-dev", "provider": "fal", "outcome": "succeeded"}
    assert s[key("fluxport_attempts_total", **fal_ok)] == 1
    assert s[key("fluxport_attempts_total", model="flux.2-dev", provider="fal", outcome="failed")] == 1
    lost = {"model": "flux.2-dev", "provider": "replicate", "outcome": "cancelled"}
    assert s[key("fluxport_attempts_total", **lost)] == 1
    assert s[key("fluxport_attempt_duration_seconds_sum", **fal_ok)] == 2.9
    assert s[key("fluxport_attempt_cost_usd_total", model="flux.2-dev", provider="replicate")] == 0.012
    assert s[key("fluxport_attempt_cost_usd_total", model="flux.2-dev", provider="fal")] == 0.024


def test_queue_depth_set_and_read_at_scrape_time() -> None:
    m = Metrics()
    m.set_queue_depth("remote", "gpu-box", 2)
    live = {"cuda:0": 1}
    m.track_queue("local", lambda: dict(live))

    def broken() -> dict[str, int]:
        raise RuntimeError("gone")

    m.track_queue("flaky", broken)  # a failing source is skipped, the scrape still works
    s = samples(m.render())
    assert s[key("fluxport_queue_depth", provider="remote", device="gpu-box")] == 2
    assert s[key("fluxport_queue_depth", provider="local", device="cuda:0")] == 1
    live.update({"cuda:0": 4, "cuda:1": 0})
    s = samples(m.render())
    assert s[key("fluxport_queue_depth", provider="local", device="cuda:0")] == 4
    assert s[key("fluxport_queue_depth", provider="local", device="cuda:1")] == 0
    assert not any(labels and ("provider", "flaky") in labels for _, labels in s)


async def test_route_serves_each_apps_own_registry() -> None:
    first, second = Metrics(), Metrics()  # two apps in one process must not share or collide
    first.observe_request("flux.2-dummy", "generate", "succeeded", 0.1, 0.0)
    apps = [app_with(first), app_with(second)]
    bodies = []
    for app in apps:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=")
        bodies.append(samples(r.text))
    done = key("fluxport_requests_total", model="flux.2-dummy", operation="generate", status="succeeded")
    assert bodies[0][done] == 1
    assert done not in bodies[1]


async def test_local_provider_queue_depth_is_live() -> None:
    provider = LocalProvider(Settings(dummy_steps=2, local_queue_size=8))
    m = Metrics()
    m.track_queue("local", provider.queue_depths)
    seen: list[int] = []

    def progress(event: ProgressEvent) -> None:
        # Runs on the device worker thread, as a scrape would run concurrently.
        if event.stage == "step" and event.step == 1:
            depths = samples(m.render())
            seen.append(int(sum(v for (name, _), v in depths.items() if name == "fluxport_queue_depth")))

    try:
        assert provider.queue_depths() == {}
        jobs = [provider.generate(make_job(size=(64, 64), seed=i), progress) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*jobs), 120)
        # The first job starts after the pipeline loads, by which time all three are queued.
        assert seen == [3, 2, 1]
        assert set(provider.queue_depths().values()) == {0}
    finally:
        await provider.aclose()
