"""`fluxport keys create | list | revoke`."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fluxport.cli.app import HELP_OPTIONS, _Command, _Group, app, console, usd
from fluxport.settings import Settings

keys_app = typer.Typer(
    help="API keys: create, list, revoke.", no_args_is_help=True, cls=_Group, context_settings=HELP_OPTIONS
)
app.add_typer(keys_app, name="keys")


@keys_app.command("create", cls=_Command)
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    rate_limit: Annotated[
        int | None,
        typer.Option(
            "--rate-limit",
            min=1,
            help="Requests per minute (all replicas together with FLUXPORT_REDIS_URL; else per process).",
        ),
    ] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", min=0, help="Monthly spend budget in US dollars (UTC months).")
    ] = None,
) -> None:
    """Create a key and print it once (to stdout); only its hash is stored."""
    from fluxport.keys import create_key

    async def go() -> tuple[Any, str]:
        db = await _open_db()
        try:
            return await create_key(
                db, name=name, rate_limit_per_minute=rate_limit, monthly_budget_usd=budget
            )
        finally:
            await db.close()

    row, secret = asyncio.run(go())
    limits = _limits(row.rate_limit_per_minute, row.monthly_budget_usd)
    console.print(f"Created key [bold]{row.id}[/] ({row.name}; {limits}). It is shown once; store it now:")
    typer.echo(secret)


@keys_app.command("list", cls=_Command)
def keys_list() -> None:
    """Every key: id, name, prefix, limits, created, revoked, and this month's spend."""
    from fluxport.keys import month_start, shown_prefix

    async def go() -> list[tuple[Any, float]]:
        db = await _open_db()
        try:
            since = month_start()
            return [(row, await db.key_spend(row.id, since=since)) for row in await db.list_api_keys()]
        finally:
            await db.close()

    rows = asyncio.run(go())
    table = Table(title="API keys")
    for column in ("id", "name", "prefix", "rate limit", "budget", "created", "revoked", "spend this month"):
        table.add_column(column, justify="right" if column in ("spend this month", "budget") else "left")
    for row, spent in rows:
        table.add_row(
            row.id,
            row.name,
            shown_prefix(row),
            f"{row.rate_limit_per_minute}/min" if row.rate_limit_per_minute else "-",
            usd(row.monthly_budget_usd) if row.monthly_budget_usd is not None else "-",
            row.created_at.strftime("%Y-%m-%d %H:%M"),
            row.revoked_at.strftime("%Y-%m-%d %H:%M") if row.revoked_at else "",
            usd(spent),
        )
    out = Console() if sys.stdout.isatty() else Console(width=160)
    out.print(table)
    if not rows:
        console.print("No keys yet: `fluxport keys create`, or start `fluxport serve` to get a first one.")


@keys_app.command("revoke", cls=_Command)
def keys_revoke(
    key: Annotated[
        str, typer.Argument(help="Key id (key_...), its prefix (fp_...) or the key itself.", metavar="KEY")
    ],
) -> None:
    """Revoke a key; servers refuse it within a few seconds."""
    from fluxport.keys import find_key, shown_prefix

    async def go() -> Any:
        db = await _open_db()
        try:
            row = await find_key(db, key)
            return await db.revoke_api_key(row.id) if row is not None else None
        finally:
            await db.close()

    try:
        row = asyncio.run(go())
    except LookupError as exc:
        console.print(f"[red]error[/]: {exc}; give the key id instead.")
        raise typer.Exit(1) from None
    if row is None:
        console.print(f"[red]error[/]: no key matches {key!r}; see `fluxport keys list`.")
        raise typer.Exit(1)
    console.print(f"Revoked {row.id} ({row.name}, {shown_prefix(row)}).")


async def _open_db() -> Any:
    from fluxport.storage.db import Database

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return await Database.from_settings(settings)


def _limits(rpm: int | None, budget: float | None) -> str:
    parts = [f"{rpm} requests/min" if rpm else "no rate limit"]
    parts.append(f"budget {usd(budget)}/month" if budget is not None else "no budget")
    return ", ".join(parts)
