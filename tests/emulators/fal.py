"""A fal.ai queue API emulator for the FLUX.2 [dev] endpoints (providers.md §1, §3).

Routes (all under `base_url`, which stands for https://queue.fal.run):

- `POST /{endpoint_id}` submit, e.g. /fal-ai/flux-2/flash/edit; answers IN_QUEUE and the request URLs
- `GET /{owner}/{app}/requests/{id}/status?logs=1|0|true|false` 202 while pending, 200 once COMPLETED
- `GET /{owner}/{app}/requests/{id}/status/stream?logs=…` SSE: `data: {status body}` at each change
  (state transitions; with logs, new progress at most every 0.25 s), `: keepalive` comments while
  quiet, closed after COMPLETED (a cancelled request completes at once). `config.status_stream=False`
  answers 404. Faults at "status" strike when it is opened; at "stream" only the stream is hit.
- `GET /{owner}/{app}/requests/{id}` the output JSON, or the model's error (e.g. 422 with `detail`)
- `PUT /{owner}/{app}/requests/{id}/cancel` 202 CANCELLATION_REQUESTED / 400 ALREADY_COMPLETED
- `GET /cdn/{name}` the images (stands for https://v3.fal.media)

Status, result and cancel use only owner/app, never the endpoint's subpath, as on fal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tests.emulators.server import (
    HTTP_KINDS,
    BillingEntry,
    CdnObject,
    EmulatedReset,
    Emulator,
    EmulatorConfig,
    Fault,
    FaultKind,
    billed_megapixels,
    data_uri,
    decode_image_uri,
    now_iso,
    progress_line,
    render_image,
    seed_colour,
)

PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
# endpoint -> (default image_size, distilled: no steps / acceleration)
ENDPOINTS: dict[str, tuple[str, bool]] = {
    "fal-ai/flux-2": ("landscape_4_3", False),
    "fal-ai/flux-2/edit": ("square_hd", False),
    "fal-ai/flux-2/flash": ("landscape_4_3", True),
    "fal-ai/flux-2/flash/edit": ("square_hd", True),
    "fal-ai/flux-2/turbo": ("landscape_4_3", True),
    "fal-ai/flux-2/turbo/edit": ("square_hd", True),
}
PRICES = {
    "fal-ai/flux-2": 0.012,
    "fal-ai/flux-2/edit": 0.012,
    "fal-ai/flux-2/flash": 0.005,
    "fal-ai/flux-2/flash/edit": 0.005,
    "fal-ai/flux-2/turbo": 0.008,
    "fal-ai/flux-2/turbo/edit": 0.008,
}
_LOGS_VALUES = {"1", "0", "true", "false"}
_INFRA_ERROR_TYPES = {500: "runner_server_error", 503: "runner_scheduling_failure"}
STREAM_LOG_INTERVAL_S = 0.25  # the status stream sends new progress logs at most this often


@dataclass
class FalJob:
    """One queued request; its state follows from the clock."""

    id: str
    endpoint: str
    app: str  # owner/app: the request namespace
    input: dict[str, Any]
    created: float
    queue_s: float
    run_s: float
    fault: Fault | None
    seed: int
    width: int
    height: int
    n: int
    fmt: str
    refs: int
    steps: int
    error: tuple[int, dict[str, Any]] | None = None  # the model's error, served at result
    cancelled_at: float | None = None
    urls: list[str] = field(default_factory=list)

    @property
    def done_at(self) -> float:
        return self.created + self.queue_s + self.run_s

    def state(self, now: float) -> str:
        if self.cancelled:
            return "COMPLETED"  # with an error: the result call answers 499 client_cancelled
        return self._phase(now)

    def _phase(self, now: float) -> str:
        if now < self.created + self.queue_s:
            return "IN_QUEUE"
        if now < self.done_at:
            return "IN_PROGRESS"
        return "COMPLETED"

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None and self.cancelled_at < self.done_at

    def kind(self) -> FaultKind | None:
        return FaultKind(self.fault.kind) if self.fault is not None else None


class FalEmulator(Emulator):
    """Emulates queue.fal.run for the FLUX.2 [dev] family. `key` is the accepted FAL_KEY."""

    default_prices = PRICES

    def __init__(
        self, config: EmulatorConfig | None = None, *, key: str = "test-key", log_level: str = "warning"
    ) -> None:
        self.key = key
        self.jobs: dict[str, FalJob] = {}
        # Open status streams by request id, woken when the request is cancelled (one event loop).
        self._watchers: dict[str, set[asyncio.Event]] = {}
        super().__init__(config, log_level=log_level)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/cdn/{name}", self.cdn, methods=["GET"]),
            Route("/{owner}/{app}/requests/{rid}/status", self.status, methods=["GET"]),
            Route("/{owner}/{app}/requests/{rid}/status/stream", self.status_stream, methods=["GET"]),
            Route("/{owner}/{app}/requests/{rid}/cancel", self.cancel, methods=["PUT"]),
            Route("/{owner}/{app}/requests/{rid}", self.result, methods=["GET"]),
            Route("/{endpoint:path}", self.submit, methods=["POST"]),
            Route("/{anything:path}", self.not_found, methods=["GET", "PUT", "DELETE"]),
        ]

    @property
    def open_streams(self) -> int:
        """Status streams being served right now (a client that went away closes its own)."""
        return sum(len(w) for w in list(self._watchers.values()))

    def _reset_jobs(self) -> None:
        self.jobs.clear()
        self._watchers.clear()

    def error_response(self, status: int, message: str, error_type: str | None) -> Response:
        kind = error_type or _INFRA_ERROR_TYPES.get(status, "internal_error")
        return JSONResponse(
            {"detail": message, "error_type": kind}, status, headers={"x-fal-error-type": kind}
        )

    # -- handlers --------------------------------------------------------------------------------

    def _authorised(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Key {self.key}":
            return JSONResponse({"detail": "Invalid or missing authentication credentials"}, 401)
        return None

    async def not_found(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse({"detail": "Not Found"}, 404)

    async def submit(self, request: Request) -> Any:
        entry = await self.record(request)
        if (denied := self._authorised(request)) is not None:
            return denied
        endpoint = request.path_params["endpoint"].strip("/")
        if endpoint not in ENDPOINTS:
            return JSONResponse({"detail": f"Application '{endpoint}' not found"}, 404)
        if not isinstance(entry.body, dict):
            return _invalid(["body"], "Input should be a valid JSON object", "json_invalid")
        fault = self._draw_fault()
        if fault is not None and fault.stage == "submit":
            if FaultKind(fault.kind) in HTTP_KINDS:
                return await self.fault_response(fault)
            if FaultKind(fault.kind) is FaultKind.VALIDATION:
                return _invalid(
                    ["body", fault.field or "image_size"], fault.message or "invalid value", "value_error"
                )
        job = self._new_job(endpoint, entry.body, fault)
        base = f"{self.base_url}/{job.app}/requests/{job.id}"
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": job.id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": 0,
            }
        )

    def _new_job(self, endpoint: str, body: dict[str, Any], fault: Fault | None) -> FalJob:
        default_size, distilled = ENDPOINTS[endpoint]
        queue_s, run_s = self._durations()
        seed = body.get("seed")
        width, height = PRESETS[default_size]
        job = FalJob(
            id=str(uuid.uuid4()),
            endpoint=endpoint,
            app="/".join(endpoint.split("/")[:2]),
            input=body,
            created=time.monotonic(),
            queue_s=queue_s,
            run_s=run_s,
            fault=fault,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else self._random_seed(),
            width=width,
            height=height,
            n=1,
            fmt="png",
            refs=0,
            steps=8 if distilled else 28,
        )
        job.error = _validate(job, body, endpoint.endswith("/edit"), distilled)
        if fault is not None and FaultKind(fault.kind) is FaultKind.VALIDATION:
            job.error = _invalid_body(
                ["body", fault.field or "image_size"], fault.message or "invalid value", "value_error"
            )
        with self._lock:
            self.jobs[job.id] = job
        return job

    def _find(self, request: Request) -> FalJob | None:
        app = f"{request.path_params['owner']}/{request.path_params['app']}"
        job = self.jobs.get(request.path_params["rid"])
        return job if job is not None and job.app == app else None

    async def status(self, request: Request) -> Any:
        await self.record(request)
        checked = self._status_request(request)
        if isinstance(checked, Response):
            return checked
        job, with_logs = checked
        if job.fault is not None and job.fault.stage == "status":
            return await self.fault_response(job.fault)
        body, status = self._status_body(job, time.monotonic(), with_logs)
        return JSONResponse(body, status)

    def _status_request(self, request: Request) -> Response | tuple[FalJob, bool]:
        """The job and whether logs were asked for, or the error answer."""
        if (denied := self._authorised(request)) is not None:
            return denied
        logs_flag = request.query_params.get("logs", "0").lower()
        if logs_flag not in _LOGS_VALUES:
            return JSONResponse({"detail": f"invalid logs value {logs_flag!r}"}, 422)
        job = self._find(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        return job, logs_flag in ("1", "true")

    def _status_body(self, job: FalJob, now: float, with_logs: bool) -> tuple[dict[str, Any], int]:
        """The status body at `now` and its HTTP status (202 pending, 200 completed)."""
        state = job.state(now)
        response_url = f"{self.base_url}/{job.app}/requests/{job.id}"
        if state == "IN_QUEUE":
            return {"status": state, "queue_position": 0, "response_url": response_url}, 202
        if state == "IN_PROGRESS":
            logs = [_log(progress_line(_fraction(job, now), job.steps))] if with_logs else None
            return {"status": state, "logs": logs, "response_url": response_url}, 202
        body: dict[str, Any] = {
            "status": "COMPLETED",
            "logs": [_log(progress_line(1.0, job.steps))] if with_logs else None,
            "metrics": {"inference_time": round(job.run_s, 4)},
            "response_url": response_url,
        }
        error = self._outcome_error(job)
        if error is not None:
            body["error"] = error[1].get("detail") if isinstance(error[1].get("detail"), str) else "error"
            body["error_type"] = error[1].get("error_type", "validation_error")
        return body, 200

    async def status_stream(self, request: Request) -> Any:
        await self.record(request)
        if not self.config.status_stream:
            return JSONResponse({"detail": "Not Found"}, 404)
        checked = self._status_request(request)
        if isinstance(checked, Response):
            return checked
        job, with_logs = checked
        fault = job.fault
        if fault is not None and fault.stage in ("status", "stream"):
            kind = FaultKind(fault.kind)
            if fault.stage == "stream" and kind is FaultKind.MALFORMED:
                return StreamingResponse(_malformed_events(), media_type="text/event-stream")
            if not (fault.stage == "stream" and kind is FaultKind.RESET):
                return await self.fault_response(fault)
        return StreamingResponse(
            self._status_events(job, with_logs),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _status_events(self, job: FalJob, with_logs: bool) -> AsyncIterator[str]:
        """One `data:` event per change, sleeping until the next one (or a cancel) in between."""
        wake = asyncio.Event()
        self._watchers.setdefault(job.id, set()).add(wake)
        breaks = job.fault is not None and job.fault.stage == "stream"  # RESET after the first event
        keepalive = max(0.01, self.config.stream_keepalive_s)
        try:
            sent: tuple[str, int] | None = None
            last_write = time.monotonic()
            while not self._stopping:
                now = time.monotonic()
                body, _ = self._status_body(job, now, with_logs)
                state = body["status"]
                step = _step(job, now) if with_logs and state == "IN_PROGRESS" else 0
                if (
                    sent is None
                    or state != sent[0]
                    or (step != sent[1] and now - last_write >= STREAM_LOG_INTERVAL_S)
                ):
                    yield f"data: {json.dumps(body)}\n\n"
                    sent, last_write = (state, step), now
                    if state == "COMPLETED":
                        return
                    if breaks:
                        await asyncio.sleep(0.01)  # let the event reach the client first
                        raise EmulatedReset
                elif now - last_write >= keepalive:
                    yield ": keepalive\n\n"
                    last_write = now
                wake_at = min(last_write + keepalive, self._next_change(job, now, with_logs, last_write))
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    # +1 ms: never wake a hair before the transition and spin once more.
                    await asyncio.wait_for(wake.wait(), max(0.0, wake_at - now) + 0.001)
        finally:
            watchers = self._watchers.get(job.id)
            if watchers is not None:
                watchers.discard(wake)

    @staticmethod
    def _next_change(job: FalJob, now: float, with_logs: bool, last_write: float) -> float:
        """When the status body next changes in a way the stream reports."""
        started = job.created + job.queue_s
        if now < started:
            return started
        if with_logs and job.run_s > 0 and job.steps > 0:
            next_step = started + job.run_s * (_step(job, now) + 1) / job.steps
            return min(job.done_at, max(next_step, last_write + STREAM_LOG_INTERVAL_S))
        return job.done_at

    def _outcome_error(self, job: FalJob) -> tuple[int, dict[str, Any]] | None:
        """The error the result call will return, if any."""
        if job.cancelled:
            return 499, {"detail": "Request cancelled by the client", "error_type": "client_cancelled"}
        if job.error is not None:
            return job.error
        if job.kind() is FaultKind.FAILED:
            return 500, {"detail": "Runner failed", "error_type": "runner_server_error"}
        return None

    async def result(self, request: Request) -> Any:
        await self.record(request)
        if (denied := self._authorised(request)) is not None:
            return denied
        job = self._find(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if job.state(time.monotonic()) != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, 400)
        if job.fault is not None and job.fault.stage == "result" and FaultKind(job.fault.kind) in HTTP_KINDS:
            return await self.fault_response(job.fault)
        error = self._outcome_error(job)
        if error is not None:
            status, body = error
            headers = {"x-fal-error-type": str(body["error_type"])} if "error_type" in body else {}
            return JSONResponse(body, status, headers=headers)
        return JSONResponse(self._output(job))

    def _output(self, job: FalJob) -> dict[str, Any]:
        kind = job.kind()
        sync = job.input.get("sync_mode") is True
        images = []
        for i in range(job.n):
            colour = (0, 0, 0) if kind is FaultKind.SAFETY else seed_colour(job.seed + i)
            if sync:
                url = data_uri(render_image(job.width, job.height, job.fmt, colour), job.fmt)
            else:
                url = self.publish(CdnObject(job.width, job.height, job.fmt, colour, job.fault))
            images.append(
                {
                    "url": url,
                    "content_type": f"image/{job.fmt}",
                    "file_name": f"{job.id}-{i}.{'jpg' if job.fmt == 'jpeg' else job.fmt}",
                    "width": job.width,
                    "height": job.height,
                }
            )
        prompt = str(job.input.get("prompt", ""))
        if job.input.get("enable_prompt_expansion") is True:
            prompt = f"{prompt}, rendered in rich detail with soft cinematic light"
        output: dict[str, Any] = {
            "images": images,
            "seed": job.seed,
            "has_nsfw_concepts": [kind is FaultKind.SAFETY] * job.n,
            "prompt": prompt,
            "timings": {"inference": round(job.run_s, 4)},
        }
        if kind is FaultKind.MISSING_IMAGES:
            del output["images"]
        return output

    async def cancel(self, request: Request) -> Any:
        await self.record(request)
        if (denied := self._authorised(request)) is not None:
            return denied
        job = self._find(request)
        if job is None:
            return JSONResponse({"status": "NOT_FOUND"}, 404)
        now = time.monotonic()
        with self._lock:
            cancelled = job.cancelled_at is None and now < job.done_at
            if cancelled:
                job.cancelled_at = now
        if not cancelled:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        for wake in self._watchers.get(job.id, ()):
            wake.set()  # open status streams report the cancelled completion at once
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    # -- billing ---------------------------------------------------------------------------------

    def _billing(self, now: float) -> Iterable[BillingEntry]:
        for job in self.jobs.values():
            if job.cancelled or now < job.done_at or job.error is not None:
                continue
            if job.kind() is FaultKind.FAILED:
                continue  # fal does not bill 5xx failures
            megapixels = job.n * billed_megapixels(job.width, job.height) + job.refs  # refs: 1 MP each
            yield BillingEntry(
                request_id=job.id,
                endpoint=job.endpoint,
                images=job.n,
                megapixels=megapixels,
                usd=round(megapixels * self.price(job.endpoint), 6),
                completed_at=job.done_at,
            )


def _fraction(job: FalJob, now: float) -> float:
    return (now - job.created - job.queue_s) / job.run_s if job.run_s else 1.0


def _step(job: FalJob, now: float) -> int:
    """The progress step the logs show at `now` (as `progress_line` computes it)."""
    return max(0, min(job.steps, int(_fraction(job, now) * job.steps)))


async def _malformed_events() -> AsyncIterator[str]:
    yield 'data: {"status": "IN_\n\n'


def _log(message: str) -> dict[str, str]:
    return {"message": message, "level": "INFO", "source": "USER", "timestamp": now_iso()}


def _invalid_body(loc: list[Any], msg: str, kind: str) -> tuple[int, dict[str, Any]]:
    return 422, {
        "detail": [
            {"loc": loc, "msg": msg, "type": kind, "url": f"https://docs.fal.ai/errors/#{kind}", "ctx": {}}
        ]
    }


def _invalid(loc: list[Any], msg: str, kind: str) -> Response:
    status, body = _invalid_body(loc, msg, kind)
    return JSONResponse(body, status)


def _validate(
    job: FalJob, body: dict[str, Any], edit: bool, distilled: bool
) -> tuple[int, dict[str, Any]] | None:
    """Check the input like fal's schema does; fill in the job's size, n, format. Returns the error."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return _invalid_body(["body", "prompt"], "Field required", "missing")
    size = body.get("image_size")
    if isinstance(size, str):
        if size not in PRESETS:
            return _invalid_body(["body", "image_size"], f"unknown preset {size!r}", "enum")
        job.width, job.height = PRESETS[size]
    elif isinstance(size, dict):
        w, h = size.get("width"), size.get("height")
        if not isinstance(w, int) or not isinstance(h, int):
            return _invalid_body(["body", "image_size"], "width and height must be integers", "int_type")
        if max(w, h) > 2048:
            return _invalid_body(["body", "image_size"], "Image size must be at most 2048", "image_too_large")
        if min(w, h) < 512:
            return _invalid_body(["body", "image_size"], "Image size must be at least 512", "image_too_small")
        # The latent grid is 16 px.
        job.width, job.height = (max(512, round(v / 16) * 16) for v in (w, h))
    elif size is not None:
        return _invalid_body(["body", "image_size"], "invalid image_size", "type_error")
    n = body.get("num_images", 1)
    if not isinstance(n, int) or not 1 <= n <= 4:
        return _invalid_body(["body", "num_images"], "Input should be between 1 and 4", "less_than_equal")
    job.n = n
    fmt = body.get("output_format", "png")
    if fmt not in ("png", "jpeg", "webp"):
        return _invalid_body(["body", "output_format"], "Input should be 'jpeg', 'png' or 'webp'", "enum")
    job.fmt = fmt
    guidance = body.get("guidance_scale", 2.5)
    if not isinstance(guidance, int | float) or not 0 <= guidance <= 20:
        return _invalid_body(
            ["body", "guidance_scale"], "Input should be between 0 and 20", "less_than_equal"
        )
    if not distilled:
        steps = body.get("num_inference_steps", 28)
        if not isinstance(steps, int) or not 4 <= steps <= 50:
            return _invalid_body(["body", "num_inference_steps"], "Input should be between 4 and 50", "range")
        job.steps = steps
        if body.get("acceleration", "regular") not in ("none", "regular", "high"):
            return _invalid_body(
                ["body", "acceleration"], "Input should be 'none', 'regular' or 'high'", "enum"
            )
    if edit:
        urls = body.get("image_urls")
        if not isinstance(urls, list) or not urls:
            return _invalid_body(["body", "image_urls"], "Field required", "missing")
        for i, url in enumerate(urls):
            if decode_image_uri(url) is None:
                return _invalid_body(
                    ["body", "image_urls", i], "Could not load the image", "file_download_error"
                )
        job.refs = min(4, len(urls))  # fal uses the first 4
    return None
