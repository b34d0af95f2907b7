"""The playground: its form page (with a no-JavaScript path) and the job API it drives (create, poll, SSE).

Deliberately not under /v1 (which will require a key): `POST /playground/api/jobs` starts a job and
`GET /playground/api/jobs/{id}/events` streams its progress and result as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.datastructures import FormData, UploadFile

from fluxport.api.protocol import ImageRequest, parse_image_request
from fluxport.catalog import MODELS, TIER_MEGAPIXELS, ModelSpec, find_model
from fluxport.domain.errors import FluxportError, InvalidRequest, NotFound, PayloadTooLarge
from fluxport.domain.job import OUTPUT_FORMATS, Operation, file_extension
from fluxport.gateway.service import Completed, ImageService, PreparedRequest
from fluxport.providers.base import ProgressEvent
from fluxport.web.jobs import JobStore, PlaygroundJob
from fluxport.web.ratelimit import RateLimiter, client_key
from fluxport.web.render import image_service, render_page

router = APIRouter(include_in_schema=False)

PLAYGROUND_FIELDS = ("prompt", "model", "size", "aspect_ratio", "resolution", "seed", "n", "output_format")
MAX_PLAYGROUND_FILES = 4
PARTIALS = 3  # partial images per playground job, where the provider makes them


def _available(service: ImageService) -> list[ModelSpec]:
    """Models with at least one configured provider: the ones the playground offers."""
    return [s for s in MODELS.values() if any(st.configured for _, st in service.provider_states(s))]


def _playground_context(request: Request, service: ImageService, **context: Any) -> dict[str, Any]:
    models = _available(service)
    ids = [m.id for m in models]
    default = service.default_model if service.default_model in ids else None
    selected = default or (ids[0] if ids else None)
    spec = find_model(selected) if selected else None
    ratios = list(spec.ratios) if spec else []
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t]) if spec else []
    return {
        "title": "Playground",
        "models": models,
        "selected": selected,
        "ratios": ratios,
        "tiers": tiers,
        "formats": OUTPUT_FORMATS,
        "rate": service.settings.playground_rate_per_minute,
        "values": {},
        **context,
    }


@router.get("/playground", response_class=HTMLResponse)
async def playground(request: Request, model: str | None = None) -> HTMLResponse:
    service = image_service(request)
    spec = find_model(model) if model else None
    values = {"model": spec.id} if spec else {}
    return render_page(request, "playground.html", **_playground_context(request, service, values=values))


@router.post("/playground", response_class=HTMLResponse)
async def playground_form(request: Request) -> HTMLResponse:
    """The no-JavaScript path: run the job and render the page with its result or error."""
    service = image_service(request)
    values: dict[str, Any] = {}
    try:
        await _limiter(request).hit(client_key(request))
        values, uploads = await _read_form(request, service)
        job = await _start(request, service, values, uploads)
        await job.done.wait()
    except FluxportError as exc:
        ctx = _playground_context(request, service, values=values, error=exc.body()["error"])
        return render_page(request, "playground.html", status=exc.status, headers=exc.headers, **ctx)
    ctx = _playground_context(request, service, values=values, result=job.result, error=job.error)
    if job.error:
        return render_page(request, "playground.html", status=int(job.error.get("status", 500)), **ctx)
    return render_page(request, "playground.html", **ctx)


# -- playground API ----------------------------------------------------------------------------------


def _limiter(request: Request) -> RateLimiter:
    state = request.app.state
    limiter: RateLimiter | None = getattr(state, "playground_limiter", None)
    if limiter is None:
        limiter = state.playground_limiter = RateLimiter(
            image_service(request).settings.playground_rate_per_minute, state.live.windows
        )
    return limiter


def _jobs(request: Request) -> JobStore:
    state = request.app.state
    store: JobStore | None = getattr(state, "playground_jobs", None)
    if store is None:
        store = state.playground_jobs = JobStore()
    return store


async def _read_form(request: Request, service: ImageService) -> tuple[dict[str, Any], list[bytes]]:
    """The playground form: the API's fields (empty ones left out) and up to four reference images."""
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www")):
        raise InvalidRequest(
            "The playground takes a form (multipart/form-data).", code="invalid_content_type"
        )
    try:
        form: FormData = await request.form(max_files=MAX_PLAYGROUND_FILES + 1, max_fields=50)
    except PayloadTooLarge:
        raise
    except Exception as exc:  # the multipart parser raises its own types for malformed bodies
        raise InvalidRequest(f"Malformed form: {exc}.", code="invalid_multipart") from None
    values: dict[str, Any] = {}
    uploads: list[bytes] = []
    max_bytes = service.settings.max_image_bytes
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image" or not value.filename:
                    continue  # an empty file input is sent as a nameless part
                data = await value.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise PayloadTooLarge(
                        f"Reference image {len(uploads) + 1} is larger than {max_bytes} bytes.", param="image"
                    )
                if data:
                    uploads.append(data)
            elif key in PLAYGROUND_FIELDS and value.strip():
                values[key] = value.strip()
    finally:
        await form.close()
    if len(uploads) > MAX_PLAYGROUND_FILES:
        raise InvalidRequest(f"At most {MAX_PLAYGROUND_FILES} reference images.", param="image")
    return values, uploads


