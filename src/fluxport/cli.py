"""The fluxport command line: serve the API, or generate and edit in-process with progress bars."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from typer import _click
from typer.core import TyperCommand, TyperGroup, TyperOption

from fluxport.api.protocol import coerce_text
from fluxport.catalog import MODELS, NOISE_NOTE, ModelSpec, find_model
from fluxport.domain.errors import FluxportError
from fluxport.domain.job import Operation
from fluxport.providers.base import ProgressEvent, Provider, ProviderState
from fluxport.settings import Settings


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Flags take no value: give them an empty metavar, so Rich help shows no `<bool>` beside them."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose help has no `<bool>` beside flags and no `{PROMPT}` braces in its usage line."""

    def get_params(self, ctx: _click.Context) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        # Typer braces required arguments (`{prompt}`), which reads as a set; Click writes them bare.
        return [re.sub(r"^\{(.+)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class _Group(TyperGroup):
    """A command group whose help shows no `<bool>` beside `--help`."""

    def get_params(self, ctx: _click.Context) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    # Help texts are Rich markup: a literal [dev] must be escaped or it vanishes as a tag.
    help="fluxport: one OpenAI-compatible API for FLUX.2 \\[dev] across fal, Replicate and your own GPUs.\n\n"
    "Configuration comes from the environment (FLUXPORT_DATA_DIR, FLUXPORT_DATABASE_URL, "
    "FLUXPORT_LOCAL_WEIGHTS, FLUXPORT_LOCAL_FLASH_LORA, FLUXPORT_LOCAL_DEVICE, FAL_KEY, "
    "REPLICATE_API_TOKEN, ...); "
    "see the README.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
    context_settings=HELP_OPTIONS,
)
console = Console(stderr=True)

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".avif": "avif"}


