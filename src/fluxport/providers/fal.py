"""fal.ai adapter: FLUX.2 [dev] and [dev] Flash over fal's queue REST API (submit, wait, result, cancel).

Completion is noticed on the SSE status stream (`{status_url}/stream`), as soon as fal sends it;
when the stream cannot be opened or breaks off, the adapter falls back to polling `status_url`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from fluxport.domain.errors import ContentPolicyViolation, FluxportError, InvalidRequest, ProviderFailure
from fluxport.domain.job import ImageJob
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

# model -> (text-to-image endpoint, edit endpoint)
ENDPOINTS: dict[str, tuple[str, str]] = {
    "flux.2-dev": ("fal-ai/flux-2", "fal-ai/flux-2/edit"),
    "flux.2-dev-flash": ("fal-ai/flux-2/flash", "fal-ai/flux-2/flash/edit"),
}
# fal's own request fields a client may send (extra_body); unknown fields pass through too.
EXTRAS = frozenset({"acceleration", "enable_safety_checker", "num_inference_steps", "sync_mode"})
# The distilled Flash endpoints fix the schedule: no steps, no acceleration.
_FLASH_UNSUPPORTED = frozenset({"num_inference_steps", "acceleration"})
# image_size {width, height}: 512-2048 px per side on fal's 16 px grid.
SIZES = SizePolicy(multiple=16, min_side=512, max_side=2048)
MAX_IMAGES_PER_CALL = 4
NATIVE_FORMATS = frozenset({"png", "jpeg", "webp"})
# Where fal serves result images (FLUXPORT_DOWNLOAD_HOSTS overrides).
DOWNLOAD_HOSTS = ("fal.media", "fal.run", "fal.ai")
# fal-ai/flux-2 $0.012/MP, references billed at the same rate; fal-ai/flux-2/flash $0.005/MP.
PRICES: dict[str, Rate] = {
    "flux.2-dev": Rate(output_per_mp=0.012, input_per_mp=0.012),
    "flux.2-dev-flash": Rate(output_per_mp=0.005, input_per_mp=0.005),
}
NORMALIZATION: dict[str, tuple[str, str]] = {
    "prompt": ("passthrough", ""),
    "size": ("renamed", "image_size {width, height}; converted outside 512-2048 px"),
    "n": ("renamed", "num_images, up to 4 per call; more by parallel calls (emulated)"),
    "seed": ("passthrough", ""),
    "partial_images": ("emulated", "as 0: no pixels before the result; the completed image is streamed"),
    "cfg_scale": ("renamed", "guidance_scale"),
    "prompt_enhancement": ("renamed", "enable_prompt_expansion"),
    "image": ("converted", "data URIs in image_urls, on the /edit endpoint"),
    "output_format": ("passthrough", "png, jpeg, webp; gif and avif converted by fluxport"),
    "output_compression": ("emulated", "fal has no quality setting: fluxport encodes"),
    "response_format": ("emulated", "fluxport downloads, stores or inlines the image"),
}
# fal input field -> the fluxport parameter a client knows, for error messages.
_PARAMS = {
    "image_size": "size",
    "image_urls": "image",
    "guidance_scale": "cfg_scale",
    "num_images": "n",
    "enable_prompt_expansion": "prompt_enhancement",
}


class FalProvider:
    """fal.ai queue API (https://queue.fal.run); configured when FAL_KEY is set."""

    name = "fal"

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
        policy: HttpPolicy | None = None,
        status_stream: bool = True,
        max_streams: int | None = None,
    ) -> None:
        self._key = settings.fal_key
        self._base = settings.fal_url.rstrip("/")
        self.policy = policy or HttpPolicy()
        self.status_stream = status_stream  # False: poll the status URL only
        # Each open stream holds a pooled connection for the whole wait: beyond this many waits at
        # once (default: three quarters of the pool), the others poll so submits and results flow.
        self.max_streams = max_streams if max_streams is not None else self.policy.max_connections * 3 // 4
        self._streams = 0
        guard = DownloadGuard.for_provider(settings, DOWNLOAD_HOSTS, self._base)
        self._http = Http(self.name, self.policy, session, guard)
        self._auth = {"Authorization": f"Key {self._key}"}
        self._stream_headers = self._auth | {"Accept": "text/event-stream"}
        self._capabilities: dict[str, Capabilities] = {}  # per model: fixed at start-up

    def state(self, model: str) -> ProviderState:
        if model not in ENDPOINTS:
            return ProviderState(False, f"fal does not serve {model}")
        if not self._key:
            return ProviderState(False, "set FAL_KEY to a fal.ai API key")
        return ProviderState(True, f"fal queue API at {self._base} ({ENDPOINTS[model][0]})")

    def capabilities(self, model: str) -> Capabilities:
        """Built once per model: the router asks several times per request."""
        found = self._capabilities.get(model)
        if found is None:
            found = self._capabilities[model] = self._build_capabilities(model)
        return found

    def _build_capabilities(self, model: str) -> Capabilities:
        extras = EXTRAS - _FLASH_UNSUPPORTED if model.endswith("-flash") else EXTRAS
        return Capabilities(
            max_images_per_call=MAX_IMAGES_PER_CALL,
            max_references=4,
            native_output_formats=NATIVE_FORMATS,
            extras=extras,
            supports_prompt_enhancement=True,
            supports_cfg_scale=True,
            size=SIZES,
            normalization=NORMALIZATION,
            rate=PRICES.get(model, Rate.free()),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_input(self, job: ImageJob) -> tuple[str, dict[str, Any], dict[str, Behaviour]]:
        """The endpoint, the JSON input and the normalisation report for `job` (no I/O)."""
        if job.model not in ENDPOINTS:
            raise InvalidRequest(f"fal does not serve model {job.model}.", param="model")
        text, edit = ENDPOINTS[job.model]
        endpoint = edit if job.references else text
        extras = job.extras  # the gateway hands on only fal's own fields and unknown ones
        unsupported = sorted(_FLASH_UNSUPPORTED & extras.keys()) if job.model.endswith("-flash") else []
        if unsupported:
            # Sending them would be silently ignored by fal; refuse so the client knows.
            raise InvalidRequest(
                f"'{unsupported[0]}' is not supported by {job.model} on fal.", param=unsupported[0]
            )
        norm: dict[str, Behaviour] = {}
        size = SIZES.generated(job.size)
        norm["size"] = Behaviour.RENAMED if size == job.size else Behaviour.CONVERTED
        fmt = job.output_format
        if fmt not in NATIVE_FORMATS or (job.output_compression is not None and fmt != "png"):
            # fal has no quality knob: get lossless pixels and let the service encode as asked.
            fmt = "png"
            norm["output_format"] = Behaviour.CONVERTED
        else:
            norm["output_format"] = Behaviour.PASSTHROUGH
        if job.output_compression is not None:
            norm["output_compression"] = Behaviour.EMULATED
        # Unknown extras first so that the mapped fields (the service's decisions) win.
        body: dict[str, Any] = {k: v for k, v in extras.items() if k not in EXTRAS}
        body |= {
            "prompt": job.prompt,
            "image_size": {"width": size.width, "height": size.height},
            "num_images": job.n,
            "output_format": fmt,
            "seed": job.seed,
        }
        norm["n"] = Behaviour.RENAMED
        norm["seed"] = Behaviour.PASSTHROUGH
        if job.cfg_scale is not None:
            body["guidance_scale"] = job.cfg_scale
            norm["cfg_scale"] = Behaviour.RENAMED
        if job.prompt_enhancement:
            body["enable_prompt_expansion"] = True
            norm["prompt_enhancement"] = Behaviour.RENAMED
        if job.references:
            body["image_urls"] = [data_uri(r) for r in job.references]
            norm["image"] = Behaviour.CONVERTED
        body |= {k: v for k, v in extras.items() if k in EXTRAS}
        if extras:
            norm["extras"] = Behaviour.PASSTHROUGH
        return endpoint, body, norm

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        """Submit to the queue, wait for COMPLETED, fetch the result, download the images."""
        if not self._key:
            raise ProviderFailure("fal is not configured: set FAL_KEY.", code="provider_not_configured")
        endpoint, body, norm = self.build_input(job)
        t0 = time.monotonic()
        timings = AttemptTimings()
        report = Progress(progress)
        submit = asyncio.ensure_future(
            self._http.request(
                "POST", f"{self._base}/{endpoint}", idempotent=False, json=body, headers=self._auth
            )
        )
        try:
            response = await asyncio.shield(submit)
        except asyncio.CancelledError as exc:
            # Cancelled mid-submit (a hedge loser, a request that could not be recorded): the job
            # may exist upstream already. fal answers a submit at once, so wait for that answer
            # and cancel the job, rather than leave it to run and be billed.
            billed = await self._http.cancel_shielded(self._abandon_submit(submit))
            self._http.reraise_abandoned(exc, billed)
            raise
        if response.status_code >= 400:
            raise _client_error(response, sent=job.extras.keys())
        submitted = self._http.json(response, "submit")
        timings.submitted_s = time.monotonic() - t0
        request_id = submitted.get("request_id")
        urls = [submitted.get(k) for k in ("status_url", "response_url", "cancel_url")]
        if not isinstance(request_id, str) or not all(isinstance(u, str) and u for u in urls):
            raise ProviderFailure("fal: the submit answer lacks request_id or the request URLs.")
        status_url, response_url, cancel_url = (str(u) for u in urls)
        completed = False
        billed = False  # fal produced the output it charges for
        try:
            await self._wait(status_url, job.report_steps, t0, timings, report)
            completed = True
            result = await self._http.request("GET", response_url, idempotent=True, headers=self._auth)
            if result.status_code >= 400:
                raise _client_error(result)
            output = self._http.json(result, "result")
            billed = True
            return await self._collect(job, output, request_id, norm, t0, timings, report)
        except BaseException as exc:
            if not completed:
                # Deadline, failover, client gone or a poll failure: stop paying for the request.
                billed = await self._http.cancel_shielded(self._cancel(cancel_url, request_id))
            self._http.reraise_abandoned(exc, billed)
            raise

    async def _wait(
        self, status_url: str, logs: bool, t0: float, timings: AttemptTimings, report: Progress
    ) -> None:
        """Return once the request is COMPLETED: from the status stream, else by polling. `logs`:
        ask for fal's progress logs (the step counts), only when someone follows the steps."""
        if self.status_stream and self._streams < self.max_streams:
            self._streams += 1
            try:
                if await self._follow_stream(status_url, logs, t0, timings, report):
                    return
            finally:
                self._streams -= 1
        await self._poll(status_url, logs, t0, timings, report)

    async def _follow_stream(
        self, status_url: str, logs: bool, t0: float, timings: AttemptTimings, report: Progress
    ) -> bool:
        """Read the SSE status stream; True once COMPLETED came, False when the stream could not
        be opened or broke off first (the caller then polls). The read timeout applies per chunk,
        `max_wait_s` to the whole wait; a cancelled caller closes the stream on the way out."""
        url = _stream_url(status_url, logs)
        deadline = asyncio.timeout(self.policy.max_wait_s - (time.monotonic() - t0))
        try:
            async with deadline, self._http.stream("GET", url, headers=self._stream_headers) as response:
                kind = response.headers.get("content-type", "")
                if response.status != 200 or not kind.startswith("text/event-stream"):
                    log.debug("fal: status stream answered %s %s; polling", response.status, kind)
                    return False
                async for data in _sse_data(_lines(response.content.iter_any())):
                    try:
                        status = json.loads(data)
                    except ValueError:
                        log.info("fal: status stream sent invalid JSON %r; polling", data[:100])
                        return False
                    # Anything but a status object is not for us; COMPLETED ends the wait.
                    if (
                        isinstance(status, dict)
                        and "status" in status
                        and self._observe(status, t0, timings, report)
                    ):
                        return True
        except TRANSPORT_ERRORS as exc:  # aiohttp's read timeout is a TimeoutError too: not the wait's
            if deadline.expired():
                raise ProviderFailure(f"fal: no result within {self.policy.max_wait_s:g} s.") from exc
            log.info("fal: status stream failed (%r); polling", exc)
            return False
        log.info("fal: status stream ended before COMPLETED; polling")
        return False

    async def _poll(
        self, status_url: str, logs: bool, t0: float, timings: AttemptTimings, report: Progress
    ) -> None:
        interval = self.policy.poll_interval_s
        url = _with_logs(status_url, logs)
        while True:
            response = await self._http.request("GET", url, idempotent=True, headers=self._auth)
            if response.status_code >= 400:
                raise _client_error(response)
            if self._observe(self._http.json(response, "status"), t0, timings, report):
                return
            now = time.monotonic() - t0
            if now + interval > self.policy.max_wait_s:
                raise ProviderFailure(f"fal: no result within {self.policy.max_wait_s:g} s.")
            await asyncio.sleep(interval)
            interval = min(interval * self.policy.poll_backoff, self.policy.max_poll_interval_s)

    def _observe(self, status: dict[str, Any], t0: float, timings: AttemptTimings, report: Progress) -> bool:
        """Record one status (polled or streamed); True when it is COMPLETED."""
        now = time.monotonic() - t0
        if timings.first_status_s is None:
            timings.first_status_s = now
        state = status.get("status")
        if state == "IN_QUEUE":
            report("queued", message=f"queue position {status.get('queue_position')}")
            return False
        if state not in ("IN_PROGRESS", "COMPLETED"):
            raise ProviderFailure(f"fal: unknown queue status {state!r}.")
        if timings.queued_s == 0.0:
            timings.queued_s = now
        if state == "COMPLETED":
            metrics = status.get("metrics")
            if isinstance(metrics, dict) and isinstance(metrics.get("inference_time"), int | float):
                timings.generation_s = float(metrics["inference_time"])
            return True
        step = step_of(_log_text(status.get("logs")))
        report("step", *(step or (0, 0)))
        return False

    async def _collect(
        self,
        job: ImageJob,
        output: dict[str, Any],
        request_id: str,
        norm: dict[str, Behaviour],
        t0: float,
        timings: AttemptTimings,
        report: Progress,
    ) -> ProviderResult:
        images = output.get("images")
        if not isinstance(images, list) or not images:
            raise ProviderFailure(f"fal: the result of {request_id} has no images.")
        urls = [img.get("url") if isinstance(img, dict) else None for img in images]
        if len(urls) < job.n or not all(isinstance(u, str) and u for u in urls):
            raise ProviderFailure(
                f"fal: the result of {request_id} has {len(urls)} usable images, not {job.n}."
            )
        flagged = output.get("has_nsfw_concepts")
        if isinstance(flagged, list) and any(f is True for f in flagged):
            # fal returns flagged images as black squares: useless, so refuse like a safety block.
            raise ContentPolicyViolation(
                "fal's safety checker flagged the generated image; try a different prompt.", param="prompt"
            )
        report("decoding")
        downloads = await asyncio.gather(*(self._http.download(str(u)) for u in urls[: job.n]))
        seed = output.get("seed")
        out_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        # fal reports one seed per call: only the first image is known to come from it.
        generated = [
            to_image(data, self.name, out_seed if i == 0 else None) for i, (data, _) in enumerate(downloads)
        ]
        timings.first_byte_s = min(first for _, first in downloads) - t0
        if timings.generation_s is None:
            spent = output.get("timings")
            if isinstance(spent, dict) and isinstance(spent.get("inference"), int | float):
                timings.generation_s = float(spent["inference"])
        timings.total_s = time.monotonic() - t0
        revised = output.get("prompt")
        report("done")
        return ProviderResult(
            images=generated,
            timings=timings,
            revised_prompt=revised
            if job.prompt_enhancement and isinstance(revised, str) and revised != job.prompt
            else None,
            normalization=norm,
            provider_request_id=request_id,
        )

    async def _abandon_submit(self, submit: asyncio.Future[Reply]) -> bool:
        """Cancel the job a cancelled submit created, once its answer names it; True if billed."""
        try:
            async with asyncio.timeout(self.policy.cancel_timeout_s):
                response = await submit
        except TimeoutError:
            submit.cancel()
            log.warning("fal: no submit answer to cancel within %g s", self.policy.cancel_timeout_s)
            return False
        except Exception:  # the submit itself failed: no job was created
            return False
        if response.status_code >= 400:
            return False
        try:
            submitted = response.json()
        except ValueError:
            return False
        if not isinstance(submitted, dict):
            return False
        cancel_url, request_id = submitted.get("cancel_url"), submitted.get("request_id")
        if not isinstance(cancel_url, str) or not isinstance(request_id, str):
            return False
        return await self._cancel(cancel_url, request_id)

    async def _cancel(self, cancel_url: str, request_id: str) -> bool:
        """PUT the cancel; True when fal says the request had already completed (it is billed)."""
        try:
            response = await self._http.once(
                "PUT", cancel_url, headers=self._auth, timeout_s=self.policy.cancel_timeout_s
            )
            log.info("fal: cancel %s -> %s %s", request_id, response.status_code, response.text[:100])
        except TRANSPORT_ERRORS as exc:
            log.warning("fal: cancelling %s failed: %r", request_id, exc)
            return False
        try:
            return bool(response.json().get("status") == "ALREADY_COMPLETED")
        except (ValueError, AttributeError):
            return False


def _stream_url(status_url: str, logs: bool = True) -> str:
    """`{status_url}/stream`, keeping the status URL's query, with logs=1 (or 0)."""
    return _with_logs(status_url, logs, path_suffix="/stream")


def _with_logs(url: str, logs: bool, path_suffix: str = "") -> str:
    """`url` (its path + `path_suffix`) with the query parameter logs=1 (or 0), replacing any."""
    flag = "1" if logs else "0"
    if "?" not in url and "#" not in url:  # fal's URLs: no query to merge
        return f"{url.rstrip('/') if path_suffix else url}{path_suffix}?logs={flag}"
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "logs"]
    query.append(("logs", flag))
    path = parts.path.rstrip("/") + path_suffix if path_suffix else parts.path
    return urlunsplit(parts._replace(path=path, query=urlencode(query)))


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """UTF-8 lines of a byte stream, ended by CRLF, LF or CR (as SSE allows), split on bytes: the
    stream carries an event every fraction of a second for every request in flight."""
    buffer = b""
    async for chunk in chunks:
        lines = (buffer + chunk).splitlines(keepends=True)
        buffer = b""
        # The last piece is unfinished unless a line end closes it; a final CR may be half a CRLF.
        if lines and (lines[-1].endswith(b"\r") or not lines[-1].endswith(b"\n")):
            buffer = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r\n").decode("utf-8", "replace")
    if buffer:
        yield buffer.rstrip(b"\r\n").decode("utf-8", "replace")


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event: `data:` lines joined by newlines, dispatched at a blank
    line; comments and the event, id and retry fields are ignored, as is an unterminated last event."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))