def _request_fields(values: dict[str, Any]) -> dict[str, Any]:
    # Partial images as the streamed API sends them: real ones where the provider makes them (the
    # local provider), shown in place of the preview as they come.
    fields: dict[str, Any] = {**values, "response_format": "url", "stream": True, "partial_images": PARTIALS}
    for name in ("seed", "n"):
        if name in fields:
            with contextlib.suppress(ValueError):  # else left as text: validation names the field
                fields[name] = int(fields[name])
    return fields


async def _start(
    request: Request, service: ImageService, values: dict[str, Any], uploads: list[bytes]
) -> PlaygroundJob:
    """Prepare and submit the job; progress arrives from worker threads and is moved onto the loop."""
    operation = Operation.EDIT if uploads else Operation.GENERATE
    request_id: str = request.state.request_id
    fields = _request_fields(values)
    try:
        req = parse_image_request(fields)
        prepared = await service.prepare(request_id, operation, req.to_params(), uploads)
    except FluxportError as exc:
        await service.reject(request_id, operation, fields, exc)
        raise
    job = PlaygroundJob(id=f"job_{secrets.token_hex(12)}", request_id=request_id, operation=operation.value)
    _jobs(request).add(job)
    loop = asyncio.get_running_loop()

    def progress(event: ProgressEvent) -> None:
        payload: dict[str, Any] = {
            "stage": event.stage,
            "step": event.step,
            "total": event.total,
            "message": event.message,
        }
        partial = event.partial
        if partial is not None:
            if partial.image_index == 0:  # one image's partials: the first image's
                shown = {
                    "image": f"data:image/{partial.output_format};base64,"
                    + base64.b64encode(partial.data).decode("ascii"),
                    "index": partial.partial_index,
                    "of": PARTIALS,
                    "step": event.step,
                    "total": event.total,
                }
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(job.set_partial, shown)
            return
        if event.preview:
            payload["preview"] = "data:image/png;base64," + base64.b64encode(event.preview).decode("ascii")
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody listens
            loop.call_soon_threadsafe(job.set_progress, payload)

    task = await service.submit(prepared, progress)
    task.add_done_callback(lambda t: _finish(job, service, prepared, req, t))
    return job


def _finish(
    job: PlaygroundJob,
    service: ImageService,
    prepared: PreparedRequest,
    req: ImageRequest,
    task: asyncio.Task[Completed],
) -> None:
    if task.cancelled():
        job.finish(None, {"message": "The generation was cancelled.", "type": "server_error", "status": 500})
        return
    exc = task.exception()
    if isinstance(exc, FluxportError):
        job.finish(None, dict(exc.record()))
    elif exc is not None:
        job.finish(None, {"message": f"Internal error: {type(exc).__name__}.", "type": "server_error"})
    else:
        job.finish(_result(job, service, prepared, task.result()), None)


def _result(
    job: PlaygroundJob, service: ImageService, prepared: PreparedRequest, done: Completed
) -> dict[str, Any]:
    ext = file_extension(done.output_format)
    return {
        "request_id": done.request_id,
        "operation": job.operation,
        "model": done.model,
        "provider": done.provider,
        "latency_ms": round((time.monotonic() - job.started) * 1000),
        "size": str(done.size),
        "output_format": done.output_format,
        "cost_usd": done.usage.cost_usd,
        "revised_prompt": done.revised_prompt,
        "normalization": done.normalization,
        "images": [
            {
                "url": img.path,
                "seed": img.seed,
                "bytes": len(img.image.data),
                "download": f"fluxport-{img.id[:8]}.{ext}",
            }
            for img in done.images
        ],
    }


@router.post("/playground/api/jobs")
async def create_job(request: Request) -> JSONResponse:
    """Start a playground job (multipart form); answers its id and where to follow it."""
    service = image_service(request)
    await _limiter(request).hit(client_key(request))
    values, uploads = await _read_form(request, service)
    job = await _start(request, service, values, uploads)
    return JSONResponse(
        {"id": job.id, "operation": job.operation, "events": f"/playground/api/jobs/{job.id}/events"},
        status_code=202,
    )


def _snapshot(job: PlaygroundJob) -> dict[str, Any]:
    status = "running" if job.finished_at is None else ("failed" if job.error else "succeeded")
    return {
        "id": job.id,
        "status": status,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
    }


@router.get("/playground/api/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    job = _jobs(request).get(job_id)
    if job is None:
        raise _no_job()
    return JSONResponse(_snapshot(job))


def _no_job() -> FluxportError:
    return NotFound("No such playground job (finished jobs are kept for ten minutes).", param=None)


@router.get("/playground/api/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: `progress` (stage, step i of N, optional preview), `partial` (a real
    partial image: the local provider's, as the streamed API sends them), then `result` or `error`."""
    job = _jobs(request).get(job_id)
    if job is None:
        raise _no_job()

    async def stream() -> AsyncIterator[str]:
        seen = -1
        seen_partial = 0
        yield "retry: 2000\n\n"
        while True:
            version = job.version
            if job.partial_version != seen_partial and job.partial is not None:
                seen_partial = job.partial_version
                yield f"event: partial\ndata: {json.dumps(job.partial)}\n\n"
            if job.finished_at is not None:
                kind, data = ("error", {"error": job.error}) if job.error else ("result", job.result)
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                return
            if version != seen and job.progress is not None:
                yield f"event: progress\ndata: {json.dumps(job.progress)}\n\n"
            elif version == seen:
                yield ": keep-alive\n\n"
            seen = version
            await job.changed(seen, wait_s=15)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