@app.command(cls=_Command)
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (default FLUXPORT_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FLUXPORT_PORT or 8000).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API and /docs (embedded default: SQLite and files in FLUXPORT_DATA_DIR)."""
    import uvicorn

    from fluxport.api.app import create_app
    from fluxport.providers.registry import build_providers, default_model

    settings = Settings()
    host = host or settings.host
    port = port or settings.port
    providers = build_providers(settings)
    model = default_model(settings, providers)
    _show_models(providers, model)
    console.print(f"Default model: [bold]{model}[/] ({escape(_why_default(settings, providers, model))})")
    console.print(
        f"Data: {settings.data_dir.resolve()}  Database: {_safe_url(settings.resolved_database_url)}"
    )
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
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: only from configured proxies here.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )


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


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


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


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _states(spec: ModelSpec, providers: Mapping[str, Provider]) -> list[tuple[str, ProviderState]]:
    """Each provider of `spec` with its state; a provider not built is not configured."""
    missing = ProviderState(False, "not available in this installation")
    return [
        (name, providers[name].state(spec.id) if name in providers else missing) for name in spec.providers
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
        for i, (name, state) in enumerate(_states(spec, providers)):
            # The local provider's install hint already says "not configured: ".
            detail = escape(state.detail.removeprefix("not configured: "))
            text = (
                f"[green]configured[/]: {detail}" if state.configured else f"[dim]not configured: {detail}[/]"
            )
            table.add_row(label if i == 0 else "", name, text, end_section=i == len(spec.providers) - 1)
    console.print(table)
    console.print(f"[yellow]{NOISE_NOTE}[/]")


Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model id (default FLUXPORT_DEFAULT_MODEL, else the first configured one: flux.2-dummy when "
        "nothing else is).",
    ),
]
Output = Annotated[
    Path,
    typer.Option("--output", "-o", help="Output file; the suffix picks the format. n>1 adds -1, -2, ..."),
]
SizeOpt = Annotated[str | None, typer.Option(help="WxH, W:H or auto.")]
Ratio = Annotated[str | None, typer.Option("--aspect-ratio", help="Any W:H; nearest supported ratio.")]
Res = Annotated[str | None, typer.Option(help="0.5K, 1K, 2K, 4K or megapixels.")]
Seed = Annotated[int | None, typer.Option(help="Seed; image i uses seed + i.")]
Count = Annotated[int, typer.Option("-n", help="Number of images (1-10).")]
Cfg = Annotated[float | None, typer.Option("--cfg-scale", help="Guidance scale.")]
Enhance = Annotated[bool, typer.Option("--enhance/--no-enhance", help="Prompt enhancement.")]
Fmt = Annotated[str | None, typer.Option("--format", help="png, jpeg, gif, webp or avif (default: from -o).")]
Quality = Annotated[int | None, typer.Option("--compression", help="0-100 for jpeg, webp, avif.")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps (local provider).")]
Extra = Annotated[
    list[str] | None, typer.Option("--extra", "-x", help="Provider field KEY=VALUE (repeatable).")
]


@app.command(cls=_Command)
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.", metavar="PROMPT")],
    output: Output = Path("image.png"),
    model: Model = None,
    size: SizeOpt = None,
    aspect_ratio: Ratio = None,
    resolution: Res = None,
    seed: Seed = None,
    n: Count = 1,
    cfg_scale: Cfg = None,
    enhance: Enhance = False,
    fmt: Fmt = None,
    compression: Quality = None,
    steps: Steps = None,
    extra: Extra = None,
) -> None:
    """Generate images in-process (no server), with progress bars for model loading and steps."""
    fields = _fields(
        prompt,
        output,
        model,
        size,
        aspect_ratio,
        resolution,
        seed,
        n,
        cfg_scale,
        enhance,
        fmt,
        compression,
        steps,
        extra,
    )
    _run(Operation.GENERATE, fields, [], output)


@app.command(cls=_Command)
def edit(
    prompt: Annotated[str, typer.Argument(help="How to edit the reference images.", metavar="PROMPT")],
    image: Annotated[
        list[Path],
        typer.Option("--image", "-i", help="Reference image (1-4; repeat -i).", exists=True, dir_okay=False),
    ],
    output: Output = Path("edit.png"),
    model: Model = None,
    size: SizeOpt = None,
    aspect_ratio: Ratio = None,
    resolution: Res = None,
    seed: Seed = None,
    n: Count = 1,
    cfg_scale: Cfg = None,
    enhance: Enhance = False,
    fmt: Fmt = None,
    compression: Quality = None,
    steps: Steps = None,
    extra: Extra = None,
) -> None:
    """Edit with 1-4 reference images in-process, with progress bars."""
    fields = _fields(
        prompt,
        output,
        model,
        size,
        aspect_ratio,
        resolution,
        seed,
        n,
        cfg_scale,
        enhance,
        fmt,
        compression,
        steps,
        extra,
    )
    _run(Operation.EDIT, fields, [p.read_bytes() for p in image], output)


def _fields(
    prompt: str,
    output: Path,
    model: str | None,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    seed: int | None,
    n: int,
    cfg_scale: float | None,
    enhance: bool,
    fmt: str | None,
    compression: int | None,
    steps: int | None,
    extra: list[str] | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "prompt": prompt,
        "model": model,
        "size": size,
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "seed": seed,
        "n": n,
        "cfg_scale": cfg_scale,
        "prompt_enhancement": "on" if enhance else None,
        "output_format": fmt or FORMATS.get(output.suffix.lower(), "png"),
        "output_compression": compression,
        "response_format": "b64_json",
        "num_inference_steps": steps,
    }
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--extra takes KEY=VALUE, got {item!r}")
        fields[key] = coerce_text(value)
    return fields


def _run(operation: Operation, fields: dict[str, Any], uploads: list[bytes], output: Path) -> None:
    try:
        asyncio.run(_run_async(operation, fields, uploads, output))
    except FluxportError as exc:
        message = escape(_in_process(exc.message))
        console.print(f"[red]error[/] ({exc.status} {exc.code}, param={exc.param}): {message}")
        raise typer.Exit(1) from None


def _in_process(message: str) -> str:
    """The gateway's advice as it applies here: the CLI has no server to restart, it reads the
    environment afresh on each run."""
    return message.replace("then restart fluxport", "then run this command again").replace(
        "use model flux.2-dummy", "use -m flux.2-dummy"
    )


async def _run_async(
    operation: Operation, fields: dict[str, Any], uploads: list[bytes], output: Path
) -> None:
    from fluxport.api.protocol import parse_image_request
    from fluxport.gateway.service import ImageService, new_request_id
    from fluxport.providers.registry import build_providers
    from fluxport.storage.blobs import BlobStore
    from fluxport.storage.db import Database

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database.open(settings.resolved_database_url)
    providers = build_providers(settings)
    blobs = BlobStore(settings.images_dir, fsync=settings.image_fsync)
    service = ImageService(settings, db, blobs, providers)
    t0 = time.monotonic()
    try:
        req = parse_image_request(fields)
        prepared = await service.prepare(new_request_id(), operation, req.to_params(), uploads)
        if prepared.spec.noise:
            console.print(f"[yellow]{NOISE_NOTE}[/]")
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bars:
            tasks: dict[str, Any] = {}

            def on_progress(event: ProgressEvent) -> None:
                # Called from the device worker thread; Rich's Progress is thread-safe.
                if event.stage == "loading":
                    key = "loading"
                    if key not in tasks:
                        tasks[key] = bars.add_task(f"Loading {prepared.spec.id}", total=None)
                    if event.total:
                        bars.update(tasks[key], total=event.total, completed=event.step)
                elif event.stage == "queued":
                    if "queued" not in tasks:
                        tasks["queued"] = bars.add_task("Waiting for the device", total=None)
                elif event.stage == "step":
                    if "loading" in tasks:
                        bars.update(tasks["loading"], total=1, completed=1)
                    if "steps" not in tasks:
                        tasks["steps"] = bars.add_task("Denoising", total=event.total)
                    bars.update(tasks["steps"], completed=event.step, total=event.total)
                elif event.stage in ("decoding", "done") and "steps" in tasks:
                    bars.update(tasks["steps"], completed=bars.tasks[tasks["steps"]].total or 0)

            done = await service.run(prepared, on_progress)
    finally:
        for provider in providers.values():
            await provider.aclose()
        await asyncio.to_thread(blobs.close)  # its fsyncs done before the command returns
        await db.close()
    paths = []
    for i, img in enumerate(done.images):
        path = output if len(done.images) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        path.write_bytes(img.image.data)
        paths.append(path)
    console.print(
        f"[green]done[/] in {time.monotonic() - t0:.1f}s via {done.provider}: "
        f"{done.size} {done.output_format}, seeds {', '.join(str(i.seed) for i in done.images)}"
    )
    if done.revised_prompt:
        console.print(f"revised prompt: {done.revised_prompt}")
    for path in paths:
        typer.echo(str(path))


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
    from fluxport.providers.registry import listed_rate
    from fluxport.storage.db import Database

    settings = Settings()
    db = await Database.open(settings.resolved_database_url)
    try:
        tables = []
        for model_id in models:
            spec = MODELS[model_id]
            rows = await provider_stats(
                db, model_id, providers=spec.providers, window=timedelta(days=window_days)
            )
            # Fastest median first; then providers that only failed; then those without data.
            rows.sort(key=lambda r: (r.requests == 0, r.p50_ms is None, r.p50_ms or 0.0))
            title = f"Provider Rankings: {escape(spec.name)} ({model_id}), last {window_days} days"
            table = Table(title=title)
            for column in ("provider", "p50", "p95", "success rate", "TTFB p50", "requests", "$/MP"):
                table.add_column(column, justify="left" if column == "provider" else "right")
            for r in rows:
                price = _usd(listed_rate(settings, r.provider, model_id).output_per_mp)
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


def _usd(amount: float) -> str:
    return "$" + (f"{amount:.6f}".rstrip("0").rstrip(".") if amount else "0")


def _ms_text(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.0f} ms"


# -- keys ------------------------------------------------------------------------------------------

keys_app = typer.Typer(
    help="API keys: create, list, revoke.", no_args_is_help=True, cls=_Group, context_settings=HELP_OPTIONS
)
app.add_typer(keys_app, name="keys")


@keys_app.command("create", cls=_Command)
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    rate_limit: Annotated[
        int | None, typer.Option("--rate-limit", min=1, help="Requests per minute (per server process).")
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
            _usd(row.monthly_budget_usd) if row.monthly_budget_usd is not None else "-",
            row.created_at.strftime("%Y-%m-%d %H:%M"),
            row.revoked_at.strftime("%Y-%m-%d %H:%M") if row.revoked_at else "",
            _usd(spent),
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
    return await Database.open(settings.resolved_database_url)


def _limits(rpm: int | None, budget: float | None) -> str:
    parts = [f"{rpm} requests/min" if rpm else "no rate limit"]
    parts.append(f"budget {_usd(budget)}/month" if budget is not None else "no budget")
    return ", ".join(parts)


if __name__ == "__main__":
    app()
