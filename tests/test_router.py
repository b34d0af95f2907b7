"""The router's decisions as pure state: ranking, the circuit breaker and hedge timing."""

from __future__ import annotations

import pytest

from fluxport.gateway.router import BreakerState, Router, Strategy
from fluxport.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**overrides: object) -> tuple[Router, Clock]:
    clock = Clock()
    return Router(Settings(**overrides), clock=clock), clock  # type: ignore[arg-type]


def test_unmeasured_providers_share_a_prior_and_price_decides_balanced() -> None:
    router, _ = make()
    ranked = router.rank("m", {"fal": 0.012, "replicate": 0.012, "local": 0.0}, Strategy.BALANCED)
    assert ranked[0].name == "local"
    assert ranked[0].p50_s == ranked[1].p50_s == 10.0


def test_balanced_prefers_reliable_over_slightly_faster() -> None:
    router, _ = make()
    router.seed("fal", "m", [(True, 8.3)] * 100)
    router.seed("replicate", "m", [(True, 8.0)] * 49 + [(False, 8.0)] * 51)
    prices = {"fal": 0.012, "replicate": 0.012}
    assert [c.name for c in router.rank("m", prices, Strategy.BALANCED)] == ["fal", "replicate"]
    assert [c.name for c in router.rank("m", prices, Strategy.FASTEST)] == ["fal", "replicate"]
    cheaper = {"fal": 0.012, "replicate": 0.001}
    assert [c.name for c in router.rank("m", cheaper, Strategy.CHEAPEST)] == ["replicate", "fal"]


def test_fastest_follows_measured_latency() -> None:
    router, _ = make()
    router.seed("fal", "m", [(True, 9.0)] * 50)
    router.seed("replicate", "m", [(True, 3.0)] * 50)
    assert [c.name for c in router.rank("m", {"fal": 0.0, "replicate": 0.0}, Strategy.FASTEST)] == [
        "replicate",
        "fal",
    ]


def test_explicit_order_is_kept() -> None:
    router, _ = make()
    router.seed("fal", "m", [(True, 1.0)] * 50)
    ranked = router.rank(
        "m", {"fal": 0.0, "replicate": 1.0}, Strategy.BALANCED, explicit=["replicate", "fal"]
    )
    assert [c.name for c in ranked] == ["replicate", "fal"]


def test_breaker_trips_cools_down_probes_and_recovers() -> None:
    router, clock = make(breaker_failures=3, breaker_cooldown_s=30)
    for _ in range(2):
        router.record("fal", "m", ok=False, seconds=1)
    assert router.breaker("fal", "m") is BreakerState.CLOSED
    router.record("fal", "m", ok=False, seconds=1)
    assert router.breaker("fal", "m") is BreakerState.OPEN and not router.admit("fal", "m")
    # An open provider goes last in every ranking.
    assert router.rank("m", {"fal": 0.0, "replicate": 1.0}, Strategy.CHEAPEST)[-1].name == "fal"
    clock.now += 30
    assert router.breaker("fal", "m") is BreakerState.HALF_OPEN
    assert router.admit("fal", "m") is True  # one probe
    assert router.admit("fal", "m") is False  # and only one
    router.record("fal", "m", ok=True, seconds=1)
    assert router.breaker("fal", "m") is BreakerState.CLOSED and router.admit("fal", "m")


def test_a_failed_probe_doubles_the_cool_down() -> None:
    router, clock = make(breaker_failures=1, breaker_cooldown_s=10)
    router.record("fal", "m", ok=False, seconds=1)
    clock.now += 10
    assert router.admit("fal", "m")
    router.record("fal", "m", ok=False, seconds=1)
    clock.now += 15
    assert router.breaker("fal", "m") is BreakerState.OPEN
    clock.now += 5
    assert router.breaker("fal", "m") is BreakerState.HALF_OPEN


def test_cancelled_probe_is_released() -> None:
    router, clock = make(breaker_failures=1, breaker_cooldown_s=1)
    router.record("fal", "m", ok=False, seconds=1)
    clock.now += 1
    assert router.admit("fal", "m")
    router.release_probe("fal", "m")
    assert router.admit("fal", "m")


@pytest.mark.parametrize(("percentile", "expected"), [(0.5, 5.0), (0.75, 8.0), (0.9, 9.0)])
def test_hedge_after_the_configured_percentile(percentile: float, expected: float) -> None:
    router, _ = make(hedge_percentile=percentile, hedge_min_samples=10)
    assert router.hedge_after("fal", "m") is None
    router.seed("fal", "m", [(True, float(s)) for s in range(1, 11)] + [(False, 99.0)] * 5)
    assert router.hedge_after("fal", "m") == expected


def test_calls_in_flight_stretch_a_known_capacity() -> None:
    router, _ = make()
    for name in ("gpu-a", "gpu-b"):
        router.seed(name, "m", [(True, 2.0)] * 10)
    caps = {"gpu-a": 2, "gpu-b": 2}
    prices = {"gpu-a": 0.0, "gpu-b": 0.0}
    assert [c.name for c in router.rank("m", prices, Strategy.FASTEST, capacities=caps)] == ["gpu-a", "gpu-b"]
    router.begin("gpu-a", 2)  # both of gpu-a's slots busy: a new request waits about one more p50
    ranked = router.rank("m", prices, Strategy.FASTEST, capacities=caps)
    assert [c.name for c in ranked] == ["gpu-b", "gpu-a"]
    assert ranked[1].expected_s == pytest.approx(2 * ranked[0].expected_s)
    # Latency counts too: a busy upstream at 2 s (4 s expected) beats an idle one at 5 s.
    router.seed("gpu-b", "m", [(True, 5.0)] * 30)
    assert router.rank("m", prices, Strategy.FASTEST, capacities=caps)[0].name == "gpu-a"
    router.end("gpu-a", 2)
    assert router.in_flight("gpu-a") == 0
    # Without a capacity (fal, Replicate) the calls in flight change nothing.
    router.begin("gpu-a", 50)
    assert router.rank("m", prices, Strategy.FASTEST)[0].name == "gpu-a"
