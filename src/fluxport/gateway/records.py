"""The request records that are not a success: refused before running, dry runs, failures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fluxport.catalog import find_model
from fluxport.domain.errors import ClientDisconnected, FluxportError, Interrupted
from fluxport.domain.job import ImageJob, Operation
from fluxport.gateway.types import Ledger, PreparedRequest
from fluxport.metrics import Metrics
from fluxport.settings import Settings
from fluxport.storage.db import Database


class Records:
    """Writes the outcome of requests that did not deliver images, so no request goes unrecorded."""

    def __init__(self, settings: Settings, db: Database, metrics: Metrics, default_model: str) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.default_model = default_model

    async def reject(
        self,
        request_id: str,
        operation: Operation,
        fields: dict[str, Any],
        exc: FluxportError,
        *,
        api_key_id: str | None = None,
    ) -> None:
        """Record a request refused before it ran."""
        model = fields.get("model") if isinstance(fields.get("model"), str) else None
        prompt = fields.get("prompt") if isinstance(fields.get("prompt"), str) else ""
        safe = {k: v for k, v in fields.items() if k != "prompt" and isinstance(v, str | int | float | bool)}
        created = self.db.create_request(
            id=request_id,
            model=(model or self.default_model)[:200],
            operation=operation.value,
            prompt=str(prompt)[: self.settings.max_prompt_chars],
            params=safe,
            n=1,
            api_key_id=api_key_id,
        )
        finished = self.db.finish_request(
            request_id,
            status="rejected",
            provider=None,
            error=exc.record(),
            queued_ms=None,
            generation_ms=None,
            ttfb_ms=None,
            total_ms=None,
            width=None,
            height=None,
            images=0,
            revised_prompt=None,
        )
        await asyncio.gather(created, finished)  # queued together: one transaction
        # Label with the canonical id (or "unknown"), so a client cannot mint metric series.
        spec = find_model(model or self.default_model)
        self.metrics.observe_request(spec.id if spec else "unknown", operation.value, "rejected", 0.0, None)

    async def dry_run(self, p: PreparedRequest, provider: str) -> None:
        """Record a dry run: the request, the provider it would go to, nothing billed."""
        job = p.job
        created = self.db.create_request(
            id=job.request_id,
            model=job.model,
            operation=job.operation.value,
            prompt=job.prompt,
            params={**p.record, "dry_run": True},
            n=job.n,
            api_key_id=p.api_key_id,
        )
        finished = self.db.finish_request(
            job.request_id,
            status="dry_run",
            provider=provider,
            error=None,
            queued_ms=None,
            generation_ms=None,
            ttfb_ms=None,
            total_ms=None,
            width=job.size.width,
            height=job.size.height,
            images=0,
            revised_prompt=None,
            cost_usd=0.0,
        )
        await asyncio.gather(created, finished)
        self.metrics.observe_request(job.model, job.operation.value, "dry_run", 0.0, 0.0)

    async def fail(self, job: ImageJob, exc: FluxportError, t0: float, ledger: Ledger) -> None:
        """Record a request that ran and failed (or was interrupted), with what it was billed."""
        if isinstance(exc, ClientDisconnected):
            status = "cancelled"
        else:
            status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        await ledger.settle()
        await self.db.finish_request(
            job.request_id,
            status=status,
            provider=None,
            error=exc.record(),
            queued_ms=None,
            generation_ms=None,
            ttfb_ms=None,
            total_ms=(time.monotonic() - t0) * 1000,
            width=None,
            height=None,
            images=0,
            revised_prompt=None,
            cost_usd=ledger.total,
        )
        self.metrics.observe_request(
            job.model, job.operation.value, status, time.monotonic() - t0, ledger.total
        )
