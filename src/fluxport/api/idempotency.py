"""Idempotency-Key: a retried image request gets the stored answer instead of a second generation.

An answer is held per (API key, Idempotency-Key) for `idempotency_ttl_s`. A duplicate that arrives
while the first is running waits for it: on an in-process future, or by polling the database when
the first runs in another process. A streamed duplicate does not wait in silence (no event could
flow while it waited): it gets 409 idempotency_key_in_progress with Retry-After, which the SDKs
retry, and the retry after the first has finished gets its completed events.
2xx and 4xx answers are kept; 5xx, 429 and 403 (budget) are not, so that the client's retry runs
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from fastapi import Request
from starlette.responses import JSONResponse, Response

from fluxport.api.auth import calling_key
from fluxport.api.streaming import ImageEventStream
from fluxport.domain.errors import (
    FluxportError,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
)
from fluxport.storage.db import Database, IdempotencyRow

log = logging.getLogger("fluxport.idempotency")

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255
REPLAYED = "idempotent-replayed"
POLL_S = 0.2
PURGE_EVERY_S = 3600.0
# Answers that depend on the moment, not on the body: never replayed.
_NOT_KEPT = frozenset({403, 408, 409, 429})
# Per-response headers that are not part of the stored answer.
_SKIP_HEADERS = frozenset({"content-length", "x-request-id", "date", "server"})

_BOUNDARY = re.compile(r"boundary=(\"[^\"]+\"|[^;\s]+)", re.IGNORECASE)

Handler = Callable[[], Awaitable[Response]]


class Idempotency:
    """Per-process bookkeeping of the Idempotency-Keys in flight; the database holds the answers."""

    def __init__(self, db: Database, ttl_s: int, stale_after_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.stale_after_s = stale_after_s
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._purged_at = 0.0
        self._settling: set[asyncio.Task[None]] = set()

    async def run(self, request: Request, handler: Handler) -> Response:
        key = request.headers.get(HEADER)
        if key is None:
            return await handler()
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"'Idempotency-Key' must be 1 to {MAX_KEY_CHARS} characters; got {len(key)}.",
                param="Idempotency-Key",
            )
        await self._purge_now_and_then()
        raw = await request.body()  # cached: the handler's own body()/form() read it from memory
        body_hash = _body_hash(request, raw)
        owner = key_owner(request)
        slot = (owner, key)
        deadline = asyncio.get_running_loop().time() + self.stale_after_s
        streamed: bool | None = None
        while True:
            running = self._inflight.get(slot)
            if running is not None:
                if streamed is None:
                    streamed = _wants_stream(request, raw)
                if streamed:
                    raise IdempotencyInProgress(_in_progress(key))
                await asyncio.shield(running)
                continue
            now = datetime.now(UTC)
            row = await self.db.claim_idempotency(
                api_key_id=owner,
                key=key,
                body_hash=body_hash,
                request_id=request.state.request_id,
                expires_at=now + timedelta(seconds=self.ttl_s),
                stale_before=now - timedelta(seconds=self.stale_after_s),
            )
            if row is None:
                return await self._first(slot, handler)
            if row.body_hash != body_hash:
                raise IdempotencyConflict(
                    f"Idempotency-Key {key!r} was already used with a different request body "
                    f"(request {row.request_id}); use a new key for a new request."
                )
            if row.state == "done":
                return replay(row)
            # Running in another process: poll until it is answered, released or goes stale.
            if streamed is None:
                streamed = _wants_stream(request, raw)
            if streamed or asyncio.get_running_loop().time() > deadline:
                raise IdempotencyInProgress(_in_progress(key))
            await asyncio.sleep(POLL_S)

    async def _purge_now_and_then(self) -> None:
        """Expired answers of keys never used again are deleted hourly (and at start-up)."""
        now = asyncio.get_running_loop().time()
        if now - self._purged_at > PURGE_EVERY_S:
            self._purged_at = now
            await self.db.purge_idempotency()

    async def _first(self, slot: tuple[str, str], handler: Handler) -> Response:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = done
        owner, key = slot
        streaming = False
        try:
            try:
                response = await handler()
            except FluxportError as exc:
                if _kept(exc.status):
                    await self.db.finish_idempotency(
                        owner,
                        key,
                        status_code=exc.status,
                        headers={"content-type": "application/json", **exc.headers},
                        body=bytes(JSONResponse(exc.body()).body).decode("utf-8"),  # as app.py renders it
                    )
                else:
                    await self.db.release_idempotency(owner, key)
                raise
            except BaseException:
                await asyncio.shield(self.db.release_idempotency(owner, key))
                raise
            if isinstance(response, ImageEventStream):
                # Streamed: the answer is kept once the work ends (the client may be gone by then).
                streaming = True
                task = asyncio.create_task(self._keep_stream(slot, response, done))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
                return response
            if _kept(response.status_code) and isinstance(response, JSONResponse):
                headers = {k: v for k, v in response.headers.items() if k.lower() not in _SKIP_HEADERS}
                await self.db.finish_idempotency(
                    owner,
                    key,
                    status_code=response.status_code,
                    headers=headers,
                    body=bytes(response.body).decode("utf-8"),
                )
            else:
                await self.db.release_idempotency(owner, key)
            return response
        finally:
            if not streaming:
                self._inflight.pop(slot, None)
                done.set_result(None)

    async def _keep_stream(
        self, slot: tuple[str, str], response: ImageEventStream, done: asyncio.Future[None]
    ) -> None:
        """Store a streamed request's completed events for the retry (a replay is the completed
        events, without the partials), or release the key when the request failed."""
        owner, key = slot
        try:
            body = await asyncio.shield(response.final)
            if body is None:
                await self.db.release_idempotency(owner, key)
            else:
                headers = {k: v for k, v in response.headers.items() if k.lower() not in _SKIP_HEADERS}
                await self.db.finish_idempotency(
                    owner, key, status_code=200, headers=headers, body=body.decode("utf-8")
                )
        except Exception:
            log.exception("the streamed answer for Idempotency-Key %r could not be kept", key)
        finally:
            self._inflight.pop(slot, None)
            done.set_result(None)


def _in_progress(key: str) -> str:
    return (
        f"The request with Idempotency-Key {key!r} is still running; retry after Retry-After "
        "seconds for its answer."
    )


_FORM_STREAM = re.compile(rb'name="stream"\r\n(?:[^\r\n]+\r\n)*\r\n\s*true\s*\r\n', re.IGNORECASE)


def _wants_stream(request: Request, raw: bytes) -> bool:
    """Whether the body asks for `stream` (JSON true, or a multipart field "true"); read only when
    a duplicate would have to wait."""
    if request.headers.get("content-type", "").startswith("multipart/"):
        return _FORM_STREAM.search(raw) is not None
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


def _body_hash(request: Request, raw: bytes) -> str:
    """SHA-256 over method, path and raw body; a multipart boundary (the SDK draws a new one for
    every attempt) is blanked out first, so that a retried upload hashes the same."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    content_type = request.headers.get("content-type", "")
    match = _BOUNDARY.search(content_type) if content_type.startswith("multipart/") else None
    if match:
        raw = raw.replace(match.group(1).strip('"').encode("latin-1"), b"")
    digest.update(raw)
    return digest.hexdigest()


def key_owner(request: Request) -> str:
    key = calling_key(request)
    return key.id if key is not None else ""


def _kept(status: int) -> bool:
    return status < 500 and status not in _NOT_KEPT


def replay(row: IdempotencyRow) -> Response:
    headers = {**(row.headers or {}), REPLAYED: "true"}
    return Response(
        content=(row.body or "").encode("utf-8"), status_code=row.status_code or 200, headers=headers
    )


def idempotency(request: Request) -> Idempotency:
    store: Idempotency = request.app.state.idempotency
    return store
