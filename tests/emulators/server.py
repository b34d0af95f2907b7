"""Shared emulator machinery: a uvicorn server thread, latency and fault models, recording, billing.

An emulator is a real HTTP server on a free loopback port. Its state advances with the clock, not
with background tasks: each request gets its phase durations when it is submitted, and every
answer is computed from how much time has passed. That keeps the emulators deterministic enough
to test against, and cheap enough to run thousands of requests in a benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import colorsys
import hashlib
import io
import json
import logging
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

# ---------------------------------------------------------------------------------------------
# Latency


@dataclass(frozen=True)
class Latency:
    """A phase duration in seconds: lognormal with median `p50` and 95th percentile `p95`.

    `p95=None` (or p95 <= p50) makes it a fixed `p50`.
    """

    p50: float
    p95: float | None = None

    def sample(self, rng: random.Random) -> float:
        if self.p95 is None or self.p95 <= self.p50 or self.p50 <= 0:
            return max(0.0, self.p50)
        sigma = math.log(self.p95 / self.p50) / 1.6448536269514722  # z of the 95th percentile
        return rng.lognormvariate(math.log(self.p50), sigma)


# A duration: seconds, a Latency, or any callable drawing seconds from the emulator's RNG.
LatencyLike = float | Latency | Callable[[random.Random], float]


def sample(latency: LatencyLike, rng: random.Random) -> float:
    if isinstance(latency, Latency):
        return latency.sample(rng)
    if callable(latency):
        return max(0.0, float(latency(rng)))
    return max(0.0, float(latency))


# ---------------------------------------------------------------------------------------------
# Faults


class FaultKind(StrEnum):
    """What can go wrong. HTTP-level kinds strike at a stage; outcome kinds shape the result."""

    SERVER_ERROR = "server_error"  # HTTP 500
    UNAVAILABLE = "unavailable"  # HTTP 503
    RATE_LIMITED = "rate_limited"  # HTTP 429, Retry-After: Fault.retry_after (None: no header)
    HANG = "hang"  # no answer for EmulatorConfig.hang_s: the client's timeout fires
    RESET = "reset"  # headers sent, then the connection is dropped mid-body
    MALFORMED = "malformed"  # 200 with a body that is not JSON (or not an image, on download)
    VALIDATION = "validation"  # 422 naming Fault.field
    MISSING_IMAGES = "missing_images"  # completes without images
    SAFETY = "safety"  # fal: black images + has_nsfw_concepts; Replicate: failed with an NSFW error
    FAILED = "failed"  # the model fails (fal: 500 runner error at result; Replicate: status failed)
    ABORTED = "aborted"  # Replicate: status aborted before starting


HTTP_KINDS = frozenset(
    {
        FaultKind.SERVER_ERROR,
        FaultKind.UNAVAILABLE,
        FaultKind.RATE_LIMITED,
        FaultKind.HANG,
        FaultKind.RESET,
        FaultKind.MALFORMED,
    }
)

# Where a fault strikes: "submit" (fal submit / Replicate create), "status" (every status poll of
# the request, and opening fal's status stream), "result" (fal result fetch), "download" (the image
# CDN), "stream" (fal's status stream only: an HTTP answer when opening it, or for RESET a
# connection dropped after the first event; plain status polls are unaffected).
STAGES = ("submit", "status", "result", "download", "stream")


@dataclass(frozen=True)
class Fault:
    """One fault. `at` defaults to "submit" for HTTP-level kinds (the outcome kinds need none)."""

    kind: FaultKind | str
    at: str | None = None
    retry_after: float | None = 1.0  # RATE_LIMITED: Retry-After seconds; None sends no header
    field: str | None = None  # VALIDATION: the input field blamed (default: the size field)
    message: str | None = None

    @property
    def stage(self) -> str:
        if self.at is not None:
            if self.at not in STAGES:
                raise ValueError(f"unknown stage {self.at!r}; one of {STAGES}")
            return self.at
        return "submit" if FaultKind(self.kind) in HTTP_KINDS else "result"


@dataclass
class EmulatorConfig:
    """Everything tunable. Mutate `emulator.config` fields directly, or pass one to the constructor.

    Durations are multiplied by `time_scale`. A request gets, in order: the next scripted fault
    (`Emulator.script`), else with probability `failure_rate` one drawn from `failure_kinds`.
    """

    queue: LatencyLike = 0.0  # seconds queued (fal IN_QUEUE / Replicate starting)
    run: LatencyLike = 0.05  # seconds generating (fal IN_PROGRESS / Replicate processing)
    time_scale: float = 1.0
    failure_rate: float = 0.0
    failure_kinds: tuple[Fault, ...] = (Fault(FaultKind.SERVER_ERROR),)
    hang_s: float = 30.0  # how long a HANG fault holds the connection (not scaled)
    seed: int | None = None  # RNG seed for latencies and failure draws
    price_per_mp: Mapping[str, float] | None = None  # USD per megapixel by endpoint/model; None: defaults
    status_stream: bool = True  # fal: serve GET …/status/stream (SSE); False answers 404
    stream_keepalive_s: float = 2.0  # fal: a keepalive comment when the stream was quiet this long
    # Download-guard tests: result URLs point at this origin instead of the emulator's own (e.g.
    # "https://169.254.169.254"), and the CDN answers each image with a 302 to `cdn_redirect`
    # ("{self}" in it is replaced by the image's own URL with ?hop=1, which is then served).
    cdn_base: str | None = None
    cdn_redirect: str | None = None


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, raw bytes when not JSON, None when empty
    at: float  # time.monotonic()


@dataclass(frozen=True)
class BillingEntry:
    """A request the provider would charge for: it ran to completion and was not cancelled first."""

    request_id: str
    endpoint: str  # fal endpoint id or Replicate model
    images: int
    megapixels: float  # billed megapixels (providers round up per image; fal adds references)
    usd: float
    completed_at: float  # time.monotonic()


# ---------------------------------------------------------------------------------------------
# Images


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A bright colour derived from `seed`, far from black, so tests can read the seed back."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


_PIL = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def render_image(width: int, height: int, fmt: str, colour: tuple[int, int, int]) -> bytes:
    """A solid image of `colour` encoded as png / jpeg / webp."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, _PIL[fmt])
    return buf.getvalue()


