"""The gateway's front door: one request end to end, as a straight line of stages.

prepare (request → job) → plan (price, rank) → dispatch (attempts: failover, hedging) →
deliver (convert, store, record) → the API responds. Each stage is its own module; this one wires
them and owns the running tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from fluxport.catalog import ModelSpec
from fluxport.domain.errors import ClientDisconnected, FluxportError, Interrupted, StorageUnavailable
from fluxport.domain.job import ImageJob, Operation
from fluxport.domain.pricing import Rate, Usage
from fluxport.domain.request import ImageParams
from fluxport.gateway.attempt import Attempts
from fluxport.gateway.deliver import Deliverer
from fluxport.gateway.dispatch import Dispatcher
from fluxport.gateway.plan import Planner
from fluxport.gateway.prepare import Preparer
from fluxport.gateway.records import Records
from fluxport.gateway.router import Router
from fluxport.gateway.types import (
    Completed,
    DryRun,
    Ledger,
    PreparedRequest,
    StoredImage,
    log_failed_write,
    new_request_id,
)
from fluxport.metrics import Metrics
from fluxport.providers.base import ProgressCallback, Provider, ProviderState, no_progress
from fluxport.providers.registry import default_model
from fluxport.settings import Settings
from fluxport.storage.blobs import BlobStore
from fluxport.storage.db import Database

__all__ = ["Completed", "DryRun", "ImageService", "PreparedRequest", "StoredImage", "new_request_id"]

log = logging.getLogger("fluxport.service")


class ImageService:
    """The gateway: one instance per process, built at start-up with everything it needs."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        providers: Mapping[str, Provider],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.db = db
        self.blobs = blobs
        self.providers = dict(providers)
        self.router = Router(settings)
        self.default_model = default_model(settings, self.providers)
        self.preparer = Preparer(settings, self.providers, self.default_model)
        self.planner = Planner(settings, self.providers, self.router)
        self.records = Records(settings, db, self.metrics, self.default_model)
        self.dispatcher = Dispatcher(
            settings, self.router, self.planner, Attempts(db, self.metrics, self.planner)
        )
        self.deliverer = Deliverer(db, blobs, self.metrics)
        # Running requests are owned here, not by the HTTP handler: a client that goes away does
        # not cancel a generation by accident; `abandon` cancels one on purpose, recorded so.
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._abandoned: set[str] = set()

    # -- models and providers -------------------------------------------------------------------

    def spec(self, model: str | None) -> ModelSpec:
        return self.preparer.spec(model)

    def provider_states(self, spec: ModelSpec) -> list[tuple[str, ProviderState]]:
        return self.preparer.provider_states(spec)

    def configured_providers(self, spec: ModelSpec) -> list[Provider]:
        return self.preparer.configured_providers(spec)

    def rate(self, provider: str, model: str) -> Rate:
        """The rate of `model` on the provider named `provider` (free when it is not installed)."""
        found = self.providers.get(provider)
        return self.planner.rate(found, model) if found else Rate.free()

    def estimate(self, provider: Provider, job: ImageJob) -> Usage:
        return self.planner.estimate(provider, job)

    def ranked(self, p: PreparedRequest) -> list[tuple[Provider, float]]:
        return self.planner.ranked(p)

    # -- one request ----------------------------------------------------------------------------

    async def prepare(
        self,
        request_id: str,
        operation: Operation,
        req: ImageParams,
        uploads: Sequence[bytes] = (),
        *,
        api_key_id: str | None = None,
    ) -> PreparedRequest:
        """Validate everything that can be validated before any provider is called."""
        return await self.preparer.prepare(request_id, operation, req, uploads, api_key_id=api_key_id)

    async def reject(
        self,
        request_id: str,
        operation: Operation,
        fields: dict[str, Any],
        exc: FluxportError,
        *,
        api_key_id: str | None = None,
    ) -> None:
        """Record a request refused before it ran, so no request goes unrecorded."""
        await self.records.reject(request_id, operation, fields, exc, api_key_id=api_key_id)

    async def dry_run(self, p: PreparedRequest) -> DryRun:
        """The provider the router would pick now and the cost estimate, without generating."""
        ranked = self.planner.ranked(p)
        chosen = next((prov for prov, _ in ranked if self.router.admit(prov.name, p.job.model)), ranked[0][0])
        self.router.release_probe(chosen.name, p.job.model)  # a dry run is no probe
        await self.records.dry_run(p, chosen.name)
        return DryRun(
            provider=chosen.name,
            providers=[(prov.name, cost) for prov, cost in ranked],
            usage=self.planner.estimate(chosen, p.job),
            size=p.job.size,
        )

    async def submit(
        self, prepared: PreparedRequest, progress: ProgressCallback = no_progress
    ) -> asyncio.Task[Completed]:
        """Record the request and run it in a task the service owns (safe from client disconnects).

        The record is queued first and committed while the first provider call starts (they take
        about as long), not before it: the task fails, and cancels that call, if the record fails.
        """
        if progress is no_progress:  # nobody follows the steps: providers may skip their logs
            prepared = replace(prepared, job=replace(prepared.job, report_steps=False))
        job = prepared.job
        created = self.db.create_request(
            id=job.request_id,
            model=job.model,
            operation=job.operation.value,
            prompt=job.prompt,
            params=prepared.record,
            n=job.n,
            status="running",
            api_key_id=prepared.api_key_id,
        )
        task = asyncio.create_task(
            self._execute(prepared, progress, created), name=f"fluxport-{job.request_id}"
        )
        self._tasks[job.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.request_id, None))
        return task

    async def run(self, prepared: PreparedRequest, progress: ProgressCallback = no_progress) -> Completed:
        task = await self.submit(prepared, progress)
        return await asyncio.shield(task)

    def client_gone(self, request_id: str) -> None:
        """The client disconnected: note it; the generation itself carries on (it can be collected
        with its Idempotency-Key)."""
        written = self.db.mark_client_disconnected(request_id)
        written.add_done_callback(log_failed_write)

    def abandon(self, request_id: str) -> None:
        """The client disconnected and nobody can collect the answer: stop the work (the local step
        loop stops, hosted jobs are cancelled upstream) and record the request `cancelled`."""
        self.client_gone(request_id)
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            self._abandoned.add(request_id)
            task.cancel()

    async def drain(self, grace_s: float) -> None:
        """Let running requests finish (shutdown), then cancel what is left."""
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for t in still:
                t.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)

    async def _execute(
        self, p: PreparedRequest, progress: ProgressCallback, created: asyncio.Future[None]
    ) -> Completed:
        job = p.job
        t0 = time.monotonic()
        ledger = Ledger()
        done = asyncio.ensure_future(self._run_stages(p, progress, t0, ledger))
        try:
            await asyncio.shield(created)
        except BaseException as exc:
            done.cancel()
            await asyncio.gather(done, return_exceptions=True)
            if not isinstance(exc, Exception):
                raise
            log.error("request %s could not be recorded: %r", job.request_id, exc)
            raise StorageUnavailable(
                "The request could not be recorded, so it was not run (its provider call was "
                "cancelled); retry it."
            ) from exc
        try:
            return await done
        except FluxportError as exc:
            await self.records.fail(job, exc, t0, ledger)
            raise
        except asyncio.CancelledError:
            if job.request_id in self._abandoned:
                self._abandoned.discard(job.request_id)
                gone = ClientDisconnected(
                    "The client disconnected before the answer; the work was cancelled."
                )
                await asyncio.shield(self.records.fail(job, gone, t0, ledger))
                raise
            await asyncio.shield(
                self.records.fail(job, Interrupted("The server stopped during generation."), t0, ledger)
            )
            raise
        except Exception as exc:
            log.exception("request %s failed unexpectedly", job.request_id)
            err = FluxportError(f"Internal error while generating: {type(exc).__name__}.")
            await self.records.fail(job, err, t0, ledger)
            raise err from exc

    async def _run_stages(
        self, p: PreparedRequest, progress: ProgressCallback, t0: float, ledger: Ledger
    ) -> Completed:
        routed = await self.dispatcher.route(p, progress, t0, ledger)
        return await self.deliverer.deliver(p, routed, t0, ledger)
