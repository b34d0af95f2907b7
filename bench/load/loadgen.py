"""The load generator: one request each way (direct to the emulator, through fluxport), and a
closed-loop phase of concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import psutil
from httpx_aiohttp import AiohttpTransport

from bench.load.servers import DELIBERATE, FAL_ENDPOINT, KEY, MODEL, SIZE, cpu_seconds, cpu_split

# One request, each way. A call returns (outcome, retry_after): outcome "ok" or an error kind.

Outcome = tuple[str, float | None]


def fal_body(seed: int) -> dict[str, Any]:
    """The input fluxport's fal adapter sends for flux.2-dev, 512x512, png, n=1."""
    return {
        "prompt": f"load test image {seed}",
        "image_size": {"width": SIZE, "height": SIZE},
        "num_images": 1,
        "output_format": "png",
        "seed": seed,
    }


def retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def http_error(stage: str, response: httpx.Response) -> Outcome:
    if response.status_code == 429:
        wait = retry_after(response.headers)
        return (DELIBERATE if wait is not None else f"{stage}: 429 without Retry-After"), wait
    return f"{stage}: HTTP {response.status_code}", None


async def sse_data(lines: Any) -> Any:
    """The data of each server-sent event (as fluxport's fal adapter reads them)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))


class Direct:
    """fal's queue protocol, spoken to the emulator as fluxport's adapter speaks it."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, poll_s: float = 0.25) -> None:
        self.base = base_url
        self.http = http
        self.poll_s = poll_s
        self.headers = {"Authorization": f"Key {KEY}"}

    async def __call__(self, seed: int) -> Outcome:
        try:
            return await self._once(seed)
        except httpx.TimeoutException as exc:
            return f"timeout ({type(exc).__name__})", None
        except httpx.HTTPError as exc:
            return f"transport: {type(exc).__name__}", None
        except (ValueError, KeyError, TypeError) as exc:
            return f"bad answer: {type(exc).__name__}", None

    async def _once(self, seed: int) -> Outcome:
        r = await self.http.post(f"{self.base}/{FAL_ENDPOINT}", json=fal_body(seed), headers=self.headers)
        if r.status_code >= 400:
            return http_error("submit", r)
        submitted = r.json()
        status_url, response_url = submitted["status_url"], submitted["response_url"]
        if not await self._stream(status_url):
            failed = await self._poll(status_url)
            if failed is not None:
                return failed
        r = await self.http.get(response_url, headers=self.headers)
        if r.status_code >= 400:
            return http_error("result", r)
        url = r.json()["images"][0]["url"]
        async with self.http.stream("GET", url) as image:
            if image.status_code != 200:
                return http_error("download", image)
            data = await image.aread()
        return ("ok", None) if data.startswith(b"\x89PNG") else ("download: not a PNG", None)

    async def _stream(self, status_url: str) -> bool:
        url = httpx.URL(status_url)
        url = url.copy_with(path=url.path.rstrip("/") + "/stream").copy_set_param("logs", "0")
        headers = self.headers | {"Accept": "text/event-stream"}
        try:
            async with self.http.stream("GET", url, headers=headers) as response:
                kind = response.headers.get("content-type", "")
                if response.status_code != 200 or not kind.startswith("text/event-stream"):
                    return False
                async for data in sse_data(response.aiter_lines()):
                    status = json.loads(data)
                    if isinstance(status, dict) and status.get("status") == "COMPLETED":
                        return True
        except (httpx.HTTPError, ValueError):
            return False
        return False

    async def _poll(self, status_url: str) -> Outcome | None:
        interval = self.poll_s
        while True:
            r = await self.http.get(status_url, params={"logs": "0"}, headers=self.headers)
            if r.status_code >= 400:
                return http_error("status", r)
            if r.json().get("status") == "COMPLETED":
                return None
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)


