"""`fluxport serve`: the start-up banner (models and their providers' state, the default model,
a ready-to-paste SDK call) and uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fluxport.catalog import MODELS, NOISE_NOTE, ModelSpec, find_model
from fluxport.cli.app import _Command, app, console
from fluxport.providers.base import Provider, ProviderState
from fluxport.settings import Settings, redact_url


@app.command(cls=_Command)
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (default FLUXPORT_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FLUXPORT_PORT or 8000).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes on this port (more CPU for hosted traffic). Above 1 they must "
            "share state: needs FLUXPORT_REDIS_URL and a FLUXPORT_DATABASE_URL that is not SQLite.",
        ),
    ] = 1,
) -> None:
    """Serve the OpenAI-compatible API and /docs (embedded default: SQLite and files in FLUXPORT_DATA_DIR)."""
    import uvicorn

    from fluxport.api.app import create_app
    from fluxport.api.connections import guarded_http_protocol, limits_from_settings
    from fluxport.providers.registry import build_providers, default_model

    settings = Settings()
    if workers > 1:
        _check_workers(settings, workers)
    host = host or settings.host
    port = port or settings.port
    providers = build_providers(settings)
    model = default_model(settings, providers)
    _show_models(providers, model)
    console.print(f"Default model: [bold]{model}[/] ({escape(_why_default(settings, providers, model))})")
    placement = _placement(settings)
    if placement:
        console.print(f"Local GPU: {escape(placement)}")
    console.print(
        f"Data: {settings.data_dir.resolve()}  Database: {redact_url(settings.resolved_database_url)}"
    )
    if settings.redis_url:
        console.print(
            f"Live state: Redis at {redact_url(settings.redis_url)}: rate limits and hosted providers' "
            "breakers are shared by every replica (per process while Redis is unreachable)."
        )
    else:
        console.print(
            "Live state: in this process's memory (rate limits, breakers); set FLUXPORT_REDIS_URL "
            "to share them across replicas."
        )
    if workers > 1:
        console.print(f"Workers: {workers} processes on port {port}.")
    base_url = f"http://{_client_host(host)}:{port}"
    console.print(f"API: [bold]{base_url}/v1[/]   docs: {base_url}/docs")
    if settings.auth == "none":
        console.print(
            "[bold red]Auth: OFF (FLUXPORT_AUTH=none)[/] - every /v1 route is open; local experiments only."
        )
    else:
        console.print(
            "Auth: API keys (Authorization: Bearer fp_...); manage them with `fluxport keys`. "
            "A first key is created and printed below if none exists."
        )
    console.print("Try it with the openai Python SDK (pip install openai); paste into python:")
    # Printed as is: Rich would wrap it to the terminal and read its brackets as markup.
    console.print(
        _sdk_example(f"{base_url}/v1", settings.auth, model), markup=False, highlight=False, soft_wrap=True
    )
    _raise_open_file_limit()
    options: dict[str, Any] = {}
    if workers > 1:
        # Each worker is a fresh process that builds its own app and protocol from the environment.
        # Migrations and the first API key happen here, once, before any worker starts.
        asyncio.run(_prepare_database(settings))
        app_arg: Any = "fluxport.api.app:create_app"
        options |= {
            "factory": True,
            "workers": workers,
            "http": "fluxport.api.connections:SettingsGuardedProtocol",
        }
    else:
        app_arg = create_app(settings)
        options["http"] = guarded_http_protocol(limits_from_settings(settings))
    uvicorn.run(
        app_arg,
        **options,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: only from configured proxies here.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )


def _check_workers(settings: Settings, workers: int) -> None:
    """Several workers are several replicas: refuse them where their state would not be shared."""
    missing = []
    if not settings.redis_url:
        missing.append("FLUXPORT_REDIS_URL (rate limits and breakers would be per worker: N times the limit)")
    if not settings.shared_database:
        missing.append("a FLUXPORT_DATABASE_URL that is not SQLite (postgresql+asyncpg://...)")
    if missing:
        console.print(
            f"[bold red]--workers {workers} needs state shared by every worker:[/] set "
            + "; and ".join(missing)
            + ". See the README, 'Running more than one replica'. Without them, use --workers 1."
        )
        raise typer.Exit(2)


async def _prepare_database(settings: Settings) -> None:
    """Migrate, and mint the first key (printed once), before the workers start all at once."""
    from fluxport.api.app import ensure_first_key
    from fluxport.storage.db import Database

    db = await Database.from_settings(settings)
    try:
        await ensure_first_key(settings, db)
    finally:
        await db.close()


def _raise_open_file_limit() -> None:
    """Every client and every provider call holds a socket: lift the soft limit (often 1024) to the
    hard one, so that hundreds of concurrent requests do not fail with 'too many open files'."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _sdk_example(base_url: str, auth: str, model: str) -> str:
    """A ready-to-paste openai SDK call against this server."""
    if auth == "none":
        note, key = "# FLUXPORT_AUTH=none: any api_key works (the SDK insists on one)", "anything"
    else:
        note, key = (
            "# api_key: the key printed below on first start, or one from `fluxport keys create`",
            "fp_...",
        )
    return (
        "from openai import OpenAI\n"
        f"{note}\n"
        f'client = OpenAI(base_url="{base_url}", api_key="{key}")\n'
        f'result = client.images.generate(model="{model}", prompt="a lighthouse at dusk")\n'
        "print(result.data[0].url)\n"
    )


