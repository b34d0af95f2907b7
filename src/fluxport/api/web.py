"""The web pages: the catalog, one page per model, and the playground (no API key, rate-limited).

Server-rendered Jinja2 templates, one CSS file and one small script. The playground's backend is
deliberately not under /v1 (which will require a key): `POST /playground/api/jobs` starts a job and
`GET /playground/api/jobs/{id}/events` streams its progress and result as Server-Sent Events.
Without JavaScript the same form posts to `POST /playground`, which waits and renders the result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData, UploadFile

from fluxport.api.protocol import ImageRequest, parse_image_request
from fluxport.catalog import MODELS, NOISE_NOTE, TIER_MEGAPIXELS, ModelSpec, find_model
from fluxport.domain.errors import FluxportError, InvalidRequest, NotFound, PayloadTooLarge, RateLimited
from fluxport.domain.job import OUTPUT_FORMATS, Operation, Size, file_extension
from fluxport.domain.sizing import tier_size
from fluxport.gateway.service import Completed, ImageService, PreparedRequest
from fluxport.gateway.stats import DEFAULT_WINDOW, provider_stats
from fluxport.providers.base import ProgressEvent

log = logging.getLogger("fluxport.web")

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")

router = APIRouter(include_in_schema=False)

# -- page data (one place; the templates only lay it out) ------------------------------------------

# Parameter reference: name, accepted values, in text-to-image, in edits, notes.
PARAMETERS: tuple[tuple[str, str, bool, bool, str], ...] = (
    ("prompt", "1-32000 characters", True, True, "Required."),
    ("model", "model id or alias", True, True, "Defaults to the server's default model."),
    ("image", "1-4 files: PNG, JPEG, WebP", False, True, "Reference images; makes the request an edit."),
    ("n", "1-10", True, True, "Batched where the provider can, else parallel calls."),
    ("size", "WxH, W:H or auto", True, True, "Wins over aspect_ratio and resolution."),
    ("aspect_ratio", "any W:H", True, True, "Mapped to the nearest supported ratio."),
    ("resolution", "0.5K, 1K, 2K, 4K or megapixels", True, True, "Mapped to the nearest supported tier."),
    ("seed", "0 ... 2^63-1", True, True, "Image i uses seed + i; each image's seed comes back."),
    ("cfg_scale", "0-20", True, True, "Guidance scale."),
    ("prompt_enhancement", "off, on", True, True, "The rewritten prompt comes back as revised_prompt."),
    ("response_format", "url, b64_json", True, True, ""),
    ("output_format", "png, jpeg, gif, webp, avif", True, True, "Converted when a provider cannot."),
    ("output_compression", "0-100", True, True, "Quality for jpeg, webp, avif."),
)

PRICING_NOTES: tuple[str, ...] = (
    "FLUX.2 is billed per megapixel (1 MP = 1024 × 1024 px); each image is rounded up to the next "
    "whole megapixel, so 1920 × 1080 counts as 2 MP.",
    "Each reference image of an edit is billed separately, as input, at 1 MP or more.",
    "Images over 4 MP are resized to 4 MP before billing, so they count as 4 MP.",
    "Your own GPU (local) costs nothing here unless configured. Any price can be set with "
    "FLUXPORT_PRICES, e.g. '{\"replicate/flux.2-dev\": 0.012}'; Replicate's flux-2-dev price is unconfirmed.",
)

PLAYGROUND_FIELDS = ("prompt", "model", "size", "aspect_ratio", "resolution", "seed", "n", "output_format")
MAX_PLAYGROUND_FILES = 4


@dataclass
class ProviderRow:
    """One provider of a model, with its state, live stats and price (None: no data yet)."""

    name: str
    configured: bool
    detail: str
    requests: int = 0
    success_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    ttfb_p50_ms: float | None = None
    price_per_mp_usd: float | None = None
    input_price_per_mp_usd: float | None = None


def _service(request: Request) -> ImageService:
    service: ImageService = request.app.state.service
    return service


def _base_url(request: Request, service: ImageService) -> str:
    return (service.settings.public_url or str(request.base_url)).rstrip("/")


async def provider_rows(service: ImageService, spec: ModelSpec) -> list[ProviderRow]:
    """State, live stats and price of each provider of `spec`; a failing source leaves its columns empty."""
    rows = [
        ProviderRow(name, state.configured, state.detail) for name, state in service.provider_states(spec)
    ]
    by_name = {r.name: r for r in rows}
    for row in rows:
        try:
            rate = service.rate(row.name, spec.id)
        except Exception:  # a page must render even when pricing is misconfigured
            log.exception("no price for %s/%s", row.name, spec.id)
            continue
        row.price_per_mp_usd, row.input_price_per_mp_usd = rate.output_per_mp, rate.input_per_mp
    try:
        stats = await provider_stats(service.db, spec.id, providers=list(by_name))
    except Exception:
        log.exception("no stats for %s", spec.id)
        return rows
    for s in stats:
        found = by_name.get(s.provider)
        if found is None:  # a provider with history that no longer serves the model
            continue
        row = found
        row.requests, row.success_rate = s.requests, s.success_rate
        row.p50_ms, row.p95_ms, row.ttfb_p50_ms = s.p50_ms, s.p95_ms, s.ttfb_p50_ms
    return rows


def _price_from(rows: list[ProviderRow]) -> dict[str, Any]:
    paid = [r for r in rows if r.price_per_mp_usd]
    cheapest = min(paid, key=lambda r: r.price_per_mp_usd or 0.0) if paid else None
    return {
        "paid": cheapest.price_per_mp_usd if cheapest else None,
        "paid_provider": cheapest.name if cheapest else None,
        "free": [r.name for r in rows if r.price_per_mp_usd == 0],
    }


def _size_table(spec: ModelSpec) -> list[tuple[str, list[Size]]]:
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t])
    return [(ratio, [tier_size(ratio, t, spec) for t in tiers]) for ratio in spec.ratios]


def _examples(base: str, model: str, noise: bool) -> dict[str, str]:
    prompt = "a lighthouse at dusk, 35mm photo"
    size = "512x512" if noise else "1365x768"
    python = f'''from openai import OpenAI

client = OpenAI(base_url="{base}/v1", api_key="YOUR_KEY")
result = client.images.generate(
    model="{model}",
    prompt="{prompt}",
    size="{size}",
    extra_body={{"seed": 42}},
)
print(result.data[0].url)

edited = client.images.edit(
    model="{model}",
    image=[open("reference.png", "rb")],
    prompt="make it winter",
)'''
    javascript = f'''import OpenAI from "openai";
import fs from "node:fs";

const client = new OpenAI({{ baseURL: "{base}/v1", apiKey: "YOUR_KEY" }});
const result = await client.images.generate({{
  model: "{model}",
  prompt: "{prompt}",
  size: "{size}",
  seed: 42, // a fluxport extra: sent as is
}});
console.log(result.data[0].url);

const edited = await client.images.edit({{
  model: "{model}",
  image: [fs.createReadStream("reference.png")],
  prompt: "make it winter",
}});'''
    curl = f"""curl {base}/v1/images/generations \\
  -H 'content-type: application/json' \\
  -H 'authorization: Bearer YOUR_KEY' \\
  -d '{{"model": "{model}", "prompt": "{prompt}", "aspect_ratio": "4:3", "seed": 42}}'

