"""Ranks a request's providers from live measurements, cools down failing ones, times hedges.

The router keeps a short in-memory window of recent attempts per (provider, model) — seeded from
the database at start-up — because ranking must be cheap on every request; the 30-day rankings
shown to people come from the database (gateway/stats.py).

With several replicas, each keeps its own latency window on purpose: behind a load balancer every
replica sees a random share of the same traffic, so its window of the last few hundred attempts
estimates the same p50 and success rate as a shared one would, without a network round trip on
every ranking; and the local provider is a different GPU on every replica, which a shared window
would blend. What must agree is rare and discrete, a provider being down: the breakers of the
hosted providers are shared through Redis (live/breakers.py), through `listener` and `apply_shared`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from fluxport.settings import Settings

# What we assume about a provider we have not measured yet: a FLUX.2 [dev] image takes about
# 10 s hosted (anchors.md §7) and a provider succeeds most of the time.
PRIOR_SECONDS = 10.0
PRIOR_SUCCESS = 0.9
PRIOR_WEIGHT = 5  # pseudo-observations behind the prior success rate
WINDOW = 200  # recent attempts kept per (provider, model)


class Strategy(StrEnum):
    BALANCED = "balanced"
    FASTEST = "fastest"
    CHEAPEST = "cheapest"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Health:
    """Recent outcomes of one provider for one model, and its circuit breaker."""

    samples: deque[tuple[bool, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    consecutive_failures: int = 0
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    cooldown_s: float = 0.0
    probing: bool = False
    # Derived from `samples`, recomputed only after they change (every request ranks, few record).
    _sorted: list[float] | None = None
    _successes: int | None = None

    def add(self, outcomes: Sequence[tuple[bool, float]]) -> None:
        self.samples.extend(outcomes)
        self._sorted = self._successes = None

    def latencies(self) -> list[float]:
        if self._sorted is None:
            self._sorted = sorted(seconds for ok, seconds in self.samples if ok)
        return self._sorted

    def success_rate(self) -> float:
        if self._successes is None:
            self._successes = sum(1 for good, _ in self.samples if good)
        return (self._successes + PRIOR_SUCCESS * PRIOR_WEIGHT) / (len(self.samples) + PRIOR_WEIGHT)

    def quantile(self, q: float) -> float | None:
        values = self.latencies()
        if not values:
            return None
        # Nearest-rank: the smallest observation with at least q of the sample at or below it.
        return values[max(0, math.ceil(q * len(values)) - 1)]


class BreakerListener(Protocol):
    """Told of every recorded outcome, and of a breaker that opened (for `cooldown_s`) or closed."""

    def outcome(
        self, provider: str, model: str, *, ok: bool, opened_s: float | None, closed: bool
    ) -> None: ...


@dataclass(frozen=True)
class Candidate:
    """One provider as the router sees it for this request."""

    name: str
    price_usd: float  # this request's estimated cost on this provider
    expected_s: float  # p50 / success rate: expected time to a success
    success_rate: float
    p50_s: float
    breaker: BreakerState


class Router:
    """Orders providers, tracks their health, and says when to hedge. One per process."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._health: dict[tuple[str, str], Health] = {}
        self._in_flight: dict[str, int] = {}  # provider -> calls running now (this process's)
        self.listener: BreakerListener | None = None

    def health(self, provider: str, model: str) -> Health:
        return self._health.setdefault((provider, model), Health())

    # -- measurements -----------------------------------------------------------------------------

    def record(self, provider: str, model: str, *, ok: bool, seconds: float) -> None:
        """An attempt finished (cancelled hedge losers are not recorded: they say nothing)."""
        h = self.health(provider, model)
        h.add([(ok, seconds)])
        was_closed = h.state is BreakerState.CLOSED
        opened: float | None = None
        if ok:
            h.consecutive_failures = 0
            h.state, h.probing, h.cooldown_s = BreakerState.CLOSED, False, 0.0
        else:
            h.consecutive_failures += 1
            if h.state is BreakerState.HALF_OPEN:
                # The probe failed: stay out twice as long (capped at ten minutes).
                opened = min(max(h.cooldown_s, self.settings.breaker_cooldown_s) * 2, 600.0)
            elif h.consecutive_failures >= self.settings.breaker_failures:
                opened = self.settings.breaker_cooldown_s
            if opened is not None:
                self._open(h, opened)
        if self.listener is not None:
            self.listener.outcome(provider, model, ok=ok, opened_s=opened, closed=ok and not was_closed)

    def trip(self, provider: str, model: str) -> float:
        """Open the breaker now (failures counted by all replicas reached the limit); its cool-down."""
        h = self.health(provider, model)
        self._open(h, self.settings.breaker_cooldown_s)
        return h.cooldown_s

    def apply_shared(self, provider: str, model: str, *, open_s: float | None, cooldown_s: float) -> None:
        """What the replicas share says this breaker is open for `open_s` more seconds (out of a
        `cooldown_s` cool-down), tripped but cooled down (open_s 0: half-open) or, with `cooldown_s`
        0, closed."""
        h = self.health(provider, model)
        now = self.clock()
        if cooldown_s <= 0:
            if h.state is not BreakerState.CLOSED:
                h.state, h.probing, h.cooldown_s, h.consecutive_failures = BreakerState.CLOSED, False, 0.0, 0
            return
        if open_s is not None and open_s > 0:
            ends = now + open_s
            if h.state is not BreakerState.OPEN or h.opened_at + h.cooldown_s < ends - 0.05:
                h.state, h.opened_at, h.cooldown_s = BreakerState.OPEN, ends - cooldown_s, cooldown_s
                h.probing = False
        elif h.state is BreakerState.CLOSED:
            # Tripped elsewhere and cooled down, not yet proven back: this replica probes too.
            h.state, h.cooldown_s, h.probing = BreakerState.HALF_OPEN, cooldown_s, False

    def seed(self, provider: str, model: str, outcomes: Sequence[tuple[bool, float]]) -> None:
        """Warm the window from recorded attempts (oldest first) without touching the breaker."""
        h = self.health(provider, model)
        h.add(outcomes)

    def _open(self, h: Health, cooldown_s: float) -> None:
        h.state, h.opened_at, h.cooldown_s, h.probing = BreakerState.OPEN, self.clock(), cooldown_s, False

    def breaker(self, provider: str, model: str) -> BreakerState:
        h = self.health(provider, model)
        if h.state is BreakerState.OPEN and self.clock() - h.opened_at >= h.cooldown_s:
            h.state = BreakerState.HALF_OPEN
        return h.state

    def admit(self, provider: str, model: str) -> bool:
        """May an attempt go to this provider now? A half-open breaker lets one probe through."""
        state = self.breaker(provider, model)
        if state is BreakerState.CLOSED:
            return True
        h = self.health(provider, model)
        if state is BreakerState.HALF_OPEN and not h.probing:
            h.probing = True
            return True
        return False

    def release_probe(self, provider: str, model: str) -> None:
        """A probe ended without an outcome (cancelled): let the next request probe instead."""
        self.health(provider, model).probing = False

    def begin(self, provider: str, calls: int = 1) -> None:
        """`calls` calls started on `provider` (its load, for providers with a known capacity)."""
        self._in_flight[provider] = self._in_flight.get(provider, 0) + calls

    def end(self, provider: str, calls: int = 1) -> None:
        self._in_flight[provider] = max(0, self._in_flight.get(provider, 0) - calls)

    def in_flight(self, provider: str) -> int:
        return self._in_flight.get(provider, 0)

    # -- decisions --------------------------------------------------------------------------------

    def candidate(
        self, provider: str, model: str, price_usd: float, capacity: int | None = None
    ) -> Candidate:
        """With a `capacity` (an upstream's max_concurrency), the calls it already runs stretch the
        expected time: a server busy with all its slots makes a new request wait about one more p50.
        So several upstreams serving one model share the load by in-flight count and latency."""
        h = self.health(provider, model)
        p50 = h.quantile(0.5) or PRIOR_SECONDS
        rate = h.success_rate()
        expected = p50 / max(rate, 0.05)
        if capacity:
            expected *= 1.0 + self.in_flight(provider) / capacity
        return Candidate(provider, price_usd, expected, rate, p50, self.breaker(provider, model))

    def rank(
        self,
        model: str,
        prices: dict[str, float],
        strategy: Strategy,
        explicit: Sequence[str] | None = None,
        capacities: Mapping[str, int | None] | None = None,
    ) -> list[Candidate]:
        """Providers best first. `prices` holds every able provider's estimated cost for the request.

        An explicit order is kept as given; otherwise providers with an open breaker go last (a
        last resort beats a certain error), and the rest are ordered by the strategy:
        balanced = expected seconds to success + cost weight × expected dollars; fastest = expected
        seconds; cheapest = price, then expected seconds.
        """
        room = capacities or {}
        cands = {name: self.candidate(name, model, price, room.get(name)) for name, price in prices.items()}
        if explicit:
            return [cands[name] for name in explicit if name in cands]
        weight = self.settings.router_cost_weight

        def key(c: Candidate) -> tuple[float, ...]:
            cooled = 1.0 if c.breaker is BreakerState.OPEN else 0.0
            if strategy is Strategy.CHEAPEST:
                return (cooled, c.price_usd, c.expected_s)
            if strategy is Strategy.FASTEST:
                return (cooled, c.expected_s, c.price_usd)
            return (cooled, c.expected_s + weight * c.price_usd / max(c.success_rate, 0.05))

        return sorted(cands.values(), key=key)

    def hedge_after(self, provider: str, model: str) -> float | None:
        """Seconds after which to start a backup for an attempt on `provider`; None: don't hedge."""
        h = self.health(provider, model)
        if len(h.latencies()) < self.settings.hedge_min_samples:
            return None
        return h.quantile(self.settings.hedge_percentile)
