"""Provider statistics from the recorded attempts: p50 / p95 generation time, success, TTFB.

Definitions (shared by `GET /v1/models/{id}/providers`, `fluxport stats` and the web pages):
- the window is the attempts *started* in [now - window, now);
- `requests` counts finished attempts, succeeded or failed; cancelled attempts (hedge losers, a
  shutdown) and attempts still running are left out of every figure;
- `success_rate` = succeeded / requests;
- generation time is an attempt's `total_ms` and TTFB its `ttfb_ms`, over succeeded attempts only;
- percentiles are nearest-rank: the value at rank ceil(p * n) of the n sorted samples, so every
  figure is a time that was actually observed (p50 of 1, 2, 3, 4 is 2; p95 of 1..20 is 19).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fluxport.storage.db import Database

DEFAULT_WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class ProviderStats:
    provider: str
    model: str
    requests: int
    successes: int
    success_rate: float | None  # None without requests
    p50_ms: float | None
    p95_ms: float | None
    ttfb_p50_ms: float | None
    window_days: int


async def provider_stats(
    db: Database,
    model: str,
    *,
    providers: Sequence[str] = (),
    window: timedelta = DEFAULT_WINDOW,
    now: datetime | None = None,
) -> list[ProviderStats]:
    """Stats per provider of `model`: one row for each of `providers` (empty when it has no data),
    in that order, then any other provider with data in the window, by name."""
    until = now or datetime.now(UTC)
    found = {s.provider: s for s in await db.attempt_stats(model, since=until - window, until=until)}
    names = list(dict.fromkeys(providers)) + sorted(set(found) - set(providers))
    days = round(window / timedelta(days=1))
    out = []
    for name in names:
        s = found.get(name)
        if s is None:
            out.append(ProviderStats(name, model, 0, 0, None, None, None, None, days))
            continue
        out.append(
            ProviderStats(
                provider=name,
                model=model,
                requests=s.attempts,
                successes=s.successes,
                success_rate=s.successes / s.attempts if s.attempts else None,
                p50_ms=s.total_p50_ms,
                p95_ms=s.total_p95_ms,
                ttfb_p50_ms=s.ttfb_p50_ms,
                window_days=days,
            )
        )
    return out
