"""`fluxport generate` and `fluxport edit`: in-process generation with a progress bar, images
written next to each other (`winter.png`, or `winter-1.png`, `winter-2.png` for `-n 2`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fluxport.api.protocol import coerce_text
from fluxport.catalog import NOISE_NOTE
from fluxport.cli.app import _Command, app, console
from fluxport.domain.errors import FluxportError
from fluxport.domain.job import Operation
from fluxport.providers.base import ProgressEvent
from fluxport.settings import Settings

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".avif": "avif"}

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
    from fluxport.storage.blobs import open_blob_store
    from fluxport.storage.db import Database

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database.from_settings(settings)
    providers = build_providers(settings)
    blobs = open_blob_store(settings)
    service = ImageService(settings, db, blobs, providers)
    t0 = time.monotonic()
    try:
        await blobs.start()
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
        await blobs.aclose()  # its fsyncs done before the command returns
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
