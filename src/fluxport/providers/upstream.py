"""An upstream that speaks OpenAI's Images API: another fluxport, SGLang-Diffusion, vLLM-Omni, a
Ray Serve deployment (`fluxport ray`). Each entry of FLUXPORT_UPSTREAMS is one such provider.

The protocol is the one fluxport itself serves: `POST {base_url}/images/generations` (JSON) and
`POST {base_url}/images/edits` (multipart, the references as repeated `image` files), answered
with `{"data": [{"b64_json": ...} | {"url": ...}]}`. What such servers take natively: the prompt,
`size` as WxH, `n`, `response_format=b64_json` (asked for always: no second round trip), `seed`,
`guidance_scale`, `num_inference_steps`, `negative_prompt`; `output_format` where the upstream
says it encodes that format. The rest is converted or emulated by fluxport, and said so. A `url`
answer (SGLang-Diffusion without cloud storage answers a relative `/v1/images/<id>/content`) is
downloaded from the upstream's own origin through the same download guard as a hosted result.

A call that loses a hedge race, or whose request is abandoned, is cancelled by closing its
connection: these servers have no cancel endpoint, and a closed connection is what stops them.
At most `max_concurrency` calls are in flight per upstream; the router steers new requests to
the upstream with the fewest in flight for its measured latency (`Capabilities.capacity`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from fluxport.catalog import SizeLimits, find_model
from fluxport.domain.errors import FluxportError, InvalidRequest, ProviderFailure
from fluxport.domain.job import ImageJob
from fluxport.domain.pricing import Rate
from fluxport.providers._hosted import (
    Http,
    HttpPolicy,
    Reply,
    to_image,
)
from fluxport.providers.base import (
    AttemptTimings,
    Behaviour,
    Capabilities,
    ProgressCallback,
    ProgressEvent,
    ProviderResult,
    ProviderState,
    SizePolicy,
)
from fluxport.providers.download_guard import DownloadGuard
from fluxport.settings import Settings, UpstreamConfig

EXTRAS = frozenset({"num_inference_steps", "guidance_scale", "negative_prompt"})
NORMALIZATION: dict[str, tuple[str, str]] = {
    "prompt": ("passthrough", ""),
    "size": ("passthrough", "WxH; converted to the model's 16 px grid where it is not on it"),
    "n": ("passthrough", "up to max_images_per_call per call; more by parallel calls (emulated)"),
    "seed": ("passthrough", "image i is reported as seed + i (as fluxport makes them)"),
    "cfg_scale": ("renamed", "guidance_scale"),
    "output_format": ("passthrough", "the formats the upstream encodes; others converted by fluxport"),
    "output_compression": ("emulated", "fluxport encodes"),
    "response_format": ("emulated", "b64_json is asked for; fluxport stores or inlines the image"),
    "partial_images": ("emulated", "as 0: the completed image is streamed"),
    "prompt_enhancement": ("ignored", "not offered: requests asking for it go to other providers"),
}


class UpstreamProvider:
    """One OpenAI-compatible image server, configured by an entry of FLUXPORT_UPSTREAMS."""

    def __init__(
        self,
        config: UpstreamConfig,
        settings: Settings,
        *,
        policy: HttpPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = settings
        self._base = config.base_url.rstrip("/")
        self.policy = policy or HttpPolicy()
        split = urlsplit(self._base)
        origin = f"{split.scheme}://{split.netloc}"
        # Its result links live on its own origin (or on hosts FLUXPORT_DOWNLOAD_HOSTS allows).
        guard = DownloadGuard.for_provider(settings, (), origin)
        self._http = Http(self.name, self.policy, session, guard)
        self._auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._capabilities: dict[str, Capabilities] = {}

    def state(self, model: str) -> ProviderState:
        served = self.config.models.get(model)
        if served is None:
            return ProviderState(False, f"upstream {self.name} does not serve {model} (add it to its models)")
        return ProviderState(True, f"OpenAI Images API at {self._base} (as {served})")

    def capabilities(self, model: str) -> Capabilities:
        found = self._capabilities.get(model)
        if found is None:
            spec = find_model(model)
            found = self._capabilities[model] = Capabilities(
                max_images_per_call=self.config.max_images_per_call,
                max_references=4,
                native_output_formats=frozenset(self.config.output_formats),
                extras=EXTRAS,
                supports_prompt_enhancement=False,
                supports_cfg_scale=True,
                concurrent=True,
                capacity=self.config.max_concurrency,
                size=SizePolicy.grid(spec.limits if spec else SizeLimits()),
                normalization=NORMALIZATION,
                rate=Rate(self.config.price_per_mp, self.config.price_per_mp),
            )
        return found

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_input(self, job: ImageJob) -> tuple[dict[str, Any], dict[str, Behaviour]]:
        """The request fields (JSON, or the text parts of the edit's form) and the report."""
        served = self.config.models.get(job.model)
        if served is None:
            raise InvalidRequest(f"Upstream {self.name} does not serve {job.model}.", param="model")
        fields: dict[str, Any] = {
            "model": served,
            "prompt": job.prompt,
            "n": job.n,
            "size": str(job.size),
            "response_format": "b64_json",
            "seed": job.seed,
        }
        report: dict[str, Behaviour] = {"seed": Behaviour.PASSTHROUGH, "n": Behaviour.PASSTHROUGH}
        if job.output_format in self.config.output_formats:
            fields["output_format"] = job.output_format
            report["output_format"] = Behaviour.PASSTHROUGH
        if job.cfg_scale is not None:
            fields["guidance_scale"] = job.cfg_scale
            report["cfg_scale"] = Behaviour.RENAMED
        for key, value in job.extras.items():  # its own extras and unknown fields: passed through
            fields.setdefault(key, value)
        return fields, report

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        fields, report = self.build_input(job)
        t0 = time.monotonic()
        timings = AttemptTimings()
        async with self._slots:
            timings.queued_s = time.monotonic() - t0
            body: dict[str, Any] = {"json": fields}
            route = "generations"
            if job.references:  # an edit: multipart, the references as repeated `image` files
                form = aiohttp.FormData()
                for key, value in fields.items():
                    form.add_field(key, value if isinstance(value, str) else _form_text(value))
                for i, ref in enumerate(job.references):
                    name = f"image-{i}.{ref.format}"
                    form.add_field("image", ref.data, filename=name, content_type=ref.mime)
                body, route = {"form": form}, "edits"
            response = await self._http.request(
                "POST",
                f"{self._base}/images/{route}",
                idempotent=False,
                headers=self._auth,
                timeout_s=self.config.timeout_s,
                **body,
            )
            answered = time.monotonic()
            timings.first_byte_s = timings.generation_s = answered - t0
            if response.status_code >= 400:
                raise _client_error(self.name, response)
            payload = self._http.json(response, "images")
            progress(ProgressEvent(stage="decoding", step=1, total=1))
            images = []
            data = payload.get("data")
            if not isinstance(data, list) or len(data) != job.n:
                count = len(data) if isinstance(data, list) else 0
                raise ProviderFailure(f"{self.name} returned {count} images instead of {job.n}.")
            for i, item in enumerate(data):
                content = await self._image_bytes(item)
                seed = item.get("seed") if isinstance(item.get("seed"), int) else job.image_seed(i)
                images.append(to_image(content, self.name, seed))
        timings.total_s = time.monotonic() - t0
        revised = next(
            (d.get("revised_prompt") for d in data if isinstance(d.get("revised_prompt"), str)), None
        )
        return ProviderResult(images=images, timings=timings, revised_prompt=revised, normalization=report)

    async def _image_bytes(self, item: Any) -> bytes:
        if not isinstance(item, dict):
            raise ProviderFailure(f"{self.name}: an image entry is not an object.")
        b64 = item.get("b64_json")
        if isinstance(b64, str) and b64:
            try:
                return base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProviderFailure(f"{self.name}: malformed base64 in b64_json.") from exc
        link = item.get("url")
        if isinstance(link, str) and link:
            # Its own links get its key (SGLang started with --api-key guards them too); a host
            # a redirect leads elsewhere does not.
            url = urljoin(self._base + "/", link)
            data, _first_byte = await self._http.download(url, credentials=self._auth, origin=self._base)
            return data
        # SGLang-Diffusion answers an empty b64_json when asked to stream (sgl-project/sglang#24240).
        raise ProviderFailure(f"{self.name} returned an image entry with neither b64_json nor url.")


def _form_text(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def _client_error(name: str, response: Reply) -> FluxportError:
    """A 4xx from the upstream: OpenAI's error shape names the parameter; the client's fault."""
    message, param = f"{name} refused the request ({response.status_code})", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            text = error.get("message") or error.get("detail")
            if isinstance(text, str):
                message = f"{name}: {text}"
            if isinstance(error.get("param"), str):
                param = error["param"]
        elif isinstance(body.get("detail"), str):
            message = f"{name}: {body['detail']}"
    # fluxport validated the request already: an upstream that refuses it differs from the others
    # (a field it lacks, a model name it does not serve), so the request fails over.
    where = f" (param {param})" if param else ""
    return ProviderFailure(f"{message}{where}")
