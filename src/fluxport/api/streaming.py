"""Streamed image requests: `stream=true` on /v1/images/generations and /v1/images/edits.

The wire is OpenAI's, as its SDKs parse it into `ImageGenStreamEvent` / `ImageEditStreamEvent`:

    event: image_generation.partial_image
    data: {"type": ..., "b64_json", "created_at", "size", "quality", "background", "output_format",
           "partial_image_index", "image_index"}

    event: image_generation.completed
    data: {"type": ..., "b64_json", "created_at", "size", "quality", "background", "output_format",
           "usage", "seed", "provider", ...}

(`image_edit.*` for edits.) Partial images come as the provider makes them (only the local
provider makes real ones; a hosted one has no pixels before its result, so `partial_images` is
emulated as 0 there and said so in `x-fluxport-normalization`). Each of the n images then gets its
completed event, in order. A failure after the stream began is an `error` event
(`{"type": "error", "error": {...}}`), which the SDK raises as `openai.APIError`; the stream never
just stops. While nothing comes, an SSE comment every `stream_keepalive_s` keeps proxies from
closing the connection.

The generation is the same as an unstreamed request's (routing, failover, hedging, pricing,
storage, records, one bill); only the answer is delivered differently. A client that goes away
mid-stream cancels the work (recorded `cancelled`), unless it sent an Idempotency-Key: then the
work finishes and the retry gets the completed events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from fluxport.domain.errors import FluxportError, Interrupted
from fluxport.gateway.deliver import partial_images_behaviour
from fluxport.gateway.service import Completed, ImageService, PreparedRequest
from fluxport.providers.base import PartialImage, ProgressEvent

log = logging.getLogger("fluxport.streaming")

MEDIA_TYPE = "text/event-stream"
# How long the response waits for the first attempt to start, to name its provider in the headers.
FIRST_ATTEMPT_WAIT_S = 2.0
_QUALITIES = frozenset({"low", "medium", "high", "auto"})


class ImageEventStream(StreamingResponse):
    """The SSE answer of one streamed request. `final` resolves, whatever happens to the client,
    with the completed events (the body an Idempotency-Key replays), or None when the request
    failed (then nothing is kept and a retry runs again)."""

    final: asyncio.Future[bytes | None]


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream_images(
    request: Request, service: ImageService, prepared: PreparedRequest, prefix: str
) -> ImageEventStream:
    """Submit `prepared` and answer with its events; `prefix`: image_generation or image_edit."""
    loop = asyncio.get_running_loop()
    partials: asyncio.Queue[PartialImage] = asyncio.Queue()
    started: asyncio.Future[str] = loop.create_future()

    def on_loop(event: ProgressEvent) -> None:
        if event.provider and not started.done():
            started.set_result(event.provider)
        if event.partial is not None:
            partials.put_nowait(event.partial)

    def progress(event: ProgressEvent) -> None:  # called from the device worker's thread too
        if event.partial is not None or (event.provider and not started.done()):
            loop.call_soon_threadsafe(on_loop, event)

    task = await service.submit(prepared, progress)
    request_id = prepared.job.request_id
    look = _Look(prefix, prepared.job.output_format)
    base = (service.settings.public_url or str(request.base_url)).rstrip("/")
    final: asyncio.Future[bytes | None] = loop.create_future()

    def settle(done: asyncio.Task[Completed]) -> None:
        """The completed events, built once when the work ends (streamed, or kept for a retry)."""
        body: bytes | None = None
        if not done.cancelled() and done.exception() is None:
            try:
                body = b"".join(completed_events(done.result(), look, base, service.settings.image_ttl_s))
            except Exception:  # never leave the stream (and an Idempotency-Key) waiting forever
                log.exception("request %s: the completed events could not be built", request_id)
        final.set_result(body)

    task.add_done_callback(settle)

    # The headers name the provider of the first attempt (failover may change it: each completed
    # event names the one that made it).
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    first: set[asyncio.Future[Any]] = {started, task}  # asyncio.wait cancels neither
    await asyncio.wait(first, timeout=FIRST_ATTEMPT_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not task.cancelled() and isinstance(task.exception(), FluxportError):
        # Failed before the stream began (cooling down, rate limited, no provider could): an HTTP
        # error with its status and Retry-After, which the SDK retries as for any request.
        raise task.exception()  # type: ignore[misc]
    if started.done():
        provider = started.result()
        headers["x-fluxport-provider"] = provider
        if prepared.job.partial_images and provider in service.providers:
            caps = service.providers[provider].capabilities(prepared.job.model)
            headers["x-fluxport-normalization"] = f"partial_images={partial_images_behaviour(caps)}"

    collectable = request.headers.get("idempotency-key") is not None
    keepalive = service.settings.stream_keepalive_s

    async def events() -> AsyncIterator[bytes]:
        finished = False
        get: asyncio.Future[PartialImage] | None = None
        try:
            while True:
                get = asyncio.ensure_future(partials.get())
                watch: set[asyncio.Future[Any]] = {get, task}
                done, _ = await asyncio.wait(watch, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield partial_event(get.result(), look)
                    continue
                get.cancel()
                if task in done:
                    break
                yield b": keep-alive\n\n"
            while not partials.empty():
                yield partial_event(partials.get_nowait(), look)
            body = await final
            if body is not None:
                yield body
            else:
                yield error_event(_failure(task))
            finished = True
        finally:
            if get is not None:
                get.cancel()
            if not finished and not task.done():  # the client went away mid-stream
                if collectable:
                    service.client_gone(request_id)
                else:
                    service.abandon(request_id)
                    await asyncio.shield(asyncio.gather(task, return_exceptions=True))

    response = ImageEventStream(events(), media_type=MEDIA_TYPE, headers=headers)
    response.final = final
    return response


class _Look:
    """What every event of one request repeats."""

    __slots__ = ("output_format", "prefix")

    def __init__(self, prefix: str, output_format: str) -> None:
        self.prefix, self.output_format = prefix, output_format

    # FLUX.2 has no quality levels, and its images are opaque (a transparent background is
    # refused up front): the events say so in OpenAI's terms.
    quality = "auto"
    background = "opaque"


def partial_event(partial: PartialImage, look: _Look) -> bytes:
    kind = f"{look.prefix}.partial_image"
    return sse(
        kind,
        {
            "type": kind,
            "b64_json": base64.b64encode(partial.data).decode("ascii"),
            "created_at": int(time.time()),
            "size": f"{partial.width}x{partial.height}",
            "quality": look.quality,
            "background": look.background,
            "output_format": partial.output_format,
            "partial_image_index": partial.partial_index,
            "image_index": partial.image_index,  # which of the n images (fluxport's addition)
        },
    )


def completed_events(done: Completed, look: _Look, base: str, ttl_s: int) -> list[bytes]:
    """One completed event per image, in order; `usage` is the whole request's on each."""
    kind = f"{look.prefix}.completed"
    usage = done.usage.to_wire() if done.usage is not None else None
    normalization = done.normalization_text()
    events = []
    for index, img in enumerate(done.images):
        data: dict[str, Any] = {
            "type": kind,
            "b64_json": base64.b64encode(img.image.data).decode("ascii"),
            "created_at": done.created,
            "size": str(done.size),
            "quality": look.quality,
            "background": look.background,
            "output_format": done.output_format,
            "usage": usage,
            # fluxport's additions, as on an unstreamed answer (and its x-fluxport-* headers):
            "image_index": index,
            "seed": img.seed,
            "provider": done.provider,
            "attempts": done.attempts,
            "normalization": normalization,
            "request_id": done.request_id,
        }
        if done.response_format != "b64_json":
            data["url"] = base + img.path
            data["expires_at"] = done.created + ttl_s
        if done.revised_prompt:
            data["revised_prompt"] = done.revised_prompt
        events.append(sse(kind, data))
    return events


def _failure(task: asyncio.Task[Completed]) -> FluxportError:
    if task.cancelled():
        return Interrupted("The server stopped during generation.")
    exc = task.exception()
    if isinstance(exc, FluxportError):
        return exc
    return FluxportError(f"Internal error while generating: {type(exc).__name__}.")


def error_event(exc: FluxportError) -> bytes:
    """The failure as OpenAI's error object, in an `error` event: the SDK raises it."""
    return sse("error", {"type": "error", **exc.body()})