curl {base}/v1/images/edits \\
  -H 'authorization: Bearer YOUR_KEY' \\
  -F model={model} -F prompt='make it winter' -F image=@reference.png"""
    return {"curl": curl, "python": python, "javascript": javascript}


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "free"
    return f"${value:.4f}".rstrip("0").rstrip(".") if value < 0.01 else f"${value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


templates.env.filters["ms"] = _ms
templates.env.filters["usd"] = _usd
templates.env.filters["pct"] = _pct


def _available(service: ImageService) -> list[ModelSpec]:
    """Models with at least one configured provider: the ones the playground offers."""
    return [s for s in MODELS.values() if any(st.configured for _, st in service.provider_states(s))]


def _page(
    request: Request, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"noise_note": NOISE_NOTE, **context}, status_code=status, headers=headers
    )


# -- pages -------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def catalog(request: Request) -> HTMLResponse:
    service = _service(request)
    cards = []
    for spec in MODELS.values():
        rows = await provider_rows(service, spec)
        cards.append({"spec": spec, "rows": rows, "price": _price_from(rows)})
    return _page(request, "catalog.html", cards=cards, title="Models")


@router.get("/models/{model_id:path}", response_class=HTMLResponse)
async def model_page(model_id: str, request: Request) -> Response:
    service = _service(request)
    spec = find_model(model_id)
    if spec is None:
        return _page(
            request,
            "error.html",
            status=404,
            title="No such model",
            message=f"The model '{model_id}' does not exist. Available models: {', '.join(MODELS)}.",
        )
    rows = await provider_rows(service, spec)
    base = _base_url(request, service)
    # How each parameter reaches each provider, as the providers declare it (their Capabilities).
    providers = service.providers
    normalization = [
        (name, providers[name].capabilities(spec.id).normalization if name in providers else {})
        for name in spec.providers
    ]
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t])
    return _page(
        request,
        "model.html",
        title=spec.name,
        spec=spec,
        rows=rows,
        ranked=sorted((r for r in rows if r.requests), key=lambda r: r.p50_ms or math.inf),
        window_days=round(DEFAULT_WINDOW.total_seconds() / 86400),
        price=_price_from(rows),
        pricing_notes=PRICING_NOTES,
        parameters=PARAMETERS,
        max_references=spec.max_references,
        tiers=tiers,
        tier_mp=TIER_MEGAPIXELS,
        sizes=_size_table(spec),
        normalization=normalization,
        norm_params=list(dict.fromkeys(param for _, table in normalization for param in table)),
        examples=_examples(base, spec.id, spec.noise),
        base_url=base,
    )


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
    service = _service(request)
    spec = find_model(model) if model else None
    values = {"model": spec.id} if spec else {}
    return _page(request, "playground.html", **_playground_context(request, service, values=values))


@router.post("/playground", response_class=HTMLResponse)
async def playground_form(request: Request) -> HTMLResponse:
    """The no-JavaScript path: run the job and render the page with its result or error."""
    service = _service(request)
    values: dict[str, Any] = {}
    try:
        _limiter(request).hit(_client_key(request))
        values, uploads = await _read_form(request, service)
        job = await _start(request, service, values, uploads)
        await job.done.wait()
    except FluxportError as exc:
        ctx = _playground_context(request, service, values=values, error=exc.body()["error"])
        return _page(request, "playground.html", status=exc.status, headers=exc.headers, **ctx)
    ctx = _playground_context(request, service, values=values, result=job.result, error=job.error)
    if job.error:
        return _page(request, "playground.html", status=int(job.error.get("status", 500)), **ctx)
    return _page(request, "playground.html", **ctx)


# -- playground API ----------------------------------------------------------------------------------


class RateLimiter:
    """A sliding one-minute window of submissions per client, bounded in clients remembered."""

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, client: str, now: float | None = None) -> None:
        """Count one submission, or raise RateLimited (429, Retry-After) when over the limit."""
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        hits = self._hits.pop(client, None) or deque()
        while hits and hits[0] <= now - 60:
            hits.popleft()
        self._hits[client] = hits
        while len(self._hits) > self.max_clients:
            self._hits.popitem(last=False)
        if len(hits) >= self.per_minute:
            retry = max(1, math.ceil(hits[0] + 60 - now))
            raise RateLimited(
                f"Playground rate limit reached: {self.per_minute} generations per minute per client. "
                f"Try again in {retry} s, or use the API with a key.",
                retry_after=retry,
            )
        hits.append(now)


@dataclass
class PlaygroundJob:
    """One playground generation: its latest progress, then a result or an error."""

    id: str
    request_id: str
    operation: str
    started: float = field(default_factory=time.monotonic)
    progress: dict[str, Any] | None = None
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


def _limiter(request: Request) -> RateLimiter:
    state = request.app.state
    limiter: RateLimiter | None = getattr(state, "playground_limiter", None)
    if limiter is None:
        limiter = state.playground_limiter = RateLimiter(
            _service(request).settings.playground_rate_per_minute
        )
    return limiter


def _jobs(request: Request) -> JobStore:
    state = request.app.state
    store: JobStore | None = getattr(state, "playground_jobs", None)
    if store is None:
        store = state.playground_jobs = JobStore()
    return store


def _client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"


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
    fields: dict[str, Any] = {**values, "response_format": "url"}
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
    service = _service(request)
    _limiter(request).hit(_client_key(request))
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
    """Server-Sent Events: `progress` (stage, step i of N, optional preview), then `result` or `error`."""
    job = _jobs(request).get(job_id)
    if job is None:
        raise _no_job()

    async def stream() -> AsyncIterator[str]:
        seen = -1
        yield "retry: 2000\n\n"
        while True:
            version = job.version
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