def data_uri(data: bytes, fmt: str) -> str:
    return f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def decode_image_uri(value: object) -> tuple[int, int] | None:
    """The size of a data: URI image, None when it is not a decodable image; http(s) -> (0, 0)."""
    if not isinstance(value, str):
        return None
    if value.startswith(("http://", "https://")):
        return (0, 0)
    if not value.startswith("data:image/") or ";base64," not in value:
        return None
    try:
        raw = base64.b64decode(value.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
            return im.size
    except Exception:
        return None


@dataclass(frozen=True)
class CdnObject:
    width: int
    height: int
    fmt: str
    colour: tuple[int, int, int]
    fault: Fault | None = None


# ---------------------------------------------------------------------------------------------
# Responses for faults


class EmulatedReset(Exception):
    """Raised inside the app to make uvicorn drop the connection mid-response."""


class _ResetResponse:
    """Starts a response promising 1000 bytes, sends a few, then fails: uvicorn closes the socket."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status": "IN_', "more_body": True})
        raise EmulatedReset


class _QuietResets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], EmulatedReset))


logging.getLogger("uvicorn.error").addFilter(_QuietResets())


# ---------------------------------------------------------------------------------------------
# Server


class EmulatorServer:
    """Serves an ASGI app with uvicorn on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app: Callable[..., Any], *, log_level: str = "warning") -> None:
        self._app = app
        self._log_level = log_level
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the emulator is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level=self._log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"emulator:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the emulator server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
        self.port = 0


