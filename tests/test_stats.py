"""Provider stats from recorded attempts, on SQLite and a real PostgreSQL: exact nearest-rank figures."""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from fluxport.gateway.stats import ProviderStats, provider_stats
from fluxport.storage.db import Database
from tests.storage_targets import Target

NOW = datetime(2031, 6, 1, 12, 0, tzinfo=UTC)
MODEL = "flux.2-dev"


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    """An empty database on SQLite and on PostgreSQL (the `target` fixture)."""
    database = await target.open()
    try:
        yield database
    finally:
        await database.close()


class Recorder:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.request_id = f"req_{secrets.token_hex(8)}"

    async def setup(self) -> Recorder:
        await self.db.create_request(
            id=self.request_id, model=MODEL, operation="generate", prompt="p", params={}, n=1
        )
        return self

    async def attempt(
        self,
        provider: str,
        status: str | None,
        total_ms: float | None = None,
        ttfb_ms: float | None = None,
        *,
        ago: timedelta = timedelta(hours=1),
        model: str = MODEL,
    ) -> None:
        """An attempt started `ago` before NOW; status None leaves it running."""
        attempt_id = await self.db.start_attempt(
            request_id=self.request_id, provider=provider, model=model, started_at=NOW - ago
        )
        if status is None:
            return
        await self.db.finish_attempt(
            attempt_id,
            status=status,
            error=None if status == "succeeded" else {"code": status},
            queued_ms=None,
            ttfb_ms=ttfb_ms,
            generation_ms=total_ms,
            total_ms=total_ms,
            provider_request_id=None,
            normalization=None,
            billed_usd=None,
        )


def nearest_rank(values: list[float], p: float) -> float:
    """The reference definition: the value at rank ceil(p * n), 1-based, of the sorted values."""
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered)) - 1]


async def test_exact_figures_with_exclusions(db: Database) -> None:
    rec = await Recorder(db).setup()
    # fal: 20 successes of 1..20 s (shuffled), TTFB 100 ms less; 5 failures.
    seconds = list(range(1, 21))
    random.Random(4).shuffle(seconds)
    for s in seconds:
        await rec.attempt("fal", "succeeded", s * 1000.0, s * 1000.0 - 100)
    for _ in range(5):
        await rec.attempt("fal", "failed", 50.0, 40.0)
    # None of these may count: hedge losers, still running, outside the window, another model.
    for _ in range(30):
        await rec.attempt("fal", "cancelled", 1.0, 1.0)
    await rec.attempt("fal", None)
    for _ in range(30):
        await rec.attempt("fal", "succeeded", 2.0, 1.0, ago=timedelta(days=30, seconds=1))
        await rec.attempt("fal", "failed", 2.0, 1.0, ago=timedelta(days=31))
        await rec.attempt("fal", "succeeded", 2.0, 1.0, ago=timedelta(seconds=-1))  # after NOW
        await rec.attempt("fal", "failed", 2.0, 1.0, model="flux.2-dev-flash")
    # replicate: three successes given out of order, no TTFB recorded; one failure.
    for ms in (300.0, 100.0, 200.0):
        await rec.attempt("replicate", "succeeded", ms)
    await rec.attempt("replicate", "failed", 5.0)
    # local: only a cancelled attempt, so no data.
    await rec.attempt("local", "cancelled", 10.0, 10.0)

    stats = await provider_stats(db, MODEL, providers=("local", "fal", "replicate"), now=NOW)
    assert stats == [
        ProviderStats("local", MODEL, 0, 0, None, None, None, None, 30),
        # p50: rank ceil(0.5 * 20) = 10 -> 10 s; p95: rank ceil(0.95 * 20) = 19 -> 19 s.
        ProviderStats("fal", MODEL, 25, 20, 0.8, 10_000.0, 19_000.0, 9_900.0, 30),
        # p50: rank ceil(1.5) = 2 -> 200; p95: rank ceil(2.85) = 3 -> 300.
        ProviderStats("replicate", MODEL, 4, 3, 0.75, 200.0, 300.0, None, 30),
    ]


async def test_window_bounds_and_length(db: Database) -> None:
    rec = await Recorder(db).setup()
    await rec.attempt("fal", "succeeded", 1000.0, 900.0, ago=timedelta(days=30))  # exactly at the start
    await rec.attempt("fal", "succeeded", 3000.0, 2900.0, ago=timedelta(days=10))
    await rec.attempt("fal", "failed", None, None, ago=timedelta(days=2))
    await rec.attempt("fal", "succeeded", 2000.0, None, ago=timedelta(0))  # exactly at now: excluded

    [month] = await provider_stats(db, MODEL, now=NOW)
    assert (month.requests, month.successes, month.p50_ms, month.p95_ms) == (3, 2, 1000.0, 3000.0)
    assert month.ttfb_p50_ms == 900.0 and month.success_rate == pytest.approx(2 / 3)

    [week] = await provider_stats(db, MODEL, window=timedelta(days=7), now=NOW)
    assert week == ProviderStats("fal", MODEL, 1, 0, 0.0, None, None, None, 7)

    assert await provider_stats(db, MODEL, window=timedelta(days=1), now=NOW) == []
    assert await provider_stats(db, "flux.2-dev-flash", now=NOW) == []
    # The default `now` is the present: attempts dated in 2031 are not yet in its window.
    assert await provider_stats(db, MODEL) == []


async def test_matches_the_reference_definition_on_random_samples(db: Database) -> None:
    rng = random.Random(11)
    rec = await Recorder(db).setup()
    samples: dict[str, list[float]] = {}
    ttfbs: dict[str, list[float]] = {}
    for provider, n in (("a", 1), ("b", 2), ("c", 7), ("d", 41)):
        for _ in range(n):
            total = float(rng.randint(100, 60_000))
            ttfb = float(rng.randint(10, 100)) if rng.random() < 0.7 else None
            await rec.attempt(provider, "succeeded", total, ttfb)
            samples.setdefault(provider, []).append(total)
            if ttfb is not None:
                ttfbs.setdefault(provider, []).append(ttfb)
    stats = {s.provider: s for s in await provider_stats(db, MODEL, now=NOW)}
    assert list(stats) == ["a", "b", "c", "d"]
    for provider, values in samples.items():
        s = stats[provider]
        assert s.requests == s.successes == len(values) and s.success_rate == 1.0
        assert s.p50_ms == nearest_rank(values, 0.5)
        assert s.p95_ms == nearest_rank(values, 0.95)
        assert s.ttfb_p50_ms == (nearest_rank(ttfbs[provider], 0.5) if provider in ttfbs else None)