def _log_text(logs: object, last: int = 8) -> str:
    """The text of the last few log entries: fal sends every log so far with each status, and only
    the latest progress count matters."""
    if not isinstance(logs, list):
        return ""
    return "\n".join(str(entry.get("message", "")) for entry in logs[-last:] if isinstance(entry, dict))


def _client_error(response: Reply, sent: Iterable[str] = ()) -> FluxportError:
    """Map a fal 4xx answer (other than 401/403/429, handled earlier) to a fluxport error, naming
    the field as the client sent it: its own fal field (`sent`), else the fluxport parameter."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = first.get("loc")
        fields = [p for p in loc if isinstance(p, str) and p != "body"] if isinstance(loc, list) else []
        field = fields[0] if fields else None
        param = (field if field in set(sent) else _PARAMS.get(field, field)) if field else None
        msg = str(first.get("msg") or "invalid value")
        if first.get("type") == "content_policy_violation":
            return ContentPolicyViolation(f"fal refused the request: {msg}", param=param or "prompt")
        return InvalidRequest(f"fal rejected {f'{param!r}' if param else 'the request'}: {msg}", param=param)
    text = detail if isinstance(detail, str) else response.text[:200]
    if response.status_code in (400, 422):
        return InvalidRequest(f"fal rejected the request: {text}")
    return ProviderFailure(f"fal answered {response.status_code}: {text}")