class ThroughSdk:
    """images.generate on the official openai SDK."""

    def __init__(self, url: str, key: str, http: httpx.AsyncClient) -> None:
        self.client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key=key, max_retries=0, timeout=120, http_client=http
        )

    async def __call__(self, seed: int) -> Outcome:
        try:
            result = await self.client.images.generate(
                model=MODEL,
                prompt=f"load test image {seed}",
                size="512x512",
                extra_body={"provider": "fal", "seed": seed},
            )
        except openai.APIStatusError as exc:
            if exc.status_code == 429:
                wait = retry_after(exc.response.headers)
                return (DELIBERATE if wait is not None else "429 without Retry-After"), wait
            code = exc.body.get("code") if isinstance(exc.body, dict) else None
            return f"HTTP {exc.status_code}{f' {code}' if code else ''}", None
        except openai.APITimeoutError:
            return "timeout", None
        except openai.APIConnectionError as exc:
            return f"connection: {type(exc.__cause__).__name__}", None
        data = result.data or []
        return ("ok", None) if len(data) == 1 and data[0].url else ("no image in the answer", None)


class ThroughHttpx:
    """The same JSON as the SDK sends, with raw httpx (to take the SDK's own CPU cost out)."""

    def __init__(self, url: str, key: str, http: httpx.AsyncClient) -> None:
        self.url = url + "/v1/images/generations"
        self.http = http
        self.headers = {"Authorization": f"Bearer {key}"}

    async def __call__(self, seed: int) -> Outcome:
        body = {
            "model": MODEL,
            "prompt": f"load test image {seed}",
            "size": "512x512",
            "provider": "fal",
            "seed": seed,
        }
        try:
            r = await self.http.post(self.url, json=body, headers=self.headers)
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.HTTPError as exc:
            return f"connection: {type(exc).__name__}", None
        if r.status_code >= 400:
            if r.status_code == 429:
                wait = retry_after(r.headers)
                return (DELIBERATE if wait is not None else "429 without Retry-After"), wait
            return f"HTTP {r.status_code}", None
        data = r.json().get("data") or []
        return ("ok", None) if len(data) == 1 and data[0].get("url") else ("no image in the answer", None)


# ---------------------------------------------------------------------------------------------
# Driving a phase


@dataclass
class Sample:
    seed: int
    start: float
    end: float
    outcome: str


# Where a request's time goes, from the client's clock and the emulator's records:
# (name, from, to); "start"/"end" are the client's, the rest the emulator's.
STAGES = (
    ("before submit", "start", "created"),
    ("submit -> wait", "created", "wait"),
    ("done -> result", "done", "result"),
    ("result -> download", "result", "download"),
    ("download -> answer", "download", "end"),
)


@dataclass
class Phase:
    path: str  # "direct" or "fluxport"
    clients: int
    window_s: float
    samples: list[Sample]
    window: tuple[float, float]
    cpu: dict[str, float]  # process (or "others": the rest of the machine) -> cores used, on average
    loop_lag_ms: tuple[float, float]  # client event loop: p99, max
    wall_s: float = 0.0
    fluxport_user_sys: tuple[float, float] = (0.0, 0.0)  # fluxport's CPU seconds in the phase
    peak_rss: int = 0
    polled: int = 0  # requests that polled the status URL
    stream_then_poll: int = 0  # ... after opening the status stream
    stages: dict[str, list[float]] = field(default_factory=dict)  # stage -> ms, per request

    def attribute(self, seen: dict[int, dict[str, float]]) -> None:
        """Split each successful request's time into STAGES using the emulator's records."""
        self.stages = {name: [] for name, _, _ in STAGES}
        for sample in self.ok_in_window:
            marks = seen.get(sample.seed)
            if marks is None:
                continue
            marks = marks | {"start": sample.start, "end": sample.end}
            self.polled += "poll" in marks
            self.stream_then_poll += "poll" in marks and "stream" in marks
            marks["wait"] = marks.get("stream", marks.get("poll", math.nan))
            for name, a, b in STAGES:
                if a in marks and b in marks:
                    self.stages[name].append((marks[b] - marks[a]) * 1000)

    @property
    def ok_in_window(self) -> list[Sample]:
        lo, hi = self.window
        return [s for s in self.samples if s.outcome == "ok" and lo <= s.start < hi]

    @property
    def throughput(self) -> float:
        lo, hi = self.window
        done = sum(1 for s in self.samples if s.outcome == "ok" and lo <= s.end < hi)
        return done / (hi - lo)

    def latency_ms(self, q: float) -> float:
        return nearest_rank([(s.end - s.start) * 1000 for s in self.ok_in_window], q)

    @property
    def errors(self) -> Counter[str]:
        return Counter(s.outcome for s in self.samples if s.outcome not in ("ok", DELIBERATE))

    @property
    def deliberate(self) -> int:
        return sum(1 for s in self.samples if s.outcome == DELIBERATE)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