def _why_default(settings: Settings, providers: Mapping[str, Provider], model: str) -> str:
    """Why `model` is what a request without a model gets, and what to set to change that."""
    spec = find_model(model)
    if settings.default_model:
        why = "set by FLUXPORT_DEFAULT_MODEL"
    elif spec is not None and spec.noise:
        real = next(s for s in MODELS.values() if not s.noise)
        names = [m.group(1) for _, st in _states(real, providers) if (m := _SET_VAR.search(st.detail))]
        how = f"set {_or(names)} to serve {real.id}" if names else f"see above how to serve {real.id}"
        why = f"nothing else is configured; {how}"
    else:
        why = "the first configured model; FLUXPORT_DEFAULT_MODEL picks another"
    if spec is None:
        return f"{why}; it is not a known model, so requests without a model fail"
    if not any(state.configured for _, state in _states(spec, providers)):
        return f"{why}; none of its providers is configured, so requests without a model fail"
    return why


# The variable a provider's not-configured detail names: "set FAL_KEY to a fal.ai API key".
_SET_VAR = re.compile(r"\bset ([A-Z][A-Z0-9_]+)")


def _placement(settings: Settings) -> str | None:
    if settings.local_weights is None:
        return None
    from fluxport.providers.local.placement import placement_note

    return placement_note(settings)


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _states(spec: ModelSpec, providers: Mapping[str, Provider]) -> list[tuple[str, ProviderState]]:
    """Each provider of `spec` with its state; a provider not built is not configured."""
    from fluxport.providers.registry import model_providers

    missing = ProviderState(False, "not available in this installation")
    return [
        (name, providers[name].state(spec.id) if name in providers else missing)
        for name in model_providers(spec, providers)
    ]


def _show_models(providers: Mapping[str, Provider], default: str) -> None:
    """Each model and provider with its state in words: what serves it, or what to set."""
    table = Table(title="Models")
    table.add_column("model", no_wrap=True)
    table.add_column("provider", no_wrap=True)
    table.add_column("state")
    for spec in MODELS.values():
        notes = [n for n, on in (("noise", spec.noise), ("default", spec.id == default)) if on]
        label = spec.id + (f" [yellow]({', '.join(notes)})[/]" if notes else "")
        states = _states(spec, providers)
        for i, (name, state) in enumerate(states):
            # The local provider's install hint already says "not configured: ".
            detail = escape(state.detail.removeprefix("not configured: "))
            text = (
                f"[green]configured[/]: {detail}" if state.configured else f"[dim]not configured: {detail}[/]"
            )
            table.add_row(label if i == 0 else "", name, text, end_section=i == len(states) - 1)
    console.print(table)
    console.print(f"[yellow]{NOISE_NOTE}[/]")
