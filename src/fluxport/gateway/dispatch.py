"""Routing one request: failover down the ranked providers, hedging a slow primary, one deadline.

It returns the winning attempt; delivering it (convert, store, record) is the next stage's job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluxport.domain.errors import (
    CoolingDown,
    DeadlineExceeded,
    FluxportError,
    ProviderFailure,
    RateLimited,
)
from fluxport.gateway.attempt import AttemptResult, Attempts
from fluxport.gateway.plan import Planner
from fluxport.gateway.router import BreakerState, Router
from fluxport.gateway.types import Ledger, PreparedRequest, cancel_all
from fluxport.providers.base import ProgressCallback, ProgressEvent, Provider
from fluxport.settings import Settings

log = logging.getLogger("fluxport.service")


@dataclass
class Routed:
    """The attempt that won, on which provider, and every provider tried (in order)."""

    provider: Provider
    attempt: AttemptResult
    tried: list[str]


class Dispatcher:
    """Runs attempts in the planner's order until one delivers, within the request's deadline."""

    def __init__(self, settings: Settings, router: Router, planner: Planner, attempts: Attempts) -> None:
        self.settings = settings
        self.router = router
        self.planner = planner
        self.attempts = attempts

    async def route(
        self, p: PreparedRequest, progress: ProgressCallback, t0: float, ledger: Ledger
    ) -> Routed:
        """Failover down the ranked providers, hedge a slow primary, honour one overall deadline."""
        job = p.job
        order = [prov for prov, _ in self.planner.ranked(p)]
        hedging = p.request.hedge if p.request.hedge is not None else self.settings.hedge
        deadline = t0 + self.settings.request_deadline_s
        pending = list(order)
        running: dict[asyncio.Task[AttemptResult], tuple[Provider, float]] = {}
        failures: list[tuple[str, FluxportError]] = []
        tried: list[str] = []
        hedged = False
        # Resolved with the first attempt whose provider has produced its output (it reports
        # "decoding" before downloading): the others are cancelled then, not after the download,
        # so a racing loser has less time to complete and be billed.
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[asyncio.Task[Any]] = loop.create_future()

        def launch(provider: Provider) -> None:
            tried.append(provider.name)
            calls = math.ceil(job.n / max(1, provider.capabilities(job.model).max_images_per_call))
            decoded = 0
            task: asyncio.Task[Any] | None = None

            def on_decoded() -> None:
                nonlocal decoded
                decoded += 1
                if decoded >= calls and task is not None and not settled.done():
                    settled.set_result(task)

            def on_progress(event: ProgressEvent) -> None:
                progress(event)
                if event.stage == "decoding":
                    loop.call_soon_threadsafe(on_decoded)  # local providers report from a thread

            task = asyncio.create_task(self.attempts.attempt(provider, p, on_progress, t0, ledger))
            self.router.begin(provider.name, calls)
            task.add_done_callback(lambda _: self.router.end(provider.name, calls))
            running[task] = (provider, time.monotonic())

        def admitted_next() -> Provider | None:
            while pending:
                provider = pending.pop(0)
                if self.router.admit(provider.name, job.model):
                    return provider
            return None

        first = admitted_next()
        if first is None:
            raise self._cooling(order, job.model)
        launch(first)
        try:
            while running:
                now = time.monotonic()
                hedge_at: float | None = None  # when a backup is due, if before the deadline
                if hedging and not hedged and len(running) == 1:
                    ((provider, started),) = running.values()
                    delay = self.router.hedge_after(provider.name, job.model)
                    if delay is not None and started + delay < deadline:
                        hedge_at = started + delay
                wait = (hedge_at if hedge_at is not None else deadline) - now
                watch: set[asyncio.Future[Any]] = set(running)
                if not settled.done():
                    watch.add(settled)
                done, _ = await asyncio.wait(
                    watch, timeout=max(0.0, wait), return_when=asyncio.FIRST_COMPLETED
                )
                if settled in done:
                    done.discard(settled)
                    hedged = True  # one provider has delivered: no backups from here on
                    leader = settled.result()
                    losers = [t for t in running if t is not leader]
                    await cancel_all(losers)
                    for loser in losers:
                        provider, _ = running.pop(loser)
                        self.router.release_probe(provider.name, job.model)
                    if not done:
                        continue
                if not done:
                    # Timers may fire a hair early: only a wait that was bounded by a hedge launches
                    # a backup; one bounded by the deadline is the deadline.
                    if hedge_at is None or time.monotonic() >= deadline:
                        raise DeadlineExceeded(
                            f"No provider finished within {self.settings.request_deadline_s:g} s "
                            f"(tried: {', '.join(tried)}); the attempts were cancelled."
                        )
                    hedged = True
                    backup = self._backup(order, running, job.model)
                    if backup is not None:
                        log.info("request %s: hedging %s with %s", job.request_id, tried[-1], backup.name)
                        launch(backup)
                    continue
                for task in done:
                    if task not in running:
                        continue  # a loser cancelled above
                    provider, started = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        self.router.record(
                            provider.name, job.model, ok=True, seconds=time.monotonic() - started
                        )
                        await cancel_all(running)
                        return Routed(provider, task.result(), tried)
                    if isinstance(exc, ProviderFailure | RateLimited):
                        self.router.record(
                            provider.name, job.model, ok=False, seconds=time.monotonic() - started
                        )
                        failures.append((provider.name, exc))
                        log.warning("request %s: %s failed: %s", job.request_id, provider.name, exc.message)
                        if not running and (nxt := admitted_next()) is not None:
                            launch(nxt)
                        continue
                    raise exc
            raise self._all_failed(job.model, failures)
        finally:
            await cancel_all(running)
            for provider, _ in running.values():
                self.router.release_probe(provider.name, job.model)

    def _backup(
        self, order: list[Provider], running: Mapping[Any, tuple[Provider, float]], model: str
    ) -> Provider | None:
        """The hedge: the best provider with a closed breaker — the same one again when it is best,
        unless it makes images one job at a time (a local GPU would only queue the backup)."""
        busy = {prov.name for prov, _ in running.values()}
        for provider in order:
            if self.router.breaker(provider.name, model) is not BreakerState.CLOSED:
                continue
            if provider.name in busy and not provider.capabilities(model).concurrent:
                continue
            return provider
        return None

    def _cooling(self, order: list[Provider], model: str) -> CoolingDown:
        waits = []
        for provider in order:
            h = self.router.health(provider.name, model)
            waits.append(max(0.0, h.opened_at + h.cooldown_s - time.monotonic()))
        names = ", ".join(prov.name for prov in order)
        return CoolingDown(
            f"Every provider of {model} ({names}) failed repeatedly and is cooling down; retry shortly.",
            retry_after=min(waits, default=1.0),
        )

    def _all_failed(self, model: str, failures: list[tuple[str, FluxportError]]) -> FluxportError:
        tried = "; ".join(f"{name}: {exc.message}" for name, exc in failures)
        limited = [exc for _, exc in failures if isinstance(exc, RateLimited)]
        if limited and len(limited) == len(failures):
            return RateLimited(
                f"Every provider of {model} is rate limiting: {tried}",
                retry_after=min(exc.retry_after for exc in limited),
            )
        return ProviderFailure(f"Every provider failed for {model}. Tried: {tried}")
