"""Plumbing shared by the hosted adapters (fal, Replicate, upstreams): HTTP policy, downloads
(through providers/download_guard.py), progress, errors.

Provider calls go straight through aiohttp's client (one kept-alive pool per provider). They went
through httpx on an aiohttp transport before: httpx's request and response models, URL parsing,
cookie handling and header merging on top of aiohttp's own were about a fifth of the server's CPU
under load, for no behaviour the adapters use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import functools
import io
import json
import re
import ssl
import time
from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from PIL import Image
from yarl import URL

from fluxport.domain.errors import FluxportError, ProviderFailure, RateLimited
from fluxport.domain.job import ReferenceImage
from fluxport.media import REFERENCE_FORMATS, sniff_format
from fluxport.providers.base import BilledCancellation, GeneratedImage, ProgressCallback, ProgressEvent, Stage
from fluxport.providers.download_guard import DownloadGuard, RefusedURL, origin_of

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class HttpPolicy:
    """Timeouts, polling and retry bounds of a hosted adapter; every wait is bounded."""

    timeout_s: float = 30.0  # one HTTP exchange (connect, read, write)
    poll_interval_s: float = 0.25  # first status poll; later ones back off
    max_poll_interval_s: float = 2.0
    poll_backoff: float = 1.5
    max_wait_s: float = 900.0  # from submit to a terminal status; then the request is cancelled
    rate_limit_retries: int = 3  # 429 answers honoured before RateLimited is raised
    max_retry_after_s: float = 20.0  # a longer Retry-After is passed up at once instead of slept
    transient_retries: int = 2  # idempotent GETs retried on 502/503/504 and transport faults
    cancel_timeout_s: float = 5.0
    max_image_bytes: int = 64 * 1024 * 1024
    download_timeout_s: float = 120.0  # one whole image download, redirects included
    # Connections to one provider, all kept alive between calls: a request holds one while it
    # submits, waits on the status stream, fetches and downloads, so this bounds requests in flight
    # per provider without reconnecting (httpx's default keeps only 20 alive, then reconnects).
    max_connections: int = 1024


# What a failed exchange raises: aiohttp's errors (its connect and read timeouts are TimeoutErrors).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
# Idle pooled connections are closed after this long (httpx's default keep-alive expiry, as before).
KEEPALIVE_S = 5.0


@dataclass(frozen=True, slots=True)
class Reply:
    """One whole answer of a provider: status, headers and body, read before its connection went
    back to the pool."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return json.loads(self.content)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The certificate store httpx used for these calls (certifi's, or SSL_CERT_FILE / _DIR)."""
    import httpx  # only for its trust store (certifi's, or SSL_CERT_FILE / SSL_CERT_DIR)

    return httpx.create_ssl_context()


def data_uri(ref: ReferenceImage) -> str:
    return f"data:{ref.mime};base64,{base64.b64encode(ref.data).decode('ascii')}"


_RESETS_IN = re.compile(r"resets in ~?\s*(\d+(?:\.\d+)?)\s*s", re.IGNORECASE)


def retry_after_of(response: Reply) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP date), or a "resets in ~30s" detail."""
    value = response.headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    match = _RESETS_IN.search(response.text)
    return float(match.group(1)) if match else None


# tqdm-style "14/28" in runner logs: the only step count either provider exposes.
_STEP = re.compile(r"(\d+)/(\d+)\s*\[")


def step_of(log_text: str) -> tuple[int, int] | None:
    """The last "i/N [" progress-bar count in `log_text`, if any."""
    matches = _STEP.findall(log_text[-2000:])
    if not matches:
        return None
    step, total = (int(x) for x in matches[-1])
    return (step, total) if total > 0 and step <= total else None


class Progress:
    """Forwards progress events, but only when something changed (polls repeat themselves)."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback
        self._last: tuple[Stage, int, int] | None = None

    def __call__(self, stage: Stage, step: int = 0, total: int = 0, message: str = "") -> None:
        key = (stage, step, total)
        if key != self._last:
            self._last = key
            self._callback(ProgressEvent(stage=stage, step=step, total=total, message=message))


# --------------------------------------------------------------------------------------------
# Download guard: result image URLs come from the provider's answer, so they are untrusted input.

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _shown(url: str | URL) -> str:
    text = str(url)
    return text if len(text) <= 80 else text[:77] + "..."


