"""A Replicate predictions API emulator for black-forest-labs/flux-2-dev (providers.md §4, §6).

Routes (all under `base_url`, which stands for https://api.replicate.com):

- `POST /v1/models/{owner}/{name}/predictions` create: 201 and the prediction; honours `Prefer: wait[=N]`
  (answering `Preference-Applied`) and `Cancel-After`
- `POST /v1/predictions` create with `"version": "owner/name"` (or a version id of a known model)
- `GET /v1/predictions/{id}` the prediction
- `POST /v1/predictions/{id}/cancel` cancel; returns the prediction
- `GET /cdn/{name}` output files (stands for https://replicate.delivery)

Statuses: starting (queue phase) -> processing (run phase) -> succeeded | failed | canceled | aborted.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tests.emulators.server import (
    HTTP_KINDS,
    BillingEntry,
    CdnObject,
    Emulator,
    EmulatorConfig,
    Fault,
    FaultKind,
    billed_megapixels,
    decode_image_uri,
    now_iso,
    progress_line,
    seed_colour,
)

MODEL = "black-forest-labs/flux-2-dev"
VERSION = "7bba46bdde863cfd7aaee87649a5aa49f39f368495dbea500998d1fcbb262050"
ASPECT_RATIOS = {
    "1:1": (1, 1),
    "16:9": (16, 9),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "9:16": (9, 16),
    "3:4": (3, 4),
    "4:3": (4, 3),
}
FORMATS = {"webp": "webp", "jpg": "jpeg", "png": "png"}
PRICES = {MODEL: 0.012}  # unconfirmed (providers.md §8): set EmulatorConfig.price_per_mp for benchmarks
NSFW_ERROR = "NSFW content detected in the generated image. Try running it again, or try a different prompt."
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")


def enum_size(ratio: str, first_image: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ~1 MP size, at multiples of 32, that an aspect_ratio enum value produces."""
    if ratio == "match_input_image":
        rw, rh = first_image if first_image and first_image[0] and first_image[1] else (1, 1)
    else:
        rw, rh = ASPECT_RATIOS[ratio]
    width = math.sqrt(1024 * 1024 * rw / rh)
    height = width * rh / rw
    return max(256, round(width / 32) * 32), max(256, round(height / 32) * 32)


@dataclass
class Prediction:
    """One prediction; its status follows from the clock."""

    id: str
    model: str
    input: dict[str, Any]
    created: float
    created_at: str
    queue_s: float
    run_s: float
    fault: Fault | None
    seed: int
    width: int
    height: int
    fmt: str
    deadline: float | None = None  # Cancel-After, absolute monotonic time
    cancelled_at: float | None = None
    output_url: str | None = None

    @property
    def done_at(self) -> float:
        return self.created + self.queue_s + self.run_s

    @property
    def started_at(self) -> float:
        return self.created + self.queue_s

    def kind(self) -> FaultKind | None:
        return FaultKind(self.fault.kind) if self.fault is not None else None

    def stopped_at(self) -> float | None:
        """When a cancel or the deadline stopped it before completion."""
        times = [t for t in (self.cancelled_at, self.deadline) if t is not None and t < self.done_at]
        return min(times) if times else None

    def status(self, now: float) -> str:
        stopped = self.stopped_at()
        if stopped is not None and now >= stopped:
            return "aborted" if stopped < self.started_at else "canceled"
        if self.kind() is FaultKind.ABORTED and now >= self.started_at:
            return "aborted"
        if now < self.started_at:
            return "starting"
        if now < self.done_at:
            return "processing"
        if self.kind() in (FaultKind.FAILED, FaultKind.SAFETY):
            return "failed"
        return "succeeded"


