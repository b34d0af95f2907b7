"""App factory: lifespan wiring, request ids, body limit, and the one place errors become JSON."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxport import __version__
from fluxport.api import images, metrics, models, web
from fluxport.domain.errors import FluxportError, InvalidRequest, PayloadTooLarge
from fluxport.gateway.service import ImageService
from fluxport.metrics import Metrics
from fluxport.providers.local import LocalProvider
from fluxport.providers.registry import build_providers
from fluxport.settings import Settings
from fluxport.storage.blobs import BlobStore
from fluxport.storage.db import Database

log = logging.getLogger("fluxport")


class RequestContext:
    """Pure ASGI middleware: a request id on every response, and a cap on the body size."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

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

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            err = PayloadTooLarge(f"The request body is larger than {self.max_body_bytes} bytes.")
            await error_response(err)(scope, receive, send_with_id)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(f"The request body is larger than {self.max_body_bytes} bytes.")
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


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    err = FluxportError(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    err.status = exc.status_code
    err.type = "invalid_request_error"
    if exc.status_code == 404:
        err.message = f"No route for {request.method} {request.url.path}."
    return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = FluxportError("Internal server error.", code="internal_error", headers={"x-should-retry": "false"})
    return error_response(err)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = await Database.open(settings.resolved_database_url)
        interrupted = await db.mark_interrupted()
        if interrupted:
            log.warning("marked %d requests left in flight by an earlier run as interrupted", interrupted)
        blobs = BlobStore(settings.images_dir)
        providers = build_providers(settings)
        service = ImageService(settings, db, blobs, providers, metrics=app.state.metrics)
        for (provider_name, model), outcomes in (await db.recent_outcomes()).items():
            service.router.seed(provider_name, model, outcomes)
        local = providers.get("local")
        if isinstance(local, LocalProvider):
            app.state.metrics.track_queue("local", local.queue_depths)
        app.state.settings = settings
        app.state.service = service
        try:
            yield
        finally:
            await service.drain(grace_s=30)
            for provider in providers.values():
                await provider.aclose()
            await db.close()

    app = FastAPI(
        title="fluxport",
        version=__version__,
        summary="One OpenAI-compatible API for FLUX.2 [dev] and FLUX.2 [dev] Flash.",
        lifespan=lifespan,
    )
    app.add_exception_handler(FluxportError, _fluxport_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.state.metrics = Metrics()
    app.include_router(images.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    # Web pages and the playground (api/web.py), outside /v1 so they need no key.
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    return app
