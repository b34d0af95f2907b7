"""An emulator of the diffusion servers that speak OpenAI's Images API, as their docs describe
them (reference/anchors.md, "Local servers"):

- `flavour="sglang"` (SGLang-Diffusion, `sglang serve`): `POST /v1/images/generations` and
  `POST /v1/images/edits` (multipart; `image` files); `n`, `size`, `response_format` b64_json or
  url, where a url is the relative `/v1/images/<id>/content` (no cloud storage configured);
  `GET /models`; an API key when started with one. Asked to stream, it answers an empty b64_json
  (sgl-project/sglang#24240).
- `flavour="vllm-omni"` (`vllm serve <model> --omni`): the same routes, `n` 1-10, `size`
  (`auto`: the first input image's size), `response_format` default b64_json, `output_format`,
  and the extra fields `num_inference_steps`, `guidance_scale`, `seed`, `negative_prompt`;
  `GET /health`, `GET /v1/models`.

One model per server. Images are solid `seed_colour(seed + i)`, so a test reads the seed back.
The emulator counts the calls in flight (and their peak), and the calls whose client hung up
before the answer (`abandoned`): these servers have no cancel endpoint, a closed connection is
the cancellation. Faults: `script(Fault(...))` as for the other emulators (HTTP-level kinds).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tests.emulators.server import (
    BillingEntry,
    Emulator,
    EmulatorConfig,
    billed_megapixels,
    render_image,
    seed_colour,
)

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


@dataclass(frozen=True)
class _Done:
    at: float
    images: int
    megapixels: float


class OpenAIImagesEmulator(Emulator):
    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        flavour: Literal["sglang", "vllm-omni"] = "vllm-omni",
        model: str = "black-forest-labs/FLUX.2-dev",
        api_key: str | None = None,
        price_per_mp: float = 0.0,
    ) -> None:
        self.flavour = flavour
        self.model = model
        self.api_key = api_key
        self.price_per_mp = price_per_mp
        self.in_flight = 0
        self.peak_in_flight = 0
        self.served = 0
        self.abandoned = 0
        self._done: list[_Done] = []
        self._content: dict[str, bytes] = {}
        self.forms: list[dict[str, Any]] = []  # the text fields (and image count) of each edit
        self.answer_urls = False  # answer links whatever response_format asks (an older server)
        super().__init__(config)

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1"

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/images/generations", self.generations, methods=["POST"]),
            Route("/v1/images/edits", self.edits, methods=["POST"]),
            Route("/v1/images/{id}/content", self.content, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/health", lambda _r: Response(b"", 200), methods=["GET"]),
        ]

    def _reset_jobs(self) -> None:
        self.in_flight = self.peak_in_flight = self.served = self.abandoned = 0
        self._done.clear()
        self._content.clear()
        self.forms.clear()

    def _billing(self, now: float) -> Iterable[BillingEntry]:
        for i, done in enumerate(self._done):
            yield BillingEntry(
                f"call-{i}",
                self.model,
                done.images,
                done.megapixels,
                done.megapixels * self.price_per_mp,
                done.at,
            )

    def _refused(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "Invalid API key", "type": "auth_error"}}, 401)
        return None

    @staticmethod
    def _bad(message: str, param: str) -> Response:
        return JSONResponse(
            {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
            400,
        )

    async def models(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def content(self, request: Request) -> Response:
        await self.record(request)
        refused = self._refused(request)  # a server started with an API key guards its files too
        if refused is not None:
            return refused
        data = self._content.get(request.path_params["id"])
        return Response(data, media_type="image/png") if data else Response(b"not found", 404)

    async def generations(self, request: Request) -> Response:
        entry = await self.record(request)
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = entry.body if isinstance(entry.body, dict) else None
        if body is None:
            return self._bad("the body must be a JSON object", "body")
        return await self._generate(request, body, None)

    async def edits(self, request: Request) -> Response:
        await self.record(request)
        refused = self._refused(request)
        if refused is not None:
            return refused
        form = await request.form()
        fields: dict[str, Any] = {}
        first: tuple[int, int] | None = None
        images = 0
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("image", "image[]"):
                    return self._bad(f"unexpected file field {key!r}", key)
                with Image.open(io.BytesIO(await value.read())) as im:
                    first = first or im.size
                images += 1
            else:
                fields[key] = value
        if images == 0:
            return self._bad("an edit needs an image", "image")
        for name in ("n", "seed", "num_inference_steps"):
            if name in fields:
                fields[name] = int(fields[name])
        with self._lock:
            self.forms.append({**fields, "images": images})
        return await self._generate(request, fields, first)

    async def _generate(
        self, request: Request, body: dict[str, Any], first: tuple[int, int] | None
    ) -> Response:
        if body.get("model") not in (None, self.model):
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} is not served"}}, 404)
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return self._bad("prompt is required", "prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 10:
            return self._bad("n must be between 1 and 10", "n")
        size = body.get("size", "1024x1024")
        if size == "auto" and self.flavour == "vllm-omni":
            width, height = first or (1024, 1024)
        else:
            match = _SIZE.match(str(size))
            if not match:
                return self._bad(f"invalid size {size!r}", "size")
            width, height = int(match.group(1)), int(match.group(2))
        default_format = "b64_json" if self.flavour == "vllm-omni" else "url"
        response_format = body.get("response_format") or default_format
        if response_format not in ("b64_json", "url"):
            return self._bad(f"invalid response_format {response_format!r}", "response_format")
        fault = self._draw_fault()
        if fault is not None:
            return await self.fault_response(fault)
        seed = body.get("seed")
        seed = seed if isinstance(seed, int) else self._random_seed()
        queue, run = self._durations()
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            end = time.monotonic() + queue + run
            while time.monotonic() < end:
                if await request.is_disconnected():
                    with self._lock:
                        self.abandoned += 1
                    return Response(b"", 499)
                await asyncio.sleep(min(0.02, max(0.0, end - time.monotonic())))
        finally:
            with self._lock:
                self.in_flight -= 1
        fmt = body.get("output_format") if self.flavour == "vllm-omni" else None
        fmt = fmt if fmt in ("png", "jpeg", "webp") else "png"
        data = []
        for i in range(n):
            image = render_image(width, height, fmt, seed_colour(seed + i))
            if body.get("stream") and self.flavour == "sglang":
                data.append({"b64_json": ""})  # sgl-project/sglang#24240
            elif response_format == "b64_json" and not self.answer_urls:
                data.append({"b64_json": base64.b64encode(image).decode("ascii")})
            else:
                key = uuid.uuid4().hex
                self._content[key] = image
                data.append({"url": f"/v1/images/{key}/content"})
        with self._lock:
            self.served += 1
            self._done.append(_Done(time.monotonic(), n, n * billed_megapixels(width, height)))
        return JSONResponse({"created": int(time.time()), "data": data})
