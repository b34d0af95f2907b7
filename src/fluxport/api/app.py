"""App factory: lifespan wiring, request ids, body limit, and the one place errors become JSON."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxport import __version__, web
from fluxport.api import images, metrics, models, usage
from fluxport.api.auth import ApiKeyAuth, KeyAuth
from fluxport.api.idempotency import Idempotency
from fluxport.catalog import MODELS
from fluxport.domain.errors import FluxportError, InvalidRequest, PayloadTooLarge
from fluxport.gateway.service import ImageService
from fluxport.live import LiveState
from fluxport.memory import release_forever
from fluxport.metrics import Metrics
from fluxport.providers.local import LocalProvider
from fluxport.providers.local.warm import warm
from fluxport.providers.registry import build_providers, model_providers
from fluxport.settings import Settings
from fluxport.storage.blobs import open_blob_store
from fluxport.storage.db import Database
from fluxport.storage.repair import repair_on_start, sweep_forever

log = logging.getLogger("fluxport")

MAX_HEADER_BYTES = 64 * 1024


class RequestContext:
    """Pure ASGI middleware: a request id on every response, and a cap on the body size."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_json_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Only multipart bodies carry images; any other (JSON) body is a prompt and parameters.
        self.max_json_bytes = min(max_json_bytes or max_body_bytes, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{secrets.token_hex(12)}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        # httptools sets no limit on header size: refuse what no client of this API needs.
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            too_big = InvalidRequest(
                f"The request headers are larger than {MAX_HEADER_BYTES} bytes.", code="headers_too_large"
            )
            too_big.status = 431
            await error_response(too_big)(scope, receive, send_with_id)
            return

        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit = self.max_body_bytes if multipart else self.max_json_bytes
        what = "request body" if multipart else "request body (not multipart: no images)"
        length = headers.get(b"content-length")
        # Refused before a byte of the body is read.
        if length is not None and length.isdigit() and int(length) > limit:
            err = PayloadTooLarge(f"The {what} is larger than {limit} bytes.")
            await error_response(err)(scope, receive, send_with_id)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body: stop reading at the limit
                    raise PayloadTooLarge(f"The {what} is larger than {limit} bytes.")
            return message

        await self.app(scope, limited_receive, send_with_id)


def error_response(exc: FluxportError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _fluxport_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FluxportError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return error_response(
        InvalidRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    path = request.url.path
    if exc.status_code == 404 and path.endswith("/") and path != "/" and _routed(request, path.rstrip("/")):
        # Relative: a client-supplied Host header never ends up in the Location.
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(path.rstrip("/") + query, status_code=307)
    err = FluxportError(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    err.status = exc.status_code
    err.type = "invalid_request_error"
    if exc.status_code == 404:
        err.message = f"No route for {request.method} {request.url.path}."
    return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))


def _routed(request: Request, path: str) -> bool:
    """True when some route of the app matches `path` (for the request's method)."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = FluxportError("Internal server error.", code="internal_error", headers={"x-should-retry": "false"})
    return error_response(err)


async def _keys_and_idempotency(app: FastAPI, settings: Settings, db: Database) -> None:
    """Key checks and Idempotency-Key answers; on first start with auth on, mint and show a key."""
    app.state.auth = KeyAuth(settings, db, app.state.live.windows)
    # An in-progress Idempotency-Key older than this belongs to a process that died: it gives way.
    app.state.idempotency = Idempotency(db, settings.idempotency_ttl_s, settings.request_deadline_s + 60)
    await db.purge_idempotency()
    if settings.auth == "none":
        log.warning(
            "AUTHENTICATION IS OFF (FLUXPORT_AUTH=none): anyone who can reach this server can generate "
            "images and spend provider money. Use it only for local experiments."
        )
        print(
            _banner("AUTH IS OFF (FLUXPORT_AUTH=none): every /v1 route is open to anyone who can reach it."),
            file=sys.stderr,
            flush=True,
        )
        return
    await ensure_first_key(settings, db)


async def ensure_first_key(settings: Settings, db: Database) -> None:
    """With auth on and no key at all, create one and print it once (to stderr)."""
    from fluxport.keys import create_key

    if settings.auth == "none" or await db.count_api_keys() > 0:
        return
    row, secret = await create_key(db, name="default")
    log.warning("no API keys existed: created key %s (%s), printed once to stderr", row.id, row.name)
    print(
        _banner(
            'fluxport created its first API key, "default". It is shown ONCE; store it now:\n\n'
            f"    {secret}\n\n"
            "Use it as the OpenAI SDK's api_key (Authorization: Bearer <key>).\n"
            "More keys: fluxport keys create | list | revoke"
        ),
        file=sys.stderr,
        flush=True,
    )


def _banner(text: str) -> str:
    rule = "=" * 78
    return f"\n{rule}\n{text}\n{rule}\n"


def sweep_interval(settings: Settings) -> float:
    """Hourly; more often when links live less than two hours (tests use seconds)."""
    return min(3600.0, max(0.5, settings.image_ttl_s / 2))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = await Database.from_settings(settings)
        # Image files: the data dir's images/ or an S3-compatible bucket (FLUXPORT_BLOB_URL).
        blobs = open_blob_store(settings)
        await blobs.start()
        # Crash repair before serving; then the expiry sweep of image files (storage/repair.py).
        # Replicas sharing the database: only requests older than any live one are interrupted.
        in_flight_s = settings.request_deadline_s + 60 if settings.shared_database else None
        repaired = await repair_on_start(db, blobs, ttl_s=settings.image_ttl_s, in_flight_s=in_flight_s)
        sweeper = asyncio.create_task(
            sweep_forever(
                db,
                blobs,
                ttl_s=settings.image_ttl_s,
                interval_s=sweep_interval(settings),
                since=repaired.cutoff,
                in_flight_s=in_flight_s,
            ),
            name="fluxport-expiry-sweep",
        )
        providers = build_providers(settings)
        service = ImageService(settings, db, blobs, providers, metrics=app.state.metrics)
        for (provider_name, model), outcomes in (await db.recent_outcomes()).items():
            service.router.seed(provider_name, model, outcomes)
        # Rate limits and the hosted providers' breakers: this process's, or shared through Redis.
        live = app.state.live = LiveState.from_settings(settings)
        hosted = {
            (name, spec.id)
            for spec in MODELS.values()
            for name in model_providers(spec, providers)
            if name in providers
        }
        await live.start(service.router, sorted(hosted))
        local = providers.get("local")
        if isinstance(local, LocalProvider):
            app.state.metrics.track_queue("local", local.queue_depths)
        app.state.settings = settings
        app.state.service = service
        await _keys_and_idempotency(app, settings, db)
        watcher = asyncio.create_task(app.state.auth.watch(), name="fluxport-key-watch")
        # What large requests free goes back to the OS once the resident size has grown (memory.py).
        releaser = asyncio.create_task(release_forever(), name="fluxport-memory-release")
        # Everything built so far lives as long as the server: keep it out of the collector's
        # scans, and collect the young generation less often (requests allocate many small
        # objects; full collections over a large heap were the long pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        try:
            if settings.local_warm and isinstance(local, LocalProvider):
                # Before the server listens: the first request pays nothing. A failure stops the
                # start, and what was opened above is closed below.
                await warm(local, settings.local_warm)
            yield
        finally:
            for task in (sweeper, watcher, releaser):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await service.drain(grace_s=30)
            await live.aclose()
            for provider in providers.values():
                await provider.aclose()
            await blobs.aclose()
            await db.close()

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:
        # FastAPI's built-in OpenTelemetry: opt-in (FLUXPORT_OTEL), since even unconfigured it
        # asks the OTel globals on every request; fluxport's own metrics are at /metrics.
        enabled = settings.otel
        options["telemetry"] = {"tracing": enabled, "metrics": enabled, "logs": enabled}
    app = FastAPI(
        title="fluxport",
        version=__version__,
        summary="One OpenAI-compatible API for FLUX.2 [dev] and FLUX.2 [dev] Flash.",
        lifespan=lifespan,
        # Starlette's own slash redirect writes the Host header into an absolute Location; the
        # 404 handler redirects with a relative one instead (_http_error).
        redirect_slashes=False,
        **options,
    )
    app.add_exception_handler(FluxportError, _fluxport_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.state.metrics = Metrics()
    app.include_router(images.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    # Web pages and the playground (fluxport/web/), outside /v1 so they need no key.
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")

    @app.get("/healthz", tags=["service"])
    async def healthz(request: Request) -> dict[str, str]:
        """Up (200) while it serves; `degraded` when Redis is gone and limits are per process."""
        live: LiveState | None = getattr(request.app.state, "live", None)
        state = live.status() if live is not None else {}
        degraded = live is not None and live.link is not None and not live.link.up
        return {"status": "degraded" if degraded else "ok", "version": __version__, **state}

    # Inside RequestContext, so that 401 and 429 answers carry a request id too.
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(
        RequestContext, max_body_bytes=settings.max_body_bytes, max_json_bytes=settings.max_json_bytes
    )
    return app