class ReplicateEmulator(Emulator):
    """Emulates api.replicate.com for black-forest-labs/flux-2-dev. `token` is the accepted API token."""

    default_prices = PRICES

    def __init__(
        self, config: EmulatorConfig | None = None, *, token: str = "test-token", log_level: str = "warning"
    ) -> None:
        self.token = token
        self.predictions: dict[str, Prediction] = {}
        super().__init__(config, log_level=log_level)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/cdn/{name}", self.cdn, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/predictions", self.create_for_model, methods=["POST"]),
            Route("/v1/predictions", self.create_with_version, methods=["POST"]),
            Route("/v1/predictions/{pid}", self.get, methods=["GET"]),
            Route("/v1/predictions/{pid}/cancel", self.cancel, methods=["POST"]),
        ]

    def _reset_jobs(self) -> None:
        self.predictions.clear()

    def error_response(self, status: int, message: str, error_type: str | None) -> Response:
        return _problem(status, "Internal Server Error" if status == 500 else "Service Unavailable", message)

    def rate_limited_response(self, fault: Fault, headers: dict[str, str]) -> Response:
        wait = 30 if fault.retry_after is None else math.ceil(fault.retry_after)
        detail = fault.message or f"Request was throttled. Your rate limit resets in ~{wait}s."
        return JSONResponse(
            {"detail": detail, "status": 429, "title": "Too Many Requests"}, 429, headers=headers
        )

    # -- handlers --------------------------------------------------------------------------------

    def _authorised(self, request: Request) -> Response | None:
        if request.headers.get("authorization") not in (f"Bearer {self.token}", f"Token {self.token}"):
            return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        return None

    async def create_for_model(self, request: Request) -> Any:
        entry = await self.record(request)
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        return await self._create(request, model, entry.body)

    async def create_with_version(self, request: Request) -> Any:
        entry = await self.record(request)
        version = entry.body.get("version") if isinstance(entry.body, dict) else None
        model = MODEL if version in (MODEL, VERSION, f"{MODEL}:{VERSION}") else str(version)
        return await self._create(request, model, entry.body)

    async def _create(self, request: Request, model: str, body: Any) -> Any:
        if (denied := self._authorised(request)) is not None:
            return denied
        if model != MODEL:
            return _problem(404, "Not found", f"Model {model} not found")
        wait = _prefer_wait(request.headers.get("prefer"))
        if wait == -1:
            return _problem(400, "Bad request", "Invalid Prefer header: use wait or wait=1..60")
        deadline = _duration(request.headers.get("cancel-after"))
        if deadline == -1:
            return _problem(400, "Bad request", "Invalid Cancel-After duration")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return _invalid("input", "input is required")
        fault = self._draw_fault()
        # Replicate validates the input at create, so a VALIDATION fault strikes here at any stage.
        if fault is not None and FaultKind(fault.kind) is FaultKind.VALIDATION:
            return _invalid(fault.field or "aspect_ratio", fault.message or "invalid value")
        if fault is not None and fault.stage == "submit" and FaultKind(fault.kind) in HTTP_KINDS:
            return await self.fault_response(fault)
        prediction_or_error = self._new_prediction(model, body["input"], fault, deadline)
        if isinstance(prediction_or_error, Response):
            return prediction_or_error
        prediction = prediction_or_error
        headers = {"location": self._url(prediction)}
        if wait:
            headers["preference-applied"] = f"wait={wait}"
            end = time.monotonic() + wait
            while time.monotonic() < end and not self._stopping:
                if prediction.status(time.monotonic()) in TERMINAL:
                    break
                await asyncio.sleep(0.005)
        return JSONResponse(self._json(prediction), 201, headers=headers)

    def _new_prediction(
        self, model: str, inp: dict[str, Any], fault: Fault | None, deadline: float | None
    ) -> Prediction | Response:
        error = _validate(inp)
        if error is not None:
            return error
        fmt = FORMATS[inp.get("output_format", "webp")]
        ratio = inp.get("aspect_ratio", "1:1")
        if ratio == "custom":
            width, height = (round(inp[k] / 32) * 32 for k in ("width", "height"))
        else:
            images = inp.get("input_images") or []
            width, height = enum_size(ratio, decode_image_uri(images[0]) if images else None)
        seed = inp.get("seed")
        queue_s, run_s = self._durations()
        now = time.monotonic()
        prediction = Prediction(
            id=uuid.uuid4().hex[:26],
            model=model,
            input=inp,
            created=now,
            created_at=now_iso(),
            queue_s=queue_s,
            run_s=run_s,
            fault=fault,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else self._random_seed(),
            width=width,
            height=height,
            fmt=fmt,
            deadline=None if deadline is None else now + deadline,
        )
        with self._lock:
            self.predictions[prediction.id] = prediction
        return prediction

    def _url(self, p: Prediction) -> str:
        return f"{self.base_url}/v1/predictions/{p.id}"

    def _json(self, p: Prediction) -> dict[str, Any]:
        now = time.monotonic()
        status = p.status(now)
        logs = ""
        if status != "starting" and status != "aborted":
            fraction = 1.0 if status in TERMINAL else (now - p.started_at) / p.run_s if p.run_s else 1.0
            logs = f"Using seed: {p.seed}\n{progress_line(fraction, 28)}\n"
        output: str | None = None
        error: str | None = None
        if status == "succeeded" and p.kind() is not FaultKind.MISSING_IMAGES:
            if p.output_url is None:
                p.output_url = self.publish(CdnObject(p.width, p.height, p.fmt, seed_colour(p.seed), p.fault))
            output = p.output_url
        elif status == "failed":
            error = (
                NSFW_ERROR
                if p.kind() is FaultKind.SAFETY
                else (p.fault.message if p.fault else None)
                or ("CUDA error: an illegal memory access was encountered")
            )
        terminal = status in TERMINAL
        body: dict[str, Any] = {
            "id": p.id,
            "model": p.model,
            "version": VERSION,
            "input": p.input,
            "logs": logs,
            "output": output,
            "data_removed": False,
            "error": error,
            "status": status,
            "created_at": p.created_at,
            "started_at": None if status in ("starting", "aborted") else p.created_at,
            "completed_at": now_iso() if terminal else None,
            "urls": {
                "get": self._url(p),
                "cancel": f"{self._url(p)}/cancel",
                "stream": f"{self.base_url}/stream/{p.id}",
                "web": f"https://replicate.com/p/{p.id}",
            },
        }
        if status == "succeeded":
            body["metrics"] = {"predict_time": round(p.run_s, 4), "total_time": round(p.run_s + p.queue_s, 4)}
        return body

    async def get(self, request: Request) -> Any:
        await self.record(request)
        if (denied := self._authorised(request)) is not None:
            return denied
        p = self.predictions.get(request.path_params["pid"])
        if p is None:
            return _problem(404, "Not found", "Prediction not found")
        if p.fault is not None and FaultKind(p.fault.kind) in HTTP_KINDS:
            stage = p.fault.stage
            terminal = p.status(time.monotonic()) in TERMINAL
            if stage == "status" or (stage == "result" and terminal):
                return await self.fault_response(p.fault)
        return JSONResponse(self._json(p))

    async def cancel(self, request: Request) -> Any:
        await self.record(request)
        if (denied := self._authorised(request)) is not None:
            return denied
        p = self.predictions.get(request.path_params["pid"])
        if p is None:
            return _problem(404, "Not found", "Prediction not found")
        now = time.monotonic()
        with self._lock:
            if p.status(now) not in TERMINAL:
                p.cancelled_at = now
        return JSONResponse(self._json(p))

    # -- billing ---------------------------------------------------------------------------------

    def _billing(self, now: float) -> Iterable[BillingEntry]:
        for p in self.predictions.values():
            if now < p.done_at or p.stopped_at() is not None:
                continue
            if p.kind() in (FaultKind.FAILED, FaultKind.ABORTED):
                continue  # aborted is never charged; emulated runner crashes are not either
            megapixels = billed_megapixels(p.width, p.height)
            yield BillingEntry(
                request_id=p.id,
                endpoint=p.model,
                images=1,
                megapixels=megapixels,
                usd=round(megapixels * self.price(p.model), 6),
                completed_at=p.done_at,
            )


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"type": None, "title": title, "status": status, "detail": detail, **extra}, status)


