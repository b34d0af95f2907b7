"""Runs one image request end to end: validate, size, pick providers, generate, convert, store, record."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fluxport import media
from fluxport.api.protocol import ImageRequest
from fluxport.catalog import MODELS, NOISE_NOTE, ModelSpec, find_model
from fluxport.domain.errors import (
    CoolingDown,
    DeadlineExceeded,
    FluxportError,
    Interrupted,
    InvalidRequest,
    NotFound,
    ProviderFailure,
    RateLimited,
    ServiceUnavailable,
    StorageUnavailable,
)
from fluxport.domain.job import ImageJob, Operation, ReferenceImage, Size
from fluxport.domain.pricing import Usage, billable_megapixels, price, rate_for
from fluxport.domain.sizing import SizeDecision, decide_size, generation_grid
from fluxport.gateway.router import BreakerState, Router, Strategy
from fluxport.metrics import Metrics
from fluxport.providers.base import (
    Behaviour,
    BilledCancellation,
    Capabilities,
    GeneratedImage,
    ProgressCallback,
    ProgressEvent,
    Provider,
    ProviderResult,
    ProviderState,
    no_progress,
)
from fluxport.providers.registry import default_model
from fluxport.settings import Settings
from fluxport.storage.blobs import BlobStore, new_image_id
from fluxport.storage.db import Database, ImageRow

log = logging.getLogger("fluxport.service")

MAX_REFERENCES = 4


@dataclass
class PreparedRequest:
    """A validated request, ready to run: the job and the providers that can serve it, in order."""

    job: ImageJob
    spec: ModelSpec
    providers: list[Provider]
    size: SizeDecision
    request: ImageRequest
    record: dict[str, Any]
    explicit: list[str] | None = None  # the client's own provider order, if it gave one
    api_key_id: str | None = None  # the API key the request is recorded (and billed) against


@dataclass
class StoredImage:
    id: str
    path: str  # URL path, e.g. /images/<id>.png
    image: media.EncodedImage
    seed: int | None


@dataclass
class Completed:
    request_id: str
    model: str
    provider: str
    images: list[StoredImage]
    size: Size
    output_format: str
    response_format: str
    revised_prompt: str | None
    normalization: dict[str, str]
    attempts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    created: int = 0


@dataclass(frozen=True)
class DryRun:
    provider: str  # the provider that would serve the request now
    providers: list[tuple[str, float]]  # the ranked plan with each provider's estimated cost
    usage: Usage  # the estimate on the chosen provider
    size: Size


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


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
        # Running requests are owned here, not by the HTTP handler, so a client that goes away
        # cannot cancel a generation half-way: it completes, is stored and is recorded.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._decode_slots = asyncio.Semaphore(2)
        self.router = Router(settings)
        self.default_model = default_model(settings, self.providers)

    # -- models ---------------------------------------------------------------------------------

    def spec(self, model: str | None) -> ModelSpec:
        model_id = model or self.default_model
        spec = find_model(model_id)
        if spec is None:
            known = ", ".join(MODELS)
            raise NotFound(
                f"The model '{model_id}' does not exist. Available models: {known}.", param="model"
            )
        return spec

    def provider_states(self, spec: ModelSpec) -> list[tuple[str, ProviderState]]:
        states = []
        for name in spec.providers:
            provider = self.providers.get(name)
            if provider is None:
                states.append((name, ProviderState(False, f"the {name} provider is not installed")))
            else:
                states.append((name, provider.state(spec.id)))
        return states

    def configured_providers(self, spec: ModelSpec) -> list[Provider]:
        return [
            self.providers[name]
            for name, state in self.provider_states(spec)
            if state.configured and name in self.providers
        ]

    # -- preparing --------------------------------------------------------------------------------

    async def prepare(
        self,
        request_id: str,
        operation: Operation,
        req: ImageRequest,
        uploads: Sequence[bytes] = (),
        *,
        api_key_id: str | None = None,
    ) -> PreparedRequest:
        """Validate everything that can be validated before any provider is called."""
        spec = self.spec(req.model)
        prompt = req.prompt
        if not prompt.strip():
            raise InvalidRequest("'prompt' must not be empty.", param="prompt")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"'prompt' is {len(prompt)} characters; the maximum is {self.settings.max_prompt_chars}.",
                param="prompt",
            )
        if req.stream:
            raise InvalidRequest("Streaming is not supported yet; omit 'stream'.", param="stream")
        if req.background == "transparent":
            raise InvalidRequest("FLUX.2 cannot make transparent backgrounds.", param="background")
        if operation is Operation.EDIT and not uploads:
            raise InvalidRequest("An edit needs at least one reference image.", param="image")
        limit = min(MAX_REFERENCES, spec.max_references)
        if len(uploads) > limit:
            raise InvalidRequest(
                f"{spec.id} takes at most {limit} reference images; got {len(uploads)}.", param="image"
            )
        candidates = self.configured_providers(spec)
        if not candidates:
            raise ServiceUnavailable(self._how_to_configure(spec))

        references = await self._load_references(uploads)
        decision = decide_size(
            spec,
            size=req.size,
            aspect_ratio=req.aspect_ratio,
            resolution=req.resolution,
            reference=references[0].size if references else None,
        )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        job = ImageJob(
            request_id=request_id,
            model=spec.id,
            operation=operation,
            prompt=prompt,
            size=decision.size,
            n=req.n or 1,
            seed=seed,
            seed_given=req.seed is not None,
            cfg_scale=req.cfg_scale,
            prompt_enhancement=req.prompt_enhancement == "on",
            output_format=req.output_format or "png",
            output_compression=req.output_compression,
            response_format=req.response_format or "url",
            references=tuple(references),
            extras=req.extras,
        )
        explicit = self._explicit(spec, req.provider, candidates)
        if explicit is not None:
            candidates = [prov for name in explicit for prov in candidates if prov.name == name]
        providers = self._able(spec, job, candidates)
        record = {
            "size": str(decision.size),
            "size_source": decision.source,
            "requested": {"size": req.size, "aspect_ratio": req.aspect_ratio, "resolution": req.resolution},
            "n": job.n,
            "seed": job.seed,
            "seed_given": job.seed_given,
            "cfg_scale": job.cfg_scale,
            "prompt_enhancement": job.prompt_enhancement,
            "output_format": job.output_format,
            "output_compression": job.output_compression,
            "response_format": job.response_format,
            "references": [{"format": r.format, "width": r.width, "height": r.height} for r in references],
            "extras": dict(job.extras),
            "provider": explicit,
            "strategy": req.strategy,
            "hedge": req.hedge,
            "ignored": req.ignored,
        }
        return PreparedRequest(job, spec, providers, decision, req, record, explicit, api_key_id)

    def _explicit(
        self, spec: ModelSpec, given: str | list[str] | None, configured: list[Provider]
    ) -> list[str] | None:
        """Validate a client's explicit provider order: known to the model, configured, no repeats."""
        if given is None:
            return None
        names = [given] if isinstance(given, str) else list(given)
        names = [n.strip().lower() for n in names]
        if not names or len(set(names)) != len(names):
            raise InvalidRequest("'provider' must name one or more different providers.", param="provider")
        ready = {prov.name for prov in configured}
        for name in names:
            if name not in spec.providers:
                raise InvalidRequest(
                    f"{spec.id} has no provider '{name}'; its providers are {', '.join(spec.providers)}.",
                    param="provider",
                )
            if name not in ready:
                raise InvalidRequest(
                    f"The provider '{name}' is not configured for {spec.id}.",
                    param="provider",
                    code="provider_not_configured",
                )
        return names

    async def _load_references(self, uploads: Sequence[bytes]) -> list[ReferenceImage]:
        if not uploads:
            return []
        s = self.settings

        async def load(index: int, data: bytes) -> ReferenceImage:
            # Decoding a 50 MP reference takes ~200 MB: two at a time keeps memory bounded.
            async with self._decode_slots:
                return await asyncio.to_thread(
                    media.load_reference,
                    data,
                    index=index,
                    max_bytes=s.max_image_bytes,
                    max_pixels=s.max_input_pixels,
                )

        return list(await asyncio.gather(*(load(i, data) for i, data in enumerate(uploads))))

    def _able(self, spec: ModelSpec, job: ImageJob, candidates: list[Provider]) -> list[Provider]:
        """Drop providers that cannot honour the request; a parameter is never silently dropped."""
        able = candidates
        checks: list[tuple[str, bool, Any]] = [
            ("cfg_scale", job.cfg_scale is not None, lambda c: c.supports_cfg_scale),
            ("prompt_enhancement", job.prompt_enhancement, lambda c: c.supports_prompt_enhancement),
            ("image", len(job.references) > 0, lambda c: c.max_references >= len(job.references)),
        ]
        for param, wanted, ok in checks:
            if not wanted:
                continue
            remaining = [p for p in able if ok(p.capabilities(spec.id))]
            if not remaining:
                names = ", ".join(p.name for p in able)
                raise InvalidRequest(
                    f"No configured provider of {spec.id} ({names}) supports '{param}' as requested.",
                    param=param,
                    code="unsupported_parameter",
                )
            able = remaining
        return able

    def _how_to_configure(self, spec: ModelSpec) -> str:
        hints = {
            "local": "set FLUXPORT_LOCAL_WEIGHTS to a FLUX.2 [dev] weights directory"
            + (" and FLUXPORT_LOCAL_FLASH_LORA to the Turbo LoRA" if spec.id == "flux.2-dev-flash" else ""),
            "fal": "set FAL_KEY",
            "replicate": "set REPLICATE_API_TOKEN",
        }
        ways = "; or ".join(hints[p] for p in spec.providers if p in hints)
        return (
            f"No provider is configured for {spec.id}. To serve it, {ways}, then restart fluxport. "
            f"To try fluxport without any provider, use model flux.2-dummy ({NOISE_NOTE})"
        )

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

    # -- running ----------------------------------------------------------------------------------

    async def dry_run(self, p: PreparedRequest) -> DryRun:
        """The provider the router would pick now and the cost estimate, without generating."""
        ranked = self.ranked(p)
        chosen = next((prov for prov, _ in ranked if self.router.admit(prov.name, p.job.model)), ranked[0][0])
        self.router.release_probe(chosen.name, p.job.model)  # a dry run is no probe
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
        usage = self.estimate(chosen, job)
        finished = self.db.finish_request(
            job.request_id,
            status="dry_run",
            provider=chosen.name,
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
        return DryRun(
            provider=chosen.name,
            providers=[(prov.name, cost) for prov, cost in ranked],
            usage=usage,
            size=job.size,
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
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, prepared: PreparedRequest, progress: ProgressCallback = no_progress) -> Completed:
        task = await self.submit(prepared, progress)
        return await asyncio.shield(task)

    def client_gone(self, request_id: str) -> None:
        """The client disconnected: note it; the generation itself carries on."""
        written = self.db.mark_client_disconnected(request_id)
        written.add_done_callback(_log_failed_write)

    async def drain(self, grace_s: float) -> None:
        """Let running requests finish (shutdown), then cancel what is left."""
        pending = [t for t in self._tasks if not t.done()]
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
        route = asyncio.ensure_future(self._route(p, progress, t0, ledger))
        try:
            await asyncio.shield(created)
        except BaseException as exc:
            route.cancel()
            await asyncio.gather(route, return_exceptions=True)
            if not isinstance(exc, Exception):
                raise
            log.error("request %s could not be recorded: %r", job.request_id, exc)
            raise StorageUnavailable(
                "The request could not be recorded, so it was not run (its provider call was "
                "cancelled); retry it."
            ) from exc
        try:
            return await route
        except FluxportError as exc:
            await self._fail(job, exc, t0, ledger)
            raise
        except asyncio.CancelledError:
            await asyncio.shield(
                self._fail(job, Interrupted("The server stopped during generation."), t0, ledger)
            )
            raise
        except Exception as exc:
            log.exception("request %s failed unexpectedly", job.request_id)
            err = FluxportError(f"Internal error while generating: {type(exc).__name__}.")
            await self._fail(job, err, t0, ledger)
            raise err from exc

    def ranked(self, p: PreparedRequest) -> list[tuple[Provider, float]]:
        """The able providers best first, each with this request's estimated cost there."""
        by_name = {prov.name: prov for prov in p.providers}
        prices = {name: self.estimate(prov, p.job).cost_usd for name, prov in by_name.items()}
        strategy = Strategy(p.request.strategy or self.settings.router_strategy)
        ranked = self.router.rank(p.job.model, prices, strategy, p.explicit)
        return [(by_name[c.name], c.price_usd) for c in ranked]

    def estimate(self, provider: Provider, job: ImageJob) -> Usage:
        """The cost of `job` on `provider`: each call of the fan-out bills its own references, and
        images are billed at the size the model generates (its latent grid), not the delivered one."""
        per_call = max(1, provider.capabilities(job.model).max_images_per_call)
        rate = rate_for(provider.name, job.model, self.settings)
        refs = [r.size for r in job.references]
        spec = find_model(job.model)
        out = generation_grid(job.size, spec.limits) if spec else job.size
        parts = [price(rate, [out] * min(per_call, job.n - i), refs) for i in range(0, job.n, per_call)]
        return _sum_usage(parts)

    async def _route(
        self, p: PreparedRequest, progress: ProgressCallback, t0: float, ledger: Ledger
    ) -> Completed:
        """Failover down the ranked providers, hedge a slow primary, honour one overall deadline."""
        job = p.job
        order = [prov for prov, _ in self.ranked(p)]
        hedging = p.request.hedge if p.request.hedge is not None else self.settings.hedge
        deadline = t0 + self.settings.request_deadline_s
        pending = list(order)
        running: dict[
            asyncio.Task[tuple[ProviderResult, dict[str, float | None]]], tuple[Provider, float]
        ] = {}
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

            task = asyncio.create_task(self._attempt(provider, p, on_progress, t0, ledger))
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
                    await _cancel_all(losers)
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
                        result, timing = task.result()
                        await _cancel_all(running)
                        return await self._deliver(p, provider, result, t0, timing, ledger, tried)
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
            await _cancel_all(running)
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

    async def _fail(self, job: ImageJob, exc: FluxportError, t0: float, ledger: Ledger) -> None:
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

    async def _attempt(
        self, provider: Provider, p: PreparedRequest, progress: ProgressCallback, t0: float, ledger: Ledger
    ) -> tuple[ProviderResult, dict[str, float | None]]:
        """One provider: n split into calls the provider can make, run side by side, each recorded."""
        job = p.job
        caps = provider.capabilities(job.model)
        per_call = max(1, caps.max_images_per_call)
        slices = [
            replace(job, n=min(per_call, job.n - start), seed=job.seed + start)
            for start in range(0, job.n, per_call)
        ]
        started = time.monotonic() - t0
        tasks = [asyncio.create_task(self._call(provider, s, progress, ledger)) for s in slices]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            await _cancel_all(tasks)
            raise
        images = [img for r in results for img in r.images]
        normalization: dict[str, Behaviour] = {}
        for r in results:
            normalization.update(r.normalization)
        if len(slices) > 1:
            normalization["n"] = Behaviour.EMULATED
        merged = ProviderResult(
            images=images,
            timings=results[0].timings,
            revised_prompt=next((r.revised_prompt for r in results if r.revised_prompt), None),
            normalization=normalization,
            provider_request_id=",".join(r.provider_request_id for r in results if r.provider_request_id)
            or None,
            billed_usd=sum(r.billed_usd or 0.0 for r in results),
        )
        first_bytes = [r.timings.first_byte_s for r in results if r.timings.first_byte_s is not None]
        generations = [r.timings.generation_s for r in results if r.timings.generation_s is not None]
        timing = {
            "queued_ms": max(r.timings.queued_s for r in results) * 1000,
            "generation_ms": max(generations) * 1000 if generations else None,
            "ttfb_ms": (started + min(first_bytes)) * 1000 if first_bytes else None,
        }
        return merged, timing

    async def _call(
        self, provider: Provider, job: ImageJob, progress: ProgressCallback, ledger: Ledger
    ) -> ProviderResult:
        """One provider call, recorded as one attempt with its timings and what it billed."""
        # The attempt's record is committed while the provider call starts, not before it.
        started = self.db.start_attempt(request_id=job.request_id, provider=provider.name, model=job.model)
        started.add_done_callback(_log_failed_write)
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
            billed = self.estimate(provider, job).cost_usd if charged else 0.0
            ledger.total = round(ledger.total + billed, 6)
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
            rate = rate_for(provider.name, job.model, self.settings)
            result.billed_usd = price(
                rate, [img.size for img in result.images], [r.size for r in job.references]
            ).cost_usd
        ledger.total = round(ledger.total + result.billed_usd, 6)
        tm = result.timings
        attempt = await asyncio.shield(started)
        # Queued with the request's outcome, in one transaction (_deliver), or before its failure.
        ledger.deferred.append(
            functools.partial(
                self.db.finish_attempt,
                attempt,
                status="succeeded",
                error=None,
                queued_ms=tm.queued_s * 1000,
                ttfb_ms=_ms(tm.first_byte_s),
                generation_ms=_ms(tm.generation_s),
                total_ms=(time.monotonic() - t) * 1000,
                provider_request_id=result.provider_request_id,
                normalization={k: v.value for k, v in result.normalization.items()},
                billed_usd=result.billed_usd,
                submitted_ms=_ms(tm.submitted_s),
                first_status_ms=_ms(tm.first_status_s),
            )
        )
        self.metrics.observe_attempt(
            job.model, provider.name, "succeeded", time.monotonic() - t, result.billed_usd
        )
        return result

    async def _deliver(
        self,
        p: PreparedRequest,
        provider: Provider,
        result: ProviderResult,
        t0: float,
        timing: dict[str, float | None],
        ledger: Ledger,
        tried: list[str],
    ) -> Completed:
        """Convert to the exact size and format, save every image, then record success."""
        job = p.job
        caps = provider.capabilities(job.model)
        ids = [new_image_id() for _ in result.images]
        ext = "jpg" if job.output_format == "jpeg" else job.output_format
        encoded: list[media.EncodedImage | None] = [None] * len(result.images)

        def encoder(index: int, img: GeneratedImage) -> Callable[[], bytes]:
            def encode() -> bytes:
                enc = media.finalize_image(img, job.size, job.output_format, job.output_compression)
                encoded[index] = enc
                return enc.data

            return encode

        # Checked or converted, then written, in one hop to the blob store's writer threads.
        saved = await asyncio.gather(
            *(self.blobs.save(ids[i], encoder(i, img), ext) for i, img in enumerate(result.images)),
            return_exceptions=True,
        )
        failed = next((out for out in saved if isinstance(out, BaseException)), None)
        if failed is not None:
            for out in saved:
                if isinstance(out, str):
                    await self.blobs.delete(out)
            if isinstance(failed, ValueError):  # the provider's bytes are not a usable image
                raise ProviderFailure(f"{provider.name} returned an unusable image: {failed}") from failed
            raise failed
        paths = [out for out in saved if isinstance(out, str)]
        stored: list[StoredImage] = []
        rows: list[ImageRow] = []
        # One whole-second timestamp for `created` and the records: links expire at created + ttl.
        created = int(time.time())
        for index, (img, enc) in enumerate(zip(result.images, encoded, strict=True)):
            assert enc is not None  # saved: encoded first
            image_id = ids[index]
            rows.append(
                ImageRow(
                    id=image_id,
                    request_id=job.request_id,
                    index=index,
                    path=paths[index],
                    format=enc.format,
                    mime=enc.mime,
                    width=enc.width,
                    height=enc.height,
                    bytes=len(enc.data),
                    created_at=datetime.fromtimestamp(created, UTC),
                )
            )
            stored.append(StoredImage(image_id, f"/images/{image_id}.{ext}", enc, _seed_of(img, job, index)))
        # Megapixels as billed: what the provider generated, and the references of each of its calls.
        estimate = self.estimate(provider, job)
        usage = Usage(
            images=len(stored),
            input_megapixels=estimate.input_megapixels,
            output_megapixels=sum(billable_megapixels(img.size) for img in result.images),
            cost_usd=ledger.total,
        )
        attempts = ledger.queue_deferred()
        images_added = self.db.add_images(rows)
        finished = self.db.finish_request(
            job.request_id,
            status="succeeded",
            provider=provider.name,
            error=None,
            queued_ms=timing["queued_ms"],
            generation_ms=timing["generation_ms"],
            ttfb_ms=timing["ttfb_ms"],
            total_ms=(time.monotonic() - t0) * 1000,
            width=job.size.width,
            height=job.size.height,
            images=len(stored),
            revised_prompt=result.revised_prompt,
            cost_usd=ledger.total,
        )
        # The attempts, the images and the outcome: queued together, one transaction. The images'
        # fsync (FLUXPORT_IMAGE_FSYNC=after_answer) waits for it: both would hit the disk at once.
        try:
            await asyncio.gather(*attempts, images_added, finished)
        finally:
            self.blobs.sync_soon()
        self.metrics.observe_request(
            job.model, job.operation.value, "succeeded", time.monotonic() - t0, ledger.total
        )
        return Completed(
            request_id=job.request_id,
            model=job.model,
            provider=provider.name,
            images=stored,
            size=job.size,
            output_format=job.output_format,
            response_format=job.response_format,
            revised_prompt=result.revised_prompt,
            normalization=self._report(p, caps, result),
            attempts=tried,
            usage=usage,
            created=created,
        )

    def _report(self, p: PreparedRequest, caps: Capabilities, result: ProviderResult) -> dict[str, str]:
        """param -> passthrough / renamed / converted / emulated (or ignored): x-fluxport-normalization."""
        job, req = p.job, p.request
        report: dict[str, str] = {k: v.value for k, v in result.normalization.items()}
        if p.size.adjusted or any(img.size != job.size for img in result.images):
            report["size"] = Behaviour.CONVERTED.value
        report.setdefault("size", Behaviour.PASSTHROUGH.value)
        size_given = bool(req.size and req.size.strip().lower() != "auto")
        for name in ("aspect_ratio", "resolution"):
            if getattr(req, name):
                report[name] = (
                    "ignored" if size_given and p.size.source == "size" else Behaviour.CONVERTED.value
                )
        native = job.output_format in caps.native_output_formats
        report["output_format"] = (
            report.get("output_format", Behaviour.PASSTHROUGH.value) if native else Behaviour.CONVERTED.value
        )
        if job.output_compression is not None:
            report.setdefault(
                "output_compression", Behaviour.PASSTHROUGH.value if native else Behaviour.CONVERTED.value
            )
        report["response_format"] = Behaviour.EMULATED.value
        report.setdefault("n", Behaviour.PASSTHROUGH.value)
        for name in req.ignored:
            report[name] = "ignored"
        return report


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


@dataclass
class Ledger:
    """What the providers billed for one request so far, across every attempt, and the attempt
    records still to write (with the request's outcome, in one transaction)."""

    total: float = 0.0
    deferred: list[Callable[[], asyncio.Future[None]]] = field(default_factory=list)

    def queue_deferred(self) -> list[asyncio.Future[None]]:
        """Queue the deferred attempt records now; their futures."""
        deferred, self.deferred = self.deferred, []
        return [write() for write in deferred]

    async def settle(self) -> None:
        """Write the attempt records not yet queued (a failure is logged, not raised: the
        request's own outcome is recorded next all the same)."""
        for outcome in await asyncio.gather(*self.queue_deferred(), return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.error("an attempt record could not be written: %r", outcome)


def _log_failed_write(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a record could not be written: %r", future.exception())


async def _cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they have finished cancelling (their providers cancel upstream)."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def _sum_usage(parts: Sequence[Usage]) -> Usage:
    return Usage(
        images=sum(u.images for u in parts),
        input_megapixels=sum(u.input_megapixels for u in parts),
        output_megapixels=sum(u.output_megapixels for u in parts),
        cost_usd=round(sum(u.cost_usd for u in parts), 6),
    )


def _seed_of(img: GeneratedImage, job: ImageJob, index: int) -> int | None:
    return img.seed if img.seed is not None else job.image_seed(index)
