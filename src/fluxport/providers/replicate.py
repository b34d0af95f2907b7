"""Replicate adapter: black-forest-labs/flux-2-dev over the predictions API (create, wait, poll, cancel)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterable
from typing import Any

import aiohttp

from fluxport.domain.errors import ContentPolicyViolation, FluxportError, InvalidRequest, ProviderFailure
from fluxport.domain.job import ImageJob, Size
from fluxport.domain.sizing import Preset
from fluxport.providers._hosted import (
    TRANSPORT_ERRORS,
    Http,
    HttpPolicy,
    Progress,
    Reply,
    data_uri,
    step_of,
    to_image,
)
from fluxport.providers.base import (
    AttemptTimings,
    Behaviour,
    Capabilities,
    ProgressCallback,
    ProviderResult,
    ProviderState,
    Rate,
    SizePolicy,
)
from fluxport.providers.download_guard import DownloadGuard
from fluxport.settings import Settings

log = logging.getLogger(__name__)

MODELS: dict[str, str] = {"flux.2-dev": "black-forest-labs/flux-2-dev"}
# Replicate's own input fields a client may send (extra_body); unknown fields pass through too.
EXTRAS = frozenset({"disable_safety_checker", "go_fast", "width", "height", "output_quality"})
MIN_SIDE, MAX_SIDE, MULTIPLE = 256, 1440, 32


def _enum_size(w: int, h: int) -> Size:
    """The ~1 MP size, at multiples of 32, that an aspect_ratio enum value generates."""
    width = math.sqrt(1024 * 1024 * w / h)
    return Size(max(MIN_SIDE, round(width / 32) * 32), max(MIN_SIDE, round(width * h / w / 32) * 32))


_RATIOS = ((1, 1), (16, 9), (9, 16), (3, 2), (2, 3), (4, 5), (5, 4), (4, 3), (3, 4))
# The aspect_ratio enum is used only when its ~1 MP output is about what was asked; otherwise
# custom width x height, 256-1440 px on a 32 px grid.
SIZES = SizePolicy(
    multiple=MULTIPLE,
    min_side=MIN_SIDE,
    max_side=MAX_SIDE,
    presets=tuple(Preset(f"{w}:{h}", w / h, _enum_size(w, h)) for w, h in _RATIOS),
    preset_pixels=(int(0.85 * 1024 * 1024), int(1.15 * 1024 * 1024)),
)
NATIVE_FORMATS = frozenset({"png", "jpeg", "webp"})
_WIRE_FORMATS = {"jpeg": "jpg"}  # Replicate's output_format enum: webp, jpg, png
# Where Replicate serves result images (FLUXPORT_DOWNLOAD_HOSTS overrides).
DOWNLOAD_HOSTS = ("replicate.delivery", "replicate.com")
# ASSUMPTION: Replicate's flux-2-dev price is unconfirmed (providers.md §8). Read it from
# Replicate's model page and override it with FLUXPORT_PRICES='{"replicate/flux.2-dev": ...}'.
PRICES: dict[str, Rate] = {"flux.2-dev": Rate(output_per_mp=0.012, input_per_mp=0.0)}
NORMALIZATION: dict[str, tuple[str, str]] = {
    "prompt": ("passthrough", ""),
    "size": ("converted", "aspect_ratio, or custom width/height (256-1440 px, multiples of 32)"),
    "n": ("emulated", "one image per prediction: parallel predictions"),
    "seed": ("passthrough", ""),
    "partial_images": ("emulated", "as 0: no pixels before the result; the completed image is streamed"),
    "cfg_scale": ("unsupported", "requests that set it go to another provider"),
    "prompt_enhancement": ("unsupported", "requests that set it go to another provider"),
    "image": ("converted", "data URIs in input_images"),
    "output_format": ("passthrough", "png, webp; jpeg renamed jpg; gif and avif converted"),
    "output_compression": ("renamed", "output_quality; emulated for png"),
    "response_format": ("emulated", "fluxport downloads, stores or inlines the image"),
}
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_SAFETY = re.compile(r"nsfw|safety|sensitive|content polic|unsafe", re.IGNORECASE)
_PARAMS = {
    "aspect_ratio": "size",
    "width": "size",
    "height": "size",
    "input_images": "image",
    "output_quality": "output_compression",
}


class ReplicateProvider:
    """Replicate predictions API (https://api.replicate.com); configured when REPLICATE_API_TOKEN is set."""

    name = "replicate"

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
        policy: HttpPolicy | None = None,
        wait_s: int = 5,
    ) -> None:
        """`wait_s` is the Prefer: wait window (1-60). Short, because a call abandoned while the
        create request is open cannot be cancelled: its prediction id is not known yet."""
        self._token = settings.replicate_api_token
        self._base = settings.replicate_url.rstrip("/")
        self.policy = policy or HttpPolicy()
        self.wait_s = max(1, min(60, wait_s))
        guard = DownloadGuard.for_provider(settings, DOWNLOAD_HOSTS, self._base)
        self._http = Http(self.name, self.policy, session, guard)
        self._auth = {"Authorization": f"Bearer {self._token}"}
        self._create_headers = self._auth | {
            "Prefer": f"wait={self.wait_s}",
            # A server-side deadline, so a prediction we lost track of cannot run for 30 minutes.
            "Cancel-After": f"{max(1, int(self.policy.max_wait_s))}s",
        }
        self._capabilities: dict[str, Capabilities] = {}  # per model: fixed at start-up

    def state(self, model: str) -> ProviderState:
        if model not in MODELS:
            return ProviderState(False, f"Replicate does not serve {model}")
        if not self._token:
            return ProviderState(False, "set REPLICATE_API_TOKEN to a Replicate API token")
        return ProviderState(True, f"Replicate predictions API at {self._base} ({MODELS[model]})")

    def capabilities(self, model: str) -> Capabilities:
        """Built once per model: the router asks several times per request."""
        found = self._capabilities.get(model)
        if found is None:
            found = self._capabilities[model] = self._build_capabilities(model)
        return found

    def _build_capabilities(self, model: str) -> Capabilities:
        return Capabilities(
            max_images_per_call=1,
            max_references=4,
            native_output_formats=NATIVE_FORMATS,
            extras=EXTRAS,
            supports_prompt_enhancement=False,
            supports_cfg_scale=False,
            size=SIZES,
            normalization=NORMALIZATION,
            rate=PRICES.get(model, Rate.free()),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_input(self, job: ImageJob) -> tuple[str, dict[str, Any], dict[str, Behaviour]]:
        """The model route, the prediction input and the normalisation report (no I/O)."""
        if job.model not in MODELS:
            raise InvalidRequest(f"Replicate does not serve model {job.model}.", param="model")
        # Refuse rather than drop: the service should have routed these elsewhere.
        if job.cfg_scale is not None:
            raise InvalidRequest("Replicate's flux-2-dev has no guidance control.", param="cfg_scale")
        if job.prompt_enhancement:
            raise InvalidRequest(
                "Replicate's flux-2-dev has no prompt expansion.", param="prompt_enhancement"
            )
        if job.n != 1:
            raise InvalidRequest("Replicate makes one image per prediction.", param="n")
        extras = job.extras  # the gateway hands on only Replicate's own fields and unknown ones
        norm: dict[str, Behaviour] = {"seed": Behaviour.PASSTHROUGH, "n": Behaviour.PASSTHROUGH}
        body: dict[str, Any] = {k: v for k, v in extras.items() if k not in EXTRAS}
        body |= {"prompt": job.prompt, "seed": job.seed, **_size_input(job.size)}
        norm["size"] = Behaviour.CONVERTED
        if job.output_format in NATIVE_FORMATS:
            fmt = job.output_format
            norm["output_format"] = Behaviour.RENAMED if fmt == "jpeg" else Behaviour.PASSTHROUGH
        else:
            fmt = "png"  # lossless, for the service to convert to avif / gif
            norm["output_format"] = Behaviour.CONVERTED
        body["output_format"] = _WIRE_FORMATS.get(fmt, fmt)
        if job.output_compression is not None and fmt != "png":
            body["output_quality"] = job.output_compression
            norm["output_compression"] = Behaviour.RENAMED
        elif job.output_compression is not None:
            norm["output_compression"] = Behaviour.EMULATED
        if job.references:
            body["input_images"] = [data_uri(r) for r in job.references]
            norm["image"] = Behaviour.CONVERTED
        own = {k: v for k, v in extras.items() if k in EXTRAS}
        if "width" in own or "height" in own:
            body["aspect_ratio"] = "custom"  # the client's explicit provider size wins
        body |= own
        if extras:
            norm["extras"] = Behaviour.PASSTHROUGH
        return MODELS[job.model], body, norm

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        """Create a prediction (waiting up to wait_s), poll urls.get to a terminal status, download."""
        if not self._token:
            raise ProviderFailure(
                "Replicate is not configured: set REPLICATE_API_TOKEN.", code="provider_not_configured"
            )
        model, body, norm = self.build_input(job)
        t0 = time.monotonic()
        timings = AttemptTimings()
        report = Progress(progress)
        response = await self._http.request(
            "POST",
            f"{self._base}/v1/models/{model}/predictions",
            idempotent=False,
            json={"input": body},
            headers=self._create_headers,
            timeout_s=self.wait_s + self.policy.timeout_s,
        )
        if response.status_code >= 400:
            raise _client_error(response, sent=job.extras.keys())
        prediction = self._http.json(response, "create")
        timings.submitted_s = timings.first_status_s = time.monotonic() - t0
        pid = prediction.get("id")
        urls = prediction.get("urls")
        if not isinstance(pid, str) or not isinstance(urls, dict) or not isinstance(urls.get("get"), str):
            raise ProviderFailure("Replicate: the create answer lacks id or urls.get.")
        cancel_url = urls.get("cancel")
        cancel_url = (
            cancel_url if isinstance(cancel_url, str) else f"{self._base}/v1/predictions/{pid}/cancel"
        )
        finished = False  # a terminal status: nothing left to cancel
        billed = False  # succeeded: Replicate charges for it
        try:
            prediction = await self._wait(prediction, str(urls["get"]), t0, timings, report)
            finished = True
            billed = prediction.get("status") == "succeeded"
            return await self._collect(prediction, pid, norm, t0, timings, report)
        except BaseException as exc:
            if not finished:
                billed = await self._http.cancel_shielded(self._cancel(cancel_url, pid))
            self._http.reraise_abandoned(exc, billed)
            raise

    async def _wait(
        self,
        prediction: dict[str, Any],
        get_url: str,
        t0: float,
        timings: AttemptTimings,
        report: Progress,
    ) -> dict[str, Any]:
        interval = self.policy.poll_interval_s
        while True:
            status = prediction.get("status")
            now = time.monotonic() - t0
            if status in ("processing", *TERMINAL) and timings.queued_s == 0.0:
                timings.queued_s = now
            # For file outputs Replicate may hand out `output` while status is still "processing".
            if status in TERMINAL or (status == "processing" and prediction.get("output")):
                return prediction
            if status == "starting":
                report("loading")
            elif status == "processing":
                logs = prediction.get("logs")
                step = step_of(logs) if isinstance(logs, str) else None
                report("step", *(step or (0, 0)))
            else:
                raise ProviderFailure(f"Replicate: unknown prediction status {status!r}.")
            if now + interval > self.policy.max_wait_s:
                raise ProviderFailure(f"Replicate: no result within {self.policy.max_wait_s:g} s.")
            await asyncio.sleep(interval)
            interval = min(interval * self.policy.poll_backoff, self.policy.max_poll_interval_s)
            response = await self._http.request("GET", get_url, idempotent=True, headers=self._auth)
            if response.status_code >= 400:
                raise _client_error(response)
            prediction = self._http.json(response, "prediction")

    async def _collect(
        self,
        prediction: dict[str, Any],
        pid: str,
        norm: dict[str, Behaviour],
        t0: float,
        timings: AttemptTimings,
        report: Progress,
    ) -> ProviderResult:
        status = prediction.get("status")
        error = prediction.get("error")
        if status == "failed":
            text = str(error or "no error message")
            if _SAFETY.search(text):
                raise ContentPolicyViolation(f"Replicate's safety checker refused: {text}", param="prompt")
            raise ProviderFailure(f"Replicate prediction {pid} failed: {text}")
        if status in ("canceled", "aborted"):
            raise ProviderFailure(f"Replicate prediction {pid} was {status} by Replicate.")
        output = prediction.get("output")
        if isinstance(output, list):
            output = output[0] if output else None
        if not isinstance(output, str) or not output:
            raise ProviderFailure(f"Replicate prediction {pid} succeeded without an output image.")
        metrics = prediction.get("metrics")
        if isinstance(metrics, dict) and isinstance(metrics.get("predict_time"), int | float):
            timings.generation_s = float(metrics["predict_time"])
        report("decoding")
        data, first_byte = await self._http.download(output)
        timings.first_byte_s = first_byte - t0
        seed = prediction.get("input", {}).get("seed") if isinstance(prediction.get("input"), dict) else None
        image = to_image(data, self.name, seed if isinstance(seed, int) else None)
        timings.total_s = time.monotonic() - t0
        report("done")
        return ProviderResult(images=[image], timings=timings, normalization=norm, provider_request_id=pid)

    async def _cancel(self, cancel_url: str, pid: str) -> bool:
        """POST the cancel; True when the prediction had already succeeded (it is billed)."""
        try:
            response = await self._http.once(
                "POST", cancel_url, headers=self._auth, timeout_s=self.policy.cancel_timeout_s
            )
            log.info("replicate: cancel %s -> %s", pid, response.status_code)
        except TRANSPORT_ERRORS as exc:
            log.warning("replicate: cancelling %s failed: %r", pid, exc)
            return False
        try:
            return bool(response.json().get("status") == "succeeded")
        except (ValueError, AttributeError):
            return False


def _size_input(size: Size) -> dict[str, Any]:
    """aspect_ratio from the enum when it makes about `size`, else custom width/height."""
    preset = SIZES.preset_for(size)
    if preset is not None:
        return {"aspect_ratio": preset.name}
    fitted = SIZES.fit(size)
    return {"aspect_ratio": "custom", "width": fitted.width, "height": fitted.height}


def _client_error(response: Reply, sent: Iterable[str] = ()) -> FluxportError:
    """Map a Replicate 4xx (RFC 7807 body; other than 401/403/429) to a fluxport error, naming the
    field as the client sent it: its own Replicate field (`sent`), else the fluxport parameter."""
    own = set(sent)
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    detail = str(body.get("detail") or body.get("title") or response.text[:200])
    param: str | None = None
    fields = body.get("invalid_fields")
    if isinstance(fields, list) and fields and isinstance(fields[0], dict):
        name = str(fields[0].get("field", "")).removeprefix("input.")
        param = (name if name in own else _PARAMS.get(name, name)) or None
        detail = str(fields[0].get("description") or detail)
    else:
        match = re.search(r"input\.(\w+)", detail)
        if match:
            name = match.group(1)
            param = name if name in own else _PARAMS.get(name, name)
    if response.status_code in (400, 422):
        if _SAFETY.search(detail):
            return ContentPolicyViolation(f"Replicate refused the request: {detail}", param=param or "prompt")
        return InvalidRequest(
            f"Replicate rejected {f'{param!r}' if param else 'the request'}: {detail}", param=param
        )
    return ProviderFailure(f"Replicate answered {response.status_code}: {detail}")
