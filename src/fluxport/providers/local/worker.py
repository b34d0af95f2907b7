"""The device worker: one thread per device runs its jobs in turn, behind a bounded queue; waiting
jobs that share a batch key go together in one pipeline call, up to a bound in images and pixels."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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
    # Batching: tasks with equal keys may run together through `run_batch` (one result each).
    batch_key: Hashable | None = None
    images: int = 1
    pixels: int = 0
    run_batch: Callable[[list[_Task]], list[Any]] | None = None
    payload: Any = None  # what `run_batch` needs of each task


@dataclass(frozen=True)
class BatchLimits:
    """The most one pipeline call may take on: images, and pixels (the activations' memory)."""

    images: int = 1
    pixels: int = 0


class _DeviceWorker:
    """One thread that runs a device's jobs one at a time, behind a bounded queue."""

    def __init__(self, device: str, queue_size: int, batch: BatchLimits | None = None) -> None:
        self.device = device
        self.queue_size = queue_size
        self.batch = batch or BatchLimits()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Task] = deque()  # not started, in order
        self._stopping = False
        self._pending: list[_Task] = []  # waiting or running, in order
        self._durations: deque[float] = deque(maxlen=16)
        self.batches = 0  # pipeline calls that ran more than one job
        self._thread = threading.Thread(target=self._run, name=f"fluxport-local-{device}", daemon=True)
        self._thread.start()

    def submit(
        self,
        fn: Callable[[_Task], Any],
        *,
        admit_always: bool = False,
        batch_key: Hashable | None = None,
        images: int = 1,
        pixels: int = 0,
        run_batch: Callable[[list[_Task]], list[Any]] | None = None,
        payload: Any = None,
    ) -> tuple[_Task, int]:
        """Queue `fn`; returns the task and how many jobs are ahead of it. Raises RateLimited when full.
        With a `batch_key` and `run_batch`, it may run with other waiting tasks of the same key."""
        loop = asyncio.get_running_loop()
        task = _Task(
            fn=fn,
            loop=loop,
            future=loop.create_future(),
            batch_key=batch_key if run_batch is not None else None,
            images=images,
            pixels=pixels,
            run_batch=run_batch,
            payload=payload,
        )
        with self._lock:
            if self._stopping:
                raise ProviderFailure(f"The local {self.device} worker is shut down.")
            ahead = len(self._pending)
            # One job runs and `queue_size` wait; counting both keeps admission independent of
            # whether the thread has picked up its next job yet.
            if not admit_always and ahead >= self.queue_size + 1:
                raise RateLimited(
                    f"The local {self.device} queue is full ({self.queue_size} waiting); retry shortly.",
                    retry_after=self._estimate_locked(),
                )
            self._pending.append(task)
            self._waiting.append(task)
            self._wake.notify()
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
            self._stopping = True
            self._wake.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if not self._waiting:
                    return  # stopping, and every task has been answered
                group = self._take_locked()
            if len(group) == 1:
                self._run_one(group[0])
            else:
                self._run_group(group)
            # This frame would otherwise keep the last tasks (their images) alive until the next.
            del group
            # The pipeline's activations are freed now; glibc would keep them (fluxport/memory.py).
            release_freed_memory()

    def _take_locked(self) -> list[_Task]:
        """The next task, and the waiting tasks that can share its pipeline call, in order."""
        head = self._waiting.popleft()
        group = [head]
        if head.batch_key is None or head.cancel.is_set() or self.batch.images <= 1:
            return group
        images, pixels = head.images, head.pixels
        for task in list(self._waiting):
            if (
                task.batch_key == head.batch_key
                and not task.cancel.is_set()
                and images + task.images <= self.batch.images
                and pixels + task.pixels <= self.batch.pixels
            ):
                self._waiting.remove(task)
                group.append(task)
                images += task.images
                pixels += task.pixels
        return group

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

    def _run_group(self, group: list[_Task]) -> None:
        """One pipeline call for several tasks; a task cancelled meanwhile gets its failure, the
        others their results (the call stops early only when every task is cancelled)."""
        started = time.monotonic()
        for task in group:
            task.started = started
        results: list[Any] = []
        error: BaseException | None = None
        run_batch = group[0].run_batch
        assert run_batch is not None  # only tasks with a batch key are grouped
        try:
            results = run_batch(group)
        except _Cancelled:
            error = None
        except BaseException as exc:  # the whole call failed: every task gets the error
            error = exc
        with self._lock:
            self._durations.append(time.monotonic() - started)
            self.batches += 1
        if isinstance(error, ProviderFailure) and str(error).startswith("Out of memory"):
            # Together they did not fit: each runs alone, as it would have without batching.
            for task in group:
                self._run_one(task)
            return
        with self._lock:
            for task in group:
                self._pending.remove(task)
        for i, task in enumerate(group):
            if task.cancel.is_set():
                self._deliver(task, None, ProviderFailure(f"Local job {task.reason}."))
            elif error is not None or i >= len(results):
                self._deliver(task, None, error or ProviderFailure("Local batched job got no result."))
            else:
                self._deliver(task, results[i], None)

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