class Http:
    """One provider's aiohttp pool with its error policy: timeouts, 429 and transient retries."""

    def __init__(
        self,
        provider: str,
        policy: HttpPolicy,
        session: aiohttp.ClientSession | None,
        guard: DownloadGuard,
    ) -> None:
        """`session`: a pool to share (closed by its owner); None: one of our own, opened on first
        use (an aiohttp session belongs to the event loop it is made on). `guard`: where result
        images may come from."""
        self.provider = provider
        self.policy = policy
        self.guard = guard
        self._own = session is None
        self._session = session
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._background: set[asyncio.Task[bool]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.policy.max_connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_S,
                ssl=_ssl_context(),
            )
            # No cookie jar: no provider sets cookies we use, and parsing Set-Cookie costs per call.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self.timeout(self.policy.timeout_s),
            )
        return self._session

    def timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        """`seconds` for each stage of one exchange (a free connection and connecting, each read),
        as httpx's timeout was; none for the whole (the callers bound their waits)."""
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = aiohttp.ClientTimeout(
                total=None, connect=seconds, sock_connect=seconds, sock_read=seconds
            )
        return found

    def stream(
        self, method: str, url: str | URL, *, headers: Mapping[str, str], timeout_s: float | None = None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One exchange whose body the caller reads (`response.content`); leaving the block
        releases the connection, or closes it when the body was not read to the end."""
        return self.session.request(
            method, url, headers=headers, timeout=self.timeout(timeout_s or self.policy.timeout_s)
        )

    async def once(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
        body: bytes | aiohttp.FormData | None = None,
    ) -> Reply:
        """One exchange, its whole answer read; TRANSPORT_ERRORS when it fails."""
        async with self.session.request(
            method,
            url,
            data=body,
            headers=headers,
            timeout=self.timeout(timeout_s or self.policy.timeout_s),
        ) as response:
            content = await response.read()
            return Reply(response.status, response.headers, content, response.reason or "")

    async def request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        headers: Mapping[str, str],
        json: Any = None,
        form: aiohttp.FormData | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """One call; 429 is retried after Retry-After, then raised as RateLimited; transport faults,
        timeouts and 5xx become ProviderFailure. Any other status is returned for the caller to map."""
        body: bytes | aiohttp.FormData | None = form
        if json is not None:
            body = _dumps(json)
            headers = {**headers, "Content-Type": "application/json"}
        limited = 0
        transient = 0
        while True:
            try:
                response = await self.once(method, url, headers=headers, timeout_s=timeout_s, body=body)
            except TimeoutError as exc:  # aiohttp's connect and read timeouts (also ClientErrors)
                if idempotent and transient < self.policy.transient_retries:
                    transient += 1
                    continue
                raise ProviderFailure(f"{self.provider}: {method} timed out ({type(exc).__name__}).") from exc
            except aiohttp.ClientError as exc:
                if idempotent and transient < self.policy.transient_retries:
                    transient += 1
                    await asyncio.sleep(0.1 * transient)
                    continue
                raise ProviderFailure(f"{self.provider}: connection failed: {exc!r}.") from exc
            if response.status_code == 429:
                wait = retry_after_of(response)
                if (
                    limited < self.policy.rate_limit_retries
                    and (wait or 0.0) <= self.policy.max_retry_after_s
                ):
                    limited += 1
                    # No Retry-After: back off exponentially from the poll interval.
                    await asyncio.sleep(
                        wait if wait is not None else self.policy.poll_interval_s * 2**limited
                    )
                    continue
                raise RateLimited(
                    f"{self.provider} is rate limiting requests: {_detail(response)}",
                    retry_after=wait if wait is not None else 1.0,
                )
            if (
                response.status_code in (502, 503, 504)
                and idempotent
                and transient < self.policy.transient_retries
            ):
                transient += 1
                await asyncio.sleep(0.1 * transient)
                continue
            if response.status_code in (401, 403):
                raise ProviderFailure(
                    f"{self.provider} rejected the credentials ({response.status_code}): "
                    f"{_detail(response)}. Check the configured API key.",
                    code="provider_auth_failed",
                )
            if response.status_code >= 500:
                raise ProviderFailure(f"{self.provider} answered {response.status_code}: {_detail(response)}")
            return response

    def json(self, response: Reply, what: str) -> dict[str, Any]:
        """The body as a JSON object, or ProviderFailure."""
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderFailure(f"{self.provider}: the {what} answer is not valid JSON.") from exc
        if not isinstance(body, dict):
            raise ProviderFailure(f"{self.provider}: the {what} answer is not a JSON object.")
        return body

    async def download(
        self, url: str, *, credentials: Mapping[str, str] | None = None, origin: str | None = None
    ) -> tuple[bytes, float]:
        """The bytes at `url` (a data: URI, or a URL the download guard allows at every redirect
        hop), size-capped and time-limited; also when the first byte came. `credentials` (headers)
        go only to hops on `origin`, never to a host a redirect leads to."""
        if url.startswith("data:"):
            return _decode_data_uri(url, self.provider, self.policy.max_image_bytes), time.monotonic()
        transient = 0
        try:
            async with asyncio.timeout(self.policy.download_timeout_s):
                while True:
                    try:
                        return await self._download_once(url, credentials, origin)
                    except (*TRANSPORT_ERRORS, _Transient) as exc:
                        if transient >= self.policy.transient_retries:
                            raise ProviderFailure(
                                f"{self.provider}: image download failed: {exc!r}."
                            ) from exc
                        transient += 1
                        await asyncio.sleep(0.1 * transient)
        except TimeoutError as exc:
            raise ProviderFailure(
                f"{self.provider}: image download took over {self.policy.download_timeout_s:g} s."
            ) from exc

    async def _download_once(
        self, url: str, credentials: Mapping[str, str] | None, origin: str | None
    ) -> tuple[bytes, float]:
        target: str | URL = url
        owner = origin_of(URL(origin)) if origin else None
        for _hop in range(self.guard.max_redirects + 1):
            try:
                checked = await self.guard.check(target)
            except RefusedURL as exc:
                raise ProviderFailure(
                    f"{self.provider}: refused to download the result image from {_shown(target)}: {exc}."
                ) from None
            headers = credentials if credentials and owner == origin_of(checked) else None
            result = await self._fetch(checked, headers)
            if isinstance(result, URL):
                target = result  # a redirect: the next hop is checked like the first
                continue
            return result
        raise ProviderFailure(f"{self.provider}: the image download redirected too many times.")

    async def _fetch(self, url: URL, headers: Mapping[str, str] | None) -> tuple[bytes, float] | URL:
        """The image bytes, or the next URL when the answer is a redirect."""
        async with self.session.get(url, allow_redirects=False, headers=headers) as response:
            first_byte = time.monotonic()
            if response.status in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise ProviderFailure(f"{self.provider}: image download redirect without a Location.")
                try:
                    return url.join(URL(location))
                except (TypeError, ValueError) as exc:
                    raise ProviderFailure(f"{self.provider}: malformed download redirect: {exc}.") from None
            if response.status in (429, 502, 503, 504):
                raise _Transient(f"HTTP {response.status}")
            if response.status != 200:
                raise ProviderFailure(f"{self.provider}: image download answered {response.status}.")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.policy.max_image_bytes:
                raise ProviderFailure(f"{self.provider}: image of {declared} bytes exceeds the limit.")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > self.policy.max_image_bytes:
                    raise ProviderFailure(
                        f"{self.provider}: image exceeds {self.policy.max_image_bytes} bytes."
                    )
                chunks.append(chunk)
            return b"".join(chunks), first_byte

    async def cancel_shielded(self, call: Awaitable[bool]) -> bool:
        """Run a cancel call that must outlive a cancelled caller: awaited, but shielded, and
        referenced until done so that a second cancellation cannot lose it. Returns True when
        the provider answered that the request had already completed (so it bills for it)."""
        task: asyncio.Task[bool] = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        with contextlib.suppress(asyncio.CancelledError):
            return await asyncio.shield(task)
        return False

    @staticmethod
    def reraise_abandoned(exc: BaseException, completed: bool) -> None:
        """Re-raise `exc` from an abandoned call, saying whether the provider billed for it."""
        if not completed:
            return
        if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, BilledCancellation):
            raise BilledCancellation() from exc
        if isinstance(exc, FluxportError):
            exc.provider_billed = True

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.policy.cancel_timeout_s)
        if self._own and self._session is not None:
            await self._session.close()


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> bytes:
    """A request body as httpx encoded `json=`: compact UTF-8, NaN and infinities refused."""
    return _encoder.encode(value).encode("utf-8")


class _Transient(Exception):
    pass


def _decode_data_uri(url: str, provider: str, limit: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ProviderFailure(f"{provider}: unsupported data: URI for an image.")
    if len(payload) * 3 // 4 > limit:
        raise ProviderFailure(f"{provider}: inline image exceeds {limit} bytes.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderFailure(f"{provider}: malformed base64 in an inline image.") from exc


def _detail(response: Reply) -> str:
    """A short human-readable reason from an error body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "title", "message"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value[:300]
        if isinstance(body.get("detail"), list):
            return str(body["detail"])[:300]
    return str(body)[:200]


def to_image(data: bytes, provider: str, seed: int | None) -> GeneratedImage:
    """Wrap downloaded bytes; the format is sniffed and the size read from the header only."""
    fmt = sniff_format(data)
    if fmt not in REFERENCE_FORMATS:
        raise ProviderFailure(f"{provider}: the result is not a PNG, JPEG or WebP image.")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:  # Pillow raises many types for a corrupt header
        raise ProviderFailure(f"{provider}: the result image cannot be read.") from exc
    return GeneratedImage(content=data, width=width, height=height, format=fmt, seed=seed)
