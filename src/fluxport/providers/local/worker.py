"""The device worker: one thread per device runs its jobs one at a time, behind a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxport.domain.errors import ProviderFailure, RateLimited
from fluxport.memory import release_freed_memory

# Guesses for Retry-After before any job has finished on a device.
FIRST_GUESS_S = {"cpu": 5.0, "cuda": 30.0}


class _Cancelled(Exception):
    """Raised inside the pipeline callback to abandon a job whose caller went away."""


@dataclass(eq=False)
class _Task:
    fn: Callable[[_Task], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"


class _DeviceWorker:
    """One thread that runs a device's jobs one at a time, behind a bounded queue."""

    def __init__(self, device: str, queue_size: int) -> None:
        self.device = device
        self.queue_size = queue_size
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: list[_Task] = []  # waiting or running, in order
        self._durations: deque[float] = deque(maxlen=16)
        self._thread = threading.Thread(target=self._run, name=f"fluxport-local-{device}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[_Task], Any], *, admit_always: bool = False) -> tuple[_Task, int]:
        """Queue `fn`; returns the task and how many jobs are ahead of it. Raises RateLimited when full."""
        loop = asyncio.get_running_loop()
        task = _Task(fn=fn, loop=loop, future=loop.create_future())
        with self._lock:
            ahead = len(self._pending)
            # One job runs and `queue_size` wait; counting both keeps admission independent of
            # whether the thread has picked up its next job yet.
            if not admit_always and ahead >= self.queue_size + 1:
                raise RateLimited(
                    f"The local {self.device} queue is full ({self.queue_size} waiting); retry shortly.",
                    retry_after=self._estimate_locked(),
                )
            self._pending.append(task)
        self._queue.put(task)
        return task, ahead

    def depth(self) -> int:
        """Jobs waiting or running on this device."""
        with self._lock:
            return len(self._pending)

    def _estimate_locked(self) -> float:
        # A slot frees when the running job finishes: about one recent job duration.
        if self._durations:
            return max(1.0, sum(self._durations) / len(self._durations))
        return FIRST_GUESS_S.get(self.device.split(":")[0], 30.0)

    def shutdown(self, reason: str) -> None:
        with self._lock:
            for task in self._pending:
                task.reason = reason
                task.cancel.set()
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            self._run_one(task)
            # This frame would otherwise keep the last task (its images) alive until the next one.
            del task
            # The pipeline's activations are freed now; glibc would keep them (fluxport/memory.py).
            release_freed_memory()

    def _run_one(self, task: _Task) -> None:
        result: Any = None
        error: BaseException | None = None
        if task.cancel.is_set():
            error = ProviderFailure(f"Local job {task.reason} before it started.")
        else:
            task.started = time.monotonic()
            try:
                result = task.fn(task)
            except _Cancelled:
                error = ProviderFailure(f"Local job {task.reason}.")
            except BaseException as exc:  # delivered to the awaiting coroutine
                error = exc
            with self._lock:
                self._durations.append(time.monotonic() - task.started)
        with self._lock:
            self._pending.remove(task)
        self._deliver(task, result, error)

    @staticmethod
    def _deliver(task: _Task, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if task.future.done():  # the caller was cancelled
                return
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)

        # RuntimeError: the caller's loop is closed, so nobody is waiting.
        with contextlib.suppress(RuntimeError):
            task.loop.call_soon_threadsafe(settle)
