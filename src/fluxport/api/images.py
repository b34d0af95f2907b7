"""/v1/images/generations, /v1/images/edits, and the route that serves stored images."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from email.utils import format_datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.responses import Response

from fluxport.api.auth import calling_key, key_auth
from fluxport.api.idempotency import idempotency
from fluxport.api.protocol import (
    ErrorResponse,
    ImageRequest,
    ImagesResponse,
    check_structure,
    coerce_text,
    load_json,
    parse_image_request,
)
from fluxport.api.streaming import stream_images
from fluxport.domain.errors import (
    ClientDisconnected,
    FluxportError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from fluxport.domain.job import OUTPUT_FORMATS, Operation, file_extension
from fluxport.gateway.service import Completed, ImageService, PreparedRequest
from fluxport.storage.blobs import BlobStream, Redirect

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 502, 503)
}
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
_BRACKETS = re.compile(r"\[([^\]]*)\]")
JSON_ON_LOOP_BYTES = 64 * 1024  # parsing this much takes well under a millisecond
_EXTENSIONS = "|".join(file_extension(f) for f in OUTPUT_FORMATS)
_ID = re.compile(rf"^([A-Za-z0-9_-]{{20,64}})\.({_EXTENSIONS})$")
MAX_FORM_FIELDS = 200
MAX_FORM_FILES = 8


def _service(request: Request) -> ImageService:
    service: ImageService = request.app.state.service
    return service


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    tags=["images"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageRequest.model_json_schema()}},
        }
    },
)
async def generations(request: Request) -> Response:
    """Create images from a prompt (OpenAI `images.generate`). Honours `Idempotency-Key`."""
    return await idempotency(request).run(request, lambda: _generate(request))


async def _generate(request: Request) -> Response:
    service = _service(request)
    data: Any = None
    key_id = _key_id(request)
    try:
        raw = await request.body()
        # Strict: 400 for bad UTF-8, nesting bombs, NaN, lone surrogates. A large body (up to
        # FLUXPORT_MAX_JSON_BYTES) is parsed in a thread, so the event loop keeps serving.
        data = load_json(raw) if len(raw) <= JSON_ON_LOOP_BYTES else await asyncio.to_thread(load_json, raw)
        req = parse_image_request(data)
        prepared = await service.prepare(
            request.state.request_id, Operation.GENERATE, req.to_params(), api_key_id=key_id
        )
        await _check_budget(request, prepared)
    except FluxportError as exc:
        fields = data if isinstance(data, dict) else {}
        await service.reject(request.state.request_id, Operation.GENERATE, fields, exc, api_key_id=key_id)
        raise
    return await _run(request, service, prepared)


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    tags=["images"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "allOf": [
                            ImageRequest.model_json_schema(),
                            {
                                "type": "object",
                                "required": ["image"],
                                "properties": {
                                    "image": {
                                        "type": "array",
                                        "items": {"type": "string", "format": "binary"},
                                        "description": "1-4 reference images (PNG, JPEG, WebP) as "
                                        "image, image[] or image[N].",
                                    }
                                },
                            },
                        ]
                    }
                }
            },
        }
    },
)
async def edits(request: Request) -> Response:
    """Edit with 1-4 reference images (OpenAI `images.edit`, multipart). Honours `Idempotency-Key`."""
    return await idempotency(request).run(request, lambda: _edit(request))


async def _edit(request: Request) -> Response:
    service = _service(request)
    fields: dict[str, Any] = {}
    key_id = _key_id(request)
    try:
        fields, uploads = await _read_multipart(request, service.settings.max_image_bytes)
        req = parse_image_request(fields)
        prepared = await service.prepare(
            request.state.request_id, Operation.EDIT, req.to_params(), uploads, api_key_id=key_id
        )
        await _check_budget(request, prepared)
    except FluxportError as exc:
        await service.reject(request.state.request_id, Operation.EDIT, fields, exc, api_key_id=key_id)
        raise
    return await _run(request, service, prepared)


def _key_id(request: Request) -> str | None:
    key = calling_key(request)
    return key.id if key is not None else None


async def _check_budget(request: Request, prepared: PreparedRequest) -> None:
    """Paid work only: a dry run costs nothing, so it is answered even over budget."""
    if not prepared.request.dry_run:
        await key_auth(request).check_budget(calling_key(request))


async def _run(request: Request, service: ImageService, prepared: PreparedRequest) -> Response:
    if prepared.request.stream:
        prefix = "image_edit" if prepared.job.operation is Operation.EDIT else "image_generation"
        return await stream_images(request, service, prepared, prefix)
    if prepared.request.dry_run:
        estimate = await service.dry_run(prepared)
        body = {
            "created": int(time.time()),
            "data": [],
            "model": prepared.job.model,
            "output_format": prepared.job.output_format,
            "size": str(estimate.size),
            "dry_run": True,
            "provider": estimate.provider,
            "providers": [{"provider": name, "cost_usd": cost} for name, cost in estimate.providers],
            "usage": estimate.usage.to_wire(),
        }
        headers = {
            "x-fluxport-provider": estimate.provider,
            "x-fluxport-cost-usd": f"{estimate.usage.cost_usd:.6f}",
        }
        return JSONResponse(body, headers=headers)
    task = await service.submit(prepared)
    request_id = prepared.job.request_id
    # With an Idempotency-Key the answer is kept for the client's retry: finish it whatever happens.
    collectable = request.headers.get("idempotency-key") is not None
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client hung up first
            if not collectable:
                service.abandon(request_id)
                await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected("The client disconnected before the answer.")
            service.client_gone(request_id)
        done = await asyncio.shield(task)
    except asyncio.CancelledError:
        # The handler itself was cancelled (a proxy in front, e.g. Ray Serve's, does that when the
        # client closes the connection): as a disconnect, the work stops unless it is collectable.
        if collectable:
            service.client_gone(request_id)
        else:
            service.abandon(request_id)
        raise
    finally:
        watcher.cancel()
    return _respond(request, service, done)


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (its body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _respond(request: Request, service: ImageService, done: Completed) -> JSONResponse:
    base = (service.settings.public_url or str(request.base_url)).rstrip("/")
    data: list[dict[str, Any]] = []
    for img in done.images:
        item: dict[str, Any] = {"seed": img.seed}
        if done.response_format == "b64_json":
            item["b64_json"] = base64.b64encode(img.image.data).decode("ascii")
        else:
            item["url"] = base + img.path
        if done.revised_prompt:
            item["revised_prompt"] = done.revised_prompt
        data.append(item)
    body = {
        "created": done.created,
        "data": data,
        "model": done.model,
        "output_format": done.output_format,
        "size": str(done.size),
    }
    if done.usage is not None:
        body["usage"] = done.usage.to_wire()
    if done.response_format != "b64_json":
        body["expires_at"] = done.created + service.settings.image_ttl_s  # when the links stop working
    headers = {
        "x-fluxport-provider": done.provider,
        "x-fluxport-attempts": ",".join(done.attempts),
        "x-fluxport-normalization": done.normalization_text(),
        "x-fluxport-cost-usd": f"{done.usage.cost_usd if done.usage else 0.0:.6f}",
    }
    return JSONResponse(body, headers=headers)


async def _read_multipart(request: Request, max_bytes: int) -> tuple[dict[str, Any], list[bytes]]:
    """Parse the SDK's multipart body: image / image[] / image[N] files in arrival order, text fields
    with bracketed names (a[b][c], lst[]) rebuilt into objects, "true"/"false" and numbers coerced."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            "Edits take multipart/form-data with the reference images as 'image' file parts.",
            param="image",
            code="invalid_content_type",
        )
    parser = _StrictMultiPart(
        request.headers, request.stream(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS
    )
    try:
        form = await parser.parse()
    except PayloadTooLarge:
        raise
    except Exception as exc:  # the multipart parser raises its own types for malformed bodies
        raise InvalidRequest(f"Malformed multipart body: {exc}.", code="invalid_multipart") from None
    if parser.not_utf8:
        await form.close()
        name = parser.not_utf8[0].split("[", 1)[0]
        raise InvalidRequest(
            f"Invalid value for '{name}': the text is not valid UTF-8.", param=name, code="invalid_encoding"
        )
    fields: dict[str, Any] = {}
    uploads: list[bytes] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if not _IMAGE_FIELD.match(key):
                    param = key.split("[", 1)[0]
                    raise InvalidRequest(
                        f"'{param}' is not supported by FLUX.2 edits; send reference images as 'image'.",
                        param=param,
                    )
                # Refused on the spooled size, before the bytes are read into memory.
                if value.size is not None and value.size > max_bytes:
                    raise PayloadTooLarge(
                        f"Reference image {len(uploads) + 1} is {value.size} bytes; the limit is "
                        f"{max_bytes} bytes.",
                        param="image",
                    )
                data = await value.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise PayloadTooLarge(
                        f"Reference image {len(uploads) + 1} is larger than {max_bytes} bytes.", param="image"
                    )
                uploads.append(data)
            elif _IMAGE_FIELD.match(key):
                raise InvalidRequest(
                    f"Invalid type for '{key}': expected a file, but got a string instead.",
                    param=key,
                    code="invalid_type",
                )
            else:
                _assign(fields, key, coerce_text(value))
    finally:
        await form.close()
    check_structure(fields)
    return fields, uploads


class _StrictMultiPart(MultiPartParser):
    """Starlette's parser, but a text part that is not valid UTF-8 is noted (Starlette silently
    falls back to Latin-1) so that the request is refused naming the field."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.not_utf8: list[str] = []

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and self._charset == "utf-8":
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                self.not_utf8.append(part.field_name)
        super().on_part_end()


def _assign(fields: dict[str, Any], key: str, value: Any) -> None:
    head = key.split("[", 1)[0]
    path = _BRACKETS.findall(key[len(head) :])
    if not path:
        fields[head] = value
        return
    target: Any = fields
    names: list[str] = [head, *path]
    for i, name in enumerate(names[:-1]):
        nxt = names[i + 1]
        container: Any = [] if nxt == "" else {}
        if isinstance(target, dict):
            target = target.setdefault(name, container)
        else:
            raise InvalidRequest(f"Conflicting form field '{key}'.", param=head)
    last = names[-1]
    if last == "":
        if not isinstance(target, list):
            raise InvalidRequest(f"Conflicting form field '{key}'.", param=head)
        target.append(value)
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise InvalidRequest(f"Conflicting form field '{key}'.", param=head)


@router.get(
    "/images/{name}",
    tags=["images"],
    responses={
        200: {"content": {"image/*": {}}},
        307: {"description": "To a presigned URL of the image (FLUXPORT_BLOB_DOWNLOADS=presign)"},
        404: {"model": ErrorResponse},
    },
)
async def stored_image(name: str, request: Request) -> Response:
    """A stored image, for `response_format=url`. The id is unguessable (192 bits). From an object
    store: streamed through (FLUXPORT_BLOB_DOWNLOADS=proxy) or a 307 to a presigned URL (presign)."""
    service = _service(request)
    m = _ID.match(name)
    row = await service.db.get_image(m.group(1)) if m else None
    # The extension is part of the link: a PNG asked for as .jpg would be served under a lying name.
    if row is None or m is None or file_extension(row.format) != m.group(2):
        raise NotFound("No such image (the link may be wrong or expired).", param=None)
    # Checked here, not only by the sweep: a link is dead from the stated expires_at on.
    created = int(row.created_at.timestamp()) if row.created_at else 0
    remaining = created + service.settings.image_ttl_s - time.time()
    if remaining <= 0:
        raise NotFound("This image link has expired.", param=None, code="expired")
    found = await service.blobs.download(row.path, valid_for_s=remaining)
    if found is None:
        raise NotFound("No such image (the link may be wrong or expired).", param=None)
    headers = {"cache-control": f"private, max-age={min(3600, int(remaining))}"}
    if isinstance(found, Redirect):  # the presigned URL lasts as long as the link: so may this
        return RedirectResponse(found.url, status_code=307, headers=headers)
    if isinstance(found, BlobStream):
        headers |= {"content-length": str(found.size), "content-disposition": f'inline; filename="{name}"'}
        if found.etag:
            headers["etag"] = found.etag
        if found.last_modified:
            headers["last-modified"] = format_datetime(found.last_modified, usegmt=True)
        return StreamingResponse(found.chunks, media_type=row.mime, headers=headers)
    return FileResponse(
        found.path, media_type=row.mime, headers=headers, filename=name, content_disposition_type="inline"
    )