@contextlib.contextmanager
def client_pool(clients: int, transport: str = "aiohttp") -> Iterator[httpx.AsyncClient]:
    """One shared pool with a connection for every client (and headroom), kept alive. Both paths
    use it. "aiohttp": httpx over aiohttp's connection pool (what the openai SDK offers as
    DefaultAioHttpClient); httpx's own pool scans every connection per request, so with hundreds
    of connections the load generator, not the system under test, becomes the bottleneck."""
    limits = httpx.Limits(max_connections=clients + 64, max_keepalive_connections=clients + 64)
    timeout = httpx.Timeout(120.0, connect=30.0)
    if transport == "aiohttp":
        http = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=timeout)
    else:
        http = httpx.AsyncClient(limits=limits, timeout=timeout)
    yield http


async def run_phase(
    path: str,
    call: Callable[[int], Awaitable[Outcome]],
    clients: int,
    duration_s: float,
    ramp_s: float,
    procs: dict[str, psutil.Process],
    seeds: Iterator[int],
) -> Phase:
    samples: list[Sample] = []
    lags: list[float] = []
    t0 = time.monotonic()
    start_at = t0 + ramp_s
    stop_at = start_at + duration_s
    stop_lag = asyncio.Event()

    async def lag_monitor() -> None:
        tick = 0.02
        while not stop_lag.is_set():
            before = time.monotonic()
            await asyncio.sleep(tick)
            lags.append(max(0.0, time.monotonic() - before - tick))

    async def client(i: int) -> None:
        await asyncio.sleep(ramp_s * i / clients)
        while time.monotonic() < stop_at:
            seed = next(seeds)
            begin = time.monotonic()
            outcome, wait = await call(seed)
            samples.append(Sample(seed, begin, time.monotonic(), outcome))
            if wait is not None:
                await asyncio.sleep(min(wait, 30.0))
            elif outcome != "ok":
                await asyncio.sleep(0.05)  # no hot loop on a failing server

    # The client's children are the emulator and fluxport: count its own time only.
    cpu0 = {name: cpu_seconds(p, name != "client") for name, p in procs.items()}
    split0 = cpu_split(procs["fluxport"])
    busy0 = cpu_seconds(None)
    wall0 = time.monotonic()
    monitor = asyncio.create_task(lag_monitor())
    await asyncio.gather(*(client(i) for i in range(clients)))
    stop_lag.set()
    await monitor
    wall = time.monotonic() - wall0
    cpu = {name: (cpu_seconds(p, name != "client") - cpu0[name]) / wall for name, p in procs.items()}
    user, system = cpu_split(procs["fluxport"])
    split = (user - split0[0], system - split0[1])
    cpu["others"] = max(0.0, (cpu_seconds(None) - busy0) / wall - sum(cpu.values()))
    lag_ms = (nearest_rank(lags, 0.99) * 1000, max(lags, default=0.0) * 1000)
    return Phase(path, clients, duration_s, samples, (start_at, stop_at), cpu, lag_ms, wall, split)


async def measure_hop(
    call: Callable[[int], Awaitable[Outcome]], duration_s: float, pace_s: float, seeds: Iterator[int]
) -> list[float]:
    """One call every `pace_s` (idle in between, as an unloaded request through fluxport is while
    it waits for the provider) for `duration_s`; each call's milliseconds. One unmeasured first."""
    times: list[float] = []
    stop_at = time.monotonic() + pace_s + duration_s
    while time.monotonic() < stop_at:
        await asyncio.sleep(pace_s)
        begin = time.monotonic()
        outcome, _ = await call(next(seeds))
        if outcome != "ok":
            raise RuntimeError(f"the no-op server's answer did not satisfy the client: {outcome}")
        times.append((time.monotonic() - begin) * 1000)
    return times[1:]
