"""`fluxport stats`: the Provider Rankings table per model, from recorded attempts."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fluxport.catalog import MODELS, find_model
from fluxport.cli.app import _Command, app, console, usd
from fluxport.settings import Settings


@app.command(cls=_Command)
def stats(
    model: Annotated[str | None, typer.Option("--model", "-m", help="One model (default: all).")] = None,
    window_days: Annotated[int, typer.Option(min=1, help="Rolling window in days.")] = 30,
) -> None:
    """Provider Rankings: p50 / p95 generation time, success rate, TTFB and price per model."""
    if model is not None and find_model(model) is None:
        console.print(f"[red]error[/]: unknown model {model!r}; known: {', '.join(MODELS)}")
        raise typer.Exit(1)
    specs = [find_model(model)] if model is not None else list(MODELS.values())
    tables = asyncio.run(_stats_tables([s.id for s in specs if s], window_days))
    # Piped output is not wrapped to Rich's 80-column fallback; a terminal gets its own width.
    out = Console() if sys.stdout.isatty() else Console(width=120)
    out.print(*tables)


async def _stats_tables(models: list[str], window_days: int) -> list[Table]:
    from datetime import timedelta

    from fluxport.gateway.stats import provider_stats
    from fluxport.providers.registry import listed_providers, listed_rate
    from fluxport.storage.db import Database

    settings = Settings()
    db = await Database.from_settings(settings)
    try:
        tables = []
        for model_id in models:
            spec = MODELS[model_id]
            rows = await provider_stats(
                db, model_id, providers=listed_providers(spec, settings), window=timedelta(days=window_days)
            )
            # Fastest median first; then providers that only failed; then those without data.
            rows.sort(key=lambda r: (r.requests == 0, r.p50_ms is None, r.p50_ms or 0.0))
            title = f"Provider Rankings: {escape(spec.name)} ({model_id}), last {window_days} days"
            table = Table(title=title)
            for column in ("provider", "p50", "p95", "success rate", "TTFB p50", "requests", "$/MP"):
                table.add_column(column, justify="left" if column == "provider" else "right")
            for r in rows:
                price = usd(listed_rate(settings, r.provider, model_id).output_per_mp)
                if r.requests == 0:
                    table.add_row(r.provider, "[dim]no data yet[/]", "", "", "", "0", price)
                    continue
                rate = f"{r.success_rate:.1%}" if r.success_rate is not None else "-"
                table.add_row(
                    r.provider,
                    _ms_text(r.p50_ms),
                    _ms_text(r.p95_ms),
                    rate,
                    _ms_text(r.ttfb_p50_ms),
                    str(r.requests),
                    price,
                )
            tables.append(table)
        return tables
    finally:
        await db.close()


def _ms_text(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.0f} ms"
