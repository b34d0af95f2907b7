"""Playground jobs in memory: one job's progress and outcome, and the store of recent jobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fluxport.domain.errors import RateLimited


@dataclass
class PlaygroundJob:
    """One playground generation: its latest progress, then a result or an error."""

    id: str
    request_id: str
    operation: str
    started: float = field(default_factory=time.monotonic)
    progress: dict[str, Any] | None = None
    # The latest partial image, apart from the progress so that step events never coalesce it away.
    partial: dict[str, Any] | None = None
    partial_version: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished_at: float | None = None
    version: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def set_progress(self, payload: dict[str, Any]) -> None:
        if self.finished_at is None:
            self.progress = payload
            self._bump()

    def set_partial(self, payload: dict[str, Any]) -> None:
        if self.finished_at is None:
            self.partial = payload
            self.partial_version += 1
            self._bump()

    def finish(self, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        self.result, self.error, self.finished_at = result, error, time.monotonic()
        self.done.set()
        self._bump()

    async def changed(self, seen: int, wait_s: float) -> None:
        """Return when the job has changed since version `seen`, or after `wait_s` (a keep-alive)."""
        if self.version != seen:
            return
        waiter = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), wait_s)


class JobStore:
    """Recent playground jobs: finished ones are kept a few minutes, and at most `capacity` in all."""

    def __init__(self, capacity: int = 200, keep_s: float = 600.0) -> None:
        self.capacity = capacity
        self.keep_s = keep_s
        self._jobs: OrderedDict[str, PlaygroundJob] = OrderedDict()

    def get(self, job_id: str) -> PlaygroundJob | None:
        self._prune()
        return self._jobs.get(job_id)

    def add(self, job: PlaygroundJob) -> None:
        self._prune()
        if len(self._jobs) >= self.capacity:
            for key, old in list(self._jobs.items()):
                if old.finished_at is not None:
                    del self._jobs[key]
                    break
            else:
                raise RateLimited(
                    "The playground is busy with other generations; try again shortly.",
                    retry_after=10,
                )
        self._jobs[job.id] = job

    def _prune(self) -> None:
        cutoff = time.monotonic() - self.keep_s
        for key, job in list(self._jobs.items()):
            if job.finished_at is not None and job.finished_at < cutoff:
                del self._jobs[key]
