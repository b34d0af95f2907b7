"""/v1/images/generations, /v1/images/edits, and the route that serves stored images."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from fluxport.api.protocol import ErrorResponse, ImageRequest, ImagesResponse, parse_image_request
from fluxport.domain.errors import FluxportError, InvalidRequest, NotFound, PayloadTooLarge
from fluxport.domain.job import Operation
from fluxport.gateway.service import Completed, ImageService, PreparedRequest

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 502, 503)
}
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
_BRACKETS = re.compile(r"\[([^\]]*)\]")
_ID = re.compile(r"^([A-Za-z0-9_-]{20,64})\.(png|jpg|gif|webp|avif)$")
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
async def generations(request: Request) -> JSONResponse:
    """Create images from a prompt (OpenAI `images.generate`)."""
    service = _service(request)
    data: Any = None
    try:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
        req = parse_image_request(data)
        prepared = await service.prepare(request.state.request_id, Operation.GENERATE, req)
    except FluxportError as exc:
        fields = data if isinstance(data, dict) else {}
        await service.reject(request.state.request_id, Operation.GENERATE, fields, exc)
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
async def edits(request: Request) -> JSONResponse:
    """Edit with 1-4 reference images (OpenAI `images.edit`, multipart)."""
    service = _service(request)
    fields: dict[str, Any] = {}
    try:
        fields, uploads = await _read_multipart(request, service.settings.max_image_bytes)
        req = parse_image_request(fields)
        prepared = await service.prepare(request.state.request_id, Operation.EDIT, req, uploads)
    except FluxportError as exc:
        await service.reject(request.state.request_id, Operation.EDIT, fields, exc)
        raise
    return await _run(request, service, prepared)


async def _run(request: Request, service: ImageService, prepared: PreparedRequest) -> JSONResponse:
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
    try:
        done = await asyncio.shield(task)
    except asyncio.CancelledError:
        service.client_gone(prepared.job.request_id)
        raise
    if await request.is_disconnected():
        service.client_gone(prepared.job.request_id)
    return _respond(request, service, done)


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
    headers = {
        "x-fluxport-provider": done.provider,
        "x-fluxport-attempts": ",".join(done.attempts),
        "x-fluxport-normalization": ", ".join(f"{k}={v}" for k, v in sorted(done.normalization.items())),
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
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except PayloadTooLarge:
        raise
    except Exception as exc:  # the multipart parser raises its own types for malformed bodies
        raise InvalidRequest(f"Malformed multipart body: {exc}.", code="invalid_multipart") from None
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
                _assign(fields, key, _coerce(value))
    finally:
        await form.close()
    return fields, uploads


def _coerce(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


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
    responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}},
)
async def stored_image(name: str, request: Request) -> FileResponse:
    """A stored image, for `response_format=url`. The id is unguessable (192 bits)."""
    m = _ID.match(name)
    row = await _service(request).db.get_image(m.group(1)) if m else None
    if row is None or not _service(request).blobs.exists(row.path):
        raise NotFound("No such image (the link may be wrong or expired).", param=None)
    return FileResponse(
        _service(request).blobs.resolve(row.path),
        media_type=row.mime,
        headers={"cache-control": "private, max-age=3600"},
        filename=name,
        content_disposition_type="inline",
    )
