"""FLUXPORT_LOCAL_WARM: load (and compile) local models at start, before the server listens, with
a progress bar on a terminal and a log line per stage everywhere else."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fluxport.domain.errors import FluxportError

if TYPE_CHECKING:
    from fluxport.providers.base import ProgressEvent
    from fluxport.providers.local.provider import LocalProvider

log = logging.getLogger("fluxport")


class WarmFailed(RuntimeError):
    """A model named in FLUXPORT_LOCAL_WARM could not be loaded: the server does not start."""


async def warm(provider: LocalProvider, models: list[str]) -> None:
    """Load each of `models` on its device; a failure stops the start with the reason."""
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        for model in models:
            began = time.monotonic()
            row = bar.add_task(f"warming {model}", total=None)

            # Called from the device worker thread: Rich's progress takes its own lock.
            def progress(event: ProgressEvent, model: str = model, row: TaskID = row) -> None:
                if event.stage != "loading":
                    return
                text = f"{model}: {event.message}"
                bar.update(row, description=text, completed=event.step, total=event.total)
                log.info("warming %s: %s (%d/%d)", model, event.message, event.step, event.total)

            try:
                await provider.load(model, progress)
            except FluxportError as exc:
                raise WarmFailed(f"FLUXPORT_LOCAL_WARM: {model} could not be loaded: {exc}") from exc
            took = time.monotonic() - began
            bar.update(row, description=f"{model}: ready")
            log.info("warmed %s in %.1f s", model, took)
