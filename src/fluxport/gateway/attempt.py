"""One attempt on one provider: n split into the calls it can make, each priced and recorded."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from dataclasses import dataclass, replace

from fluxport.domain.errors import FluxportError, ProviderFailure
from fluxport.domain.job import ImageJob
from fluxport.domain.pricing import Usage
from fluxport.gateway.plan import Planner, sum_usage
from fluxport.gateway.types import Ledger, PreparedRequest, cancel_all, log_failed_write, ms
from fluxport.metrics import Metrics
from fluxport.providers.base import (
    Behaviour,
    BilledCancellation,
    ProgressCallback,
    ProgressEvent,
    Provider,
    ProviderResult,
)
from fluxport.storage.db import Database


@dataclass
class AttemptResult:
    """What one provider made for the whole request, when, and what it cost."""

    result: ProviderResult
    queued_ms: float
    generation_ms: float | None
    ttfb_ms: float | None  # from the request's start
    usage: Usage  # the megapixels generated and referenced, as the provider bills them


class Attempts:
    """Runs attempts: the provider calls of one request on one provider, side by side."""

    def __init__(self, db: Database, metrics: Metrics, planner: Planner) -> None:
        self.db = db
        self.metrics = metrics
        self.planner = planner

    async def attempt(
        self, provider: Provider, p: PreparedRequest, progress: ProgressCallback, t0: float, ledger: Ledger
    ) -> AttemptResult:
        """Every call of `p` on `provider`; the first failure cancels the others."""
        calls = self.planner.slices(provider, p.job)
        costs = [self.planner.call_cost(provider, call) for call in calls]
        started = time.monotonic() - t0
        progress(ProgressEvent(stage="queued", provider=provider.name, message=f"on {provider.name}"))
        offsets = itertools.accumulate((call.n for call in calls), initial=0)
        tasks = [
            asyncio.create_task(
                self._call(provider, call, cost, _tagged(progress, provider.name, offset), ledger)
            )
            for call, cost, offset in zip(calls, costs, offsets, strict=False)
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            await cancel_all(tasks)
            raise
        normalization: dict[str, Behaviour] = {}
        for r in results:
            normalization.update(r.normalization)
        if len(calls) > 1:
            normalization["n"] = Behaviour.EMULATED
        merged = ProviderResult(
            images=[img for r in results for img in r.images],
            timings=results[0].timings,
            revised_prompt=next((r.revised_prompt for r in results if r.revised_prompt), None),
            normalization=normalization,
            provider_request_id=",".join(r.provider_request_id for r in results if r.provider_request_id)
            or None,
            billed_usd=sum(r.billed_usd or 0.0 for r in results),
        )
        first_bytes = [r.timings.first_byte_s for r in results if r.timings.first_byte_s is not None]
        generations = [r.timings.generation_s for r in results if r.timings.generation_s is not None]
        return AttemptResult(
            result=merged,
            queued_ms=max(r.timings.queued_s for r in results) * 1000,
            generation_ms=max(generations) * 1000 if generations else None,
            ttfb_ms=(started + min(first_bytes)) * 1000 if first_bytes else None,
            usage=sum_usage(costs),
        )

    async def _call(
        self, provider: Provider, job: ImageJob, cost: Usage, progress: ProgressCallback, ledger: Ledger
    ) -> ProviderResult:
        """One provider call, recorded as one attempt with its timings and what it billed: what the
        provider reports it billed, else `cost` (its estimate, the number the request was ranked by)."""
        # The attempt's record is committed while the provider call starts, not before it.
        started = self.db.start_attempt(request_id=job.request_id, provider=provider.name, model=job.model)
        started.add_done_callback(log_failed_write)
        t = time.monotonic()
        try:
            result = await provider.generate(job, progress)
            if len(result.images) != job.n:
                raise ProviderFailure(
                    f"{provider.name} returned {len(result.images)} images instead of {job.n}."
                )
        except BaseException as exc:
            # A call cancelled before it completed (a hedge loser, a deadline) or failed with a 5xx
            # is not billed by the providers; one whose work had completed is, whatever happens next.
            status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            error = exc.record() if isinstance(exc, FluxportError) else {"message": repr(exc)}
            charged = isinstance(exc, BilledCancellation) or getattr(exc, "provider_billed", False)
            billed = cost.cost_usd if charged else 0.0
            ledger.charge(billed)
            try:
                attempt = await asyncio.shield(started)
            except Exception:  # no attempt record to finish (logged); the call's own error stands
                raise exc from None
            await asyncio.shield(
                self.db.finish_attempt(
                    attempt,
                    status=status,
                    error=dict(error),
                    queued_ms=None,
                    ttfb_ms=None,
                    generation_ms=None,
                    total_ms=(time.monotonic() - t) * 1000,
                    provider_request_id=None,
                    normalization=None,
                    billed_usd=billed,
                )
            )
            self.metrics.observe_attempt(job.model, provider.name, status, time.monotonic() - t, billed)
            raise
        if result.billed_usd is None:
            result.billed_usd = cost.cost_usd
        ledger.charge(result.billed_usd)
        tm = result.timings
        attempt = await asyncio.shield(started)
        # Queued with the request's outcome, in one transaction (deliver), or before its failure.
        ledger.deferred.append(
            functools.partial(
                self.db.finish_attempt,
                attempt,
                status="succeeded",
                error=None,
                queued_ms=tm.queued_s * 1000,
                ttfb_ms=ms(tm.first_byte_s),
                generation_ms=ms(tm.generation_s),
                total_ms=(time.monotonic() - t) * 1000,
                provider_request_id=result.provider_request_id,
                normalization={k: v.value for k, v in result.normalization.items()},
                billed_usd=result.billed_usd,
                submitted_ms=ms(tm.submitted_s),
                first_status_ms=ms(tm.first_status_s),
            )
        )
        self.metrics.observe_attempt(
            job.model, provider.name, "succeeded", time.monotonic() - t, result.billed_usd
        )
        return result


def _tagged(progress: ProgressCallback, provider: str, offset: int) -> ProgressCallback:
    """`progress` for one call: its events name the provider, and its partial images are numbered
    among the request's images (the call makes images offset .. offset + call.n - 1)."""

    def report(event: ProgressEvent) -> None:
        partial = event.partial
        if partial is not None and offset:
            partial = replace(partial, image_index=partial.image_index + offset)
        progress(replace(event, provider=provider, partial=partial))

    return report
