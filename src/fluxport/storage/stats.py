"""The statistics the router and the model pages read from recorded attempts (window-function SQL
that SQLite 3.25+ and PostgreSQL share)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select

from fluxport.storage.records import AttemptStats
from fluxport.storage.repos.base import Repository
from fluxport.storage.schema import attempts

__all__ = ["StatsQueries"]


class StatsQueries(Repository):
    """Read-only queries over `attempts`."""

    async def recent_outcomes(
        self, *, per_pair: int = 200
    ) -> dict[tuple[str, str], list[tuple[bool, float]]]:
        """The latest finished attempts per (provider, model), oldest first: (succeeded, seconds).

        Seeds the router's in-memory window at start-up, so its ranking survives a restart.
        """
        a = attempts.c
        ranked = (
            select(
                a.provider,
                a.model,
                a.status,
                a.total_ms,
                a.started_at,
                func.row_number()
                .over(partition_by=(a.provider, a.model), order_by=a.started_at.desc())
                .label("rn"),
            )
            .where(a.status.in_(("succeeded", "failed")), a.total_ms.is_not(None))
            .subquery()
        )
        query = (
            select(ranked.c.provider, ranked.c.model, ranked.c.status, ranked.c.total_ms)
            .where(ranked.c.rn <= per_pair)
            .order_by(ranked.c.started_at)
        )
        out: dict[tuple[str, str], list[tuple[bool, float]]] = {}
        async with self.sessions() as session:
            for provider, model, status, total_ms in (await session.execute(query)).all():
                out.setdefault((provider, model), []).append((status == "succeeded", total_ms / 1000))
        return out

    async def attempt_stats(self, model: str, *, since: datetime, until: datetime) -> list[AttemptStats]:
        """Per provider, the finished attempts of `model` started in [since, until); see `AttemptStats`.

        Percentiles are nearest-rank (the value at rank ceil(p * n) of the n sorted samples), computed
        in SQL with window functions.
        """
        a = attempts.c
        window = (
            a.model == model,
            a.started_at >= since,
            a.started_at < until,
            a.status.in_(("succeeded", "failed")),  # cancelled (hedge losers) and running: no verdict
        )
        counts = (
            select(
                a.provider,
                func.count().label("attempts"),
                func.sum(case((a.status == "succeeded", 1), else_=0)).label("successes"),
            )
            .where(*window)
            .group_by(a.provider)
        )

        def nearest_rank(column: Any) -> Any:
            ranked = (
                select(
                    a.provider.label("provider"),
                    column.label("v"),
                    func.row_number().over(partition_by=a.provider, order_by=column).label("rn"),
                    func.count().over(partition_by=a.provider).label("n"),
                )
                .where(*window, a.status == "succeeded", column.is_not(None))
                .subquery()
            )
            # ceil(p * n) in integer arithmetic: (n + 1) // 2 for p50, (95 n + 99) // 100 for p95.
            return select(
                ranked.c.provider,
                func.max(case((ranked.c.rn == (ranked.c.n + 1) // 2, ranked.c.v))).label("p50"),
                func.max(case((ranked.c.rn == (95 * ranked.c.n + 99) // 100, ranked.c.v))).label("p95"),
            ).group_by(ranked.c.provider)

        async with self.sessions() as session:
            totals = {r.provider: r for r in await session.execute(counts)}
            total_ms = {r.provider: r for r in await session.execute(nearest_rank(a.total_ms))}
            ttfb_ms = {r.provider: r for r in await session.execute(nearest_rank(a.ttfb_ms))}
        out = []
        for provider in sorted(totals):
            t, g = total_ms.get(provider), ttfb_ms.get(provider)
            out.append(
                AttemptStats(
                    provider=provider,
                    attempts=int(totals[provider].attempts),
                    successes=int(totals[provider].successes or 0),
                    total_p50_ms=t.p50 if t else None,
                    total_p95_ms=t.p95 if t else None,
                    ttfb_p50_ms=g.p50 if g else None,
                )
            )
        return out