class Emulator:
    """Base of the provider emulators: config, fault script, request log, CDN, billing ledger.

    Use as a context manager (or start()/stop()); read `base_url`, `requests`, `ledger`.
    """

    default_prices: Mapping[str, float] = {}

    def __init__(self, config: EmulatorConfig | None = None, *, log_level: str = "warning") -> None:
        self.config = config or EmulatorConfig()
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._script: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._cdn: dict[str, CdnObject] = {}
        self._stopping = False
        self.app = Starlette(routes=self.routes())
        self.server = EmulatorServer(self.app, log_level=log_level)

    # -- lifecycle -----------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    def start(self) -> Self:
        self._stopping = False
        self.server.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def reset(self, config: EmulatorConfig | None = None) -> None:
        """Forget every request, fault and job; optionally install a new config."""
        with self._lock:
            if config is not None:
                self.config = config
            self._rng = random.Random(self.config.seed)
            self._script.clear()
            self._requests.clear()
            self._cdn.clear()
            self._reset_jobs()

    def _reset_jobs(self) -> None:
        raise NotImplementedError

    # -- faults --------------------------------------------------------------------------------

    def script(self, *faults: Fault | FaultKind | str) -> None:
        """Queue faults for the next submissions, one per submission, in order."""
        with self._lock:
            self._script.extend(f if isinstance(f, Fault) else Fault(FaultKind(f)) for f in faults)

    def _draw_fault(self) -> Fault | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self.config.failure_rate > 0 and self._rng.random() < self.config.failure_rate:
                return self._rng.choice(self.config.failure_kinds)
            return None

    def _durations(self) -> tuple[float, float]:
        with self._lock:
            scale = self.config.time_scale
            return sample(self.config.queue, self._rng) * scale, sample(self.config.run, self._rng) * scale

    def _random_seed(self) -> int:
        with self._lock:
            return self._rng.randrange(2**31)

    def price(self, endpoint: str) -> float:
        prices = self.config.price_per_mp if self.config.price_per_mp is not None else self.default_prices
        return prices.get(endpoint, 0.0)

    async def fault_response(self, fault: Fault, *, error_type: str | None = None) -> Any:
        """The HTTP-level answer for `fault` (hangs first for HANG)."""
        kind = FaultKind(fault.kind)
        if kind is FaultKind.HANG:
            end = time.monotonic() + self.config.hang_s
            # Polled, not an asyncio.Event: stop() runs on another thread and event loop.
            while time.monotonic() < end and not self._stopping:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            return JSONResponse({"detail": "hung request released"}, status_code=504)
        if kind is FaultKind.RESET:
            return _ResetResponse()
        if kind is FaultKind.MALFORMED:
            return Response(b'{"status": "IN_PROGRESS", "request_', media_type="application/json")
        if kind is FaultKind.RATE_LIMITED:
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return self.rate_limited_response(fault, headers)
        status = 503 if kind is FaultKind.UNAVAILABLE else 500
        return self.error_response(status, fault.message or f"emulated {kind.value}", error_type)

    def rate_limited_response(self, fault: Fault, headers: dict[str, str]) -> Response:
        return JSONResponse({"detail": fault.message or "Rate limit exceeded"}, 429, headers=headers)

    def error_response(self, status: int, message: str, error_type: str | None) -> Response:
        return JSONResponse({"detail": message}, status)

    # -- recording -----------------------------------------------------------------------------

    async def record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        entry = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(entry)
        return entry

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str, path_suffix: str = "") -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    @property
    def ledger(self) -> list[BillingEntry]:
        """What the provider would bill so far."""
        now = time.monotonic()
        with self._lock:
            return sorted(self._billing(now), key=lambda e: e.completed_at)

    def _billing(self, now: float) -> Iterable[BillingEntry]:
        raise NotImplementedError

    # -- CDN -----------------------------------------------------------------------------------

    def publish(self, obj: CdnObject) -> str:
        """Register an image with the emulator's CDN; returns its absolute URL."""
        key = f"{self._random_seed():08x}{len(self._cdn):04x}"
        with self._lock:
            self._cdn[key] = obj
        base = (self.config.cdn_base or self.base_url).rstrip("/")
        return f"{base}/cdn/{key}.{'jpg' if obj.fmt == 'jpeg' else obj.fmt}"

    async def cdn(self, request: Request) -> Any:
        await self.record(request)
        key = request.path_params["name"].rsplit(".", 1)[0]
        with self._lock:
            obj = self._cdn.get(key)
        if obj is None:
            return Response(b"not found", 404)
        if self.config.cdn_redirect and "hop" not in request.query_params:
            own = f"{self.base_url}{request.url.path}?hop=1"
            return Response(
                status_code=302, headers={"location": self.config.cdn_redirect.replace("{self}", own)}
            )
        if obj.fault is not None and obj.fault.stage == "download":
            if FaultKind(obj.fault.kind) is FaultKind.MALFORMED:
                return Response(b"<html>not an image</html>", media_type=MIME[obj.fmt])
            return await self.fault_response(obj.fault)
        data = render_image(obj.width, obj.height, obj.fmt, obj.colour)
        return Response(data, media_type=MIME[obj.fmt])


def billed_megapixels(width: int, height: int) -> int:
    """Providers round each image up to whole megapixels (1 MP = 1024 x 1024)."""
    return max(1, math.ceil(width * height / (1024 * 1024)))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def progress_line(fraction: float, steps: int) -> str:
    """A tqdm-style progress bar line like the runners print."""
    step = max(0, min(steps, int(fraction * steps)))
    bar = "█" * (step * 10 // steps)
    return f"{step * 100 // steps:3d}%|{bar:<10}| {step}/{steps} [00:01<00:01,  5.00it/s]"


__all__ = [
    "STAGES",
    "BillingEntry",
    "CdnObject",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "Fault",
    "FaultKind",
    "Latency",
    "LatencyLike",
    "RecordedRequest",
    "billed_megapixels",
    "data_uri",
    "decode_image_uri",
    "render_image",
    "seed_colour",
]