def _invalid(name: str, description: str) -> JSONResponse:
    return _problem(
        422,
        "Input validation failed",
        f"- input.{name}: {description}\n",
        invalid_fields=[{"type": "invalid", "field": f"input.{name}", "description": description}],
    )


def _validate(inp: dict[str, Any]) -> JSONResponse | None:
    """The flux-2-dev input schema (version 7bba46bd); unknown fields are accepted and ignored."""
    if not isinstance(inp.get("prompt"), str) or not inp["prompt"]:
        return _invalid("prompt", "prompt is required")
    ratio = inp.get("aspect_ratio", "1:1")
    if ratio not in (*ASPECT_RATIOS, "custom", "match_input_image"):
        return _invalid(
            "aspect_ratio", "aspect_ratio must be one of the following: " + ", ".join(ASPECT_RATIOS)
        )
    if ratio == "custom":
        for side in ("width", "height"):
            value = inp.get(side)
            if not isinstance(value, int):
                return _invalid(side, f"{side} is required when aspect_ratio is custom")
            if not 256 <= value <= 1440:
                return _invalid(side, "Must be between 256 and 1440")
    images = inp.get("input_images", [])
    if not isinstance(images, list) or len(images) > 4:
        return _invalid("input_images", "At most 4 input images")
    for image in images:
        if decode_image_uri(image) is None:
            return _invalid("input_images", "Does not match format 'uri' or is not an image")
    if inp.get("output_format", "webp") not in FORMATS:
        return _invalid("output_format", "output_format must be one of the following: webp, jpg, png")
    quality = inp.get("output_quality", 80)
    if not isinstance(quality, int) or not 0 <= quality <= 100:
        return _invalid("output_quality", "Must be between 0 and 100")
    for flag in ("go_fast", "disable_safety_checker"):
        if not isinstance(inp.get(flag, False), bool):
            return _invalid(flag, "Invalid type. Expected: boolean")
    return None


def _prefer_wait(value: str | None) -> int:
    """Seconds to hold the create call: 0 without the header, -1 when it is malformed."""
    if not value:
        return 0
    match = re.fullmatch(r"\s*wait(?:\s*=\s*(\d+))?\s*", value)
    if not match:
        return -1
    seconds = int(match.group(1) or 60)
    return seconds if 1 <= seconds <= 60 else -1


def _duration(value: str | None) -> float | None:
    """A Cancel-After duration in seconds; None without the header, -1 when malformed."""
    if not value:
        return None
    match = _DURATION.match(value.strip())
    if not match:
        return -1
    number, unit = float(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
