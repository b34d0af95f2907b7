"""Load benchmark: concurrent clients through `fluxport serve` against the fal emulator, vs. direct.

The fal emulator (tests/emulators) runs in its own process with a fixed generation latency
(default 2.0 s, no queue time). For each step (default: 1 client, "unloaded", then 50, 200, 500
concurrent clients) the same closed-loop load runs twice, each client looping requests for
`--duration` seconds after a staggered start:

  direct    an httpx client speaking fal's queue protocol to the emulator the way fluxport's fal
            adapter does for an API call: submit, the SSE status stream until COMPLETED (without
            progress logs, as nobody follows the steps; polling if the stream cannot be opened),
            the result, the image download;
  fluxport  the openai SDK's AsyncOpenAI (or `--client httpx`: the same JSON with raw httpx)
            calling images.generate(model="flux.2-dev", size="512x512", provider fal) on a real
            `fluxport serve` subprocess pointed at the same emulator, with API keys on (the
            default) and a key made for the benchmark.

Both paths share one kept-alive connection pool per step: httpx over aiohttp's pool (what the
openai SDK offers as DefaultAioHttpClient; `--transport httpcore` for httpx's own), so that the
load generator stays cheap next to what it measures.

In the unloaded step it also measures one extra HTTP hop alone: the same client and pool calling
a no-op server on fluxport's own stack (uvicorn with uvloop and httptools, Starlette) that answers
at once with an answer shaped like fluxport's, one call every `--latency` seconds as the other
phases pace theirs. Every gateway adds at least that hop; it is printed with fluxport's own share
of the added latency (added - hop).

It prints, per step and path: completed requests, throughput, p50/p95/p99 latency, errors by kind
(429 with Retry-After counted apart, as deliberate; the client then waits Retry-After), the CPU
each process used, the client's event-loop lag, fluxport's peak RSS (children included); then
the added latency (fluxport - direct, per percentile), the throughput ratio, and the targets:

  zero errors beyond deliberate 429s with Retry-After; at 200 clients throughput >= 0.95 x direct
  and added p99 <= 100 ms; at 500 clients throughput >= 0.9 x direct; unloaded added p50 <= 2 ms;
  fluxport peak RSS <= 500 MiB.

    .venv/bin/python bench/load.py                      # 1, 50, 200, 500 clients, 20 s each
    .venv/bin/python bench/load.py --quick              # CI: 1 and 20 clients, 4 s each
    .venv/bin/python bench/load.py --steps 200 --duration 30 --profile /tmp/prof   # py-spy too
                                                        # (every thread, --threads, raw format)

Throughput counts the requests completed inside the measured window (after the staggered start,
before the clients stop), divided by its length; latencies are those of the successful requests
started inside it. The emulator's CDN renders each distinct image once (cached), standing for a
CDN serving a stored file. The exit status is 0 unless the benchmark itself failed (`--strict`:
also 1 when a target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from httpx_aiohttp import AiohttpTransport

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
KEY = "bench"
MODEL = "flux.2-dev"
FAL_ENDPOINT = "fal-ai/flux-2"  # what fluxport submits flux.2-dev text-to-image to
SIZE = 512
DELIBERATE = "429 with Retry-After"  # not an error: the service said when to come back

# The emulator process: the fal emulator with fixed latencies. It prints its base URL, then obeys
# lines on stdin: "reset", "dump" (one JSON line: for each job, by seed, when the emulator saw each
# stage, on the machine-wide monotonic clock the client uses too) and "quit".
EMULATOR = r"""
import functools, json, sys
sys.path.insert(0, sys.argv[1])
import tests.emulators.fal as fal_module
import tests.emulators.server as server_module
from tests.emulators import EmulatorConfig, FalEmulator

# fal's CDN serves a stored file: render one image per size and format, not one per download
# (a 512 px PNG costs the emulator ~5 ms, which would make it the bottleneck, not fluxport).
original = server_module.render_image
cached = functools.lru_cache(maxsize=64)(lambda w, h, fmt: original(w, h, fmt, (40, 90, 200)))
server_module.render_image = fal_module.render_image = lambda w, h, fmt, colour: cached(w, h, fmt)


class Emulator(FalEmulator):
    cdn_job = {}

    def _output(self, job):
        output = super()._output(job)
        for image in output.get("images") or []:
            self.cdn_job[image["url"].rsplit("/", 1)[1].split(".")[0]] = job.id
        return output

    def dump(self):
        jobs = {
            j.id: {"seed": j.input.get("seed"), "created": j.created, "done": j.done_at}
            for j in self.jobs.values()
        }
        for r in self.requests:
            parts = r.path.strip("/").split("/")
            if parts[0] == "cdn":
                job, stage = self.cdn_job.get(parts[1].split(".")[0]), "download"
            elif len(parts) >= 4 and parts[2] == "requests":
                job = parts[3]
                stage = {4: "result", 5: "poll", 6: "stream"}.get(len(parts))
            else:
                continue
            if job in jobs and stage and stage not in jobs[job]:
                jobs[job][stage] = r.at
        return {str(j.pop("seed")): j for j in jobs.values()}


config = EmulatorConfig(queue=0.0, run=float(sys.argv[2]), seed=7)
emulator = Emulator(config, key=sys.argv[3], log_level="error")
emulator.start()
print(emulator.base_url, flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "reset":
        emulator.reset()
        emulator.cdn_job.clear()
        print("ok", flush=True)
    elif command == "dump":
        print(json.dumps(emulator.dump()), flush=True)
    elif command == "quit":
        break
emulator.stop()
"""

# The hop floor: a server on fluxport's stack that does nothing but answer. Prints its URL when up.
HOP = r"""
import socket, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = {
    "created": 1, "model": "flux.2-dev", "output_format": "png", "size": "512x512", "expires_at": 86401,
    "data": [{"url": "http://127.0.0.1/images/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png", "seed": 1}],
    "usage": {"images": 1, "output_megapixels": 0.262144, "cost_usd": 0.012,
              "input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
}


async def generations(request):
    await request.body()
    return JSONResponse(ANSWER, headers={"x-fluxport-provider": "fal", "x-fluxport-cost-usd": "0.012000"})


app = Starlette(routes=[Route("/v1/images/generations", generations, methods=["POST"])])
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
config = uvicorn.Config(app, log_level="warning")
uvicorn.Server(config).run(sockets=[sock])
"""


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmulatorProcess:
    def __init__(self, latency_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", EMULATOR, str(ROOT), str(latency_s), KEY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.proc.kill()
            raise RuntimeError("the fal emulator did not start")

    def command(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def reset(self) -> None:
        self.command("reset")

    def stages(self) -> dict[int, dict[str, float]]:
        """seed -> when the emulator saw each stage of that request (created, stream, done, ...)."""
        return {int(seed): stages for seed, stages in json.loads(self.command("dump")).items()}

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HopProcess:
    """The no-op server of the hop floor (HOP)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOP], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.proc.kill()
            raise RuntimeError("the no-op server did not start")

    def stop(self) -> None:
        terminate(self.proc, 15)


class FluxportProcess:
    """`fluxport serve` as shipped: API keys on (the default), with one key made for the clients."""

    def __init__(self, fal_url: str, data_dir: Path) -> None:
        port = free_port()
        self.key = asyncio.run(_make_key(data_dir))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXPORT_", "REPLICATE_"))}
        env |= {
            "FAL_KEY": KEY,
            "FLUXPORT_FAL_URL": fal_url,
            "FLUXPORT_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
        }
        self.log_path = data_dir / "fluxport.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxport.cli", "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fluxport did not start:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        terminate(self.proc, 40)
        self._log.close()


async def _make_key(data_dir: Path) -> str:
    from fluxport.keys import create_key
    from fluxport.storage.db import Database

    db = await Database.open(f"sqlite+aiosqlite:///{data_dir / 'fluxport.db'}")
    try:
        _, secret = await create_key(db, name="bench")
    finally:
        await db.close()
    return secret


class Monitor:
    """Samples fluxport's RSS (with its children) every `interval` s, on a thread, for the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.phase_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            total = self.process.memory_info().rss
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.rss()
            self.peak = max(self.peak, rss)
            self.phase_peak = max(self.phase_peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(process: psutil.Process | None, children: bool = True) -> float:
    """CPU seconds of `process` (and its children); None: the whole machine's busy time."""
    if process is None:
        t = psutil.cpu_times()
        return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)
    try:
        t = process.cpu_times()
        total = t.user + t.system
        for child in process.children(recursive=True) if children else ():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except psutil.Error:
        return 0.0


# ---------------------------------------------------------------------------------------------
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
    busy0 = cpu_seconds(None)
    wall0 = time.monotonic()
    monitor = asyncio.create_task(lag_monitor())
    await asyncio.gather(*(client(i) for i in range(clients)))
    stop_lag.set()
    await monitor
    wall = time.monotonic() - wall0
    cpu = {name: (cpu_seconds(p, name != "client") - cpu0[name]) / wall for name, p in procs.items()}
    cpu["others"] = max(0.0, (cpu_seconds(None) - busy0) / wall - sum(cpu.values()))
    lag_ms = (nearest_rank(lags, 0.99) * 1000, max(lags, default=0.0) * 1000)
    return Phase(path, clients, duration_s, samples, (start_at, stop_at), cpu, lag_ms, wall)


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


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Step:
    clients: int
    direct: Phase
    fluxport: Phase
    notes: list[str] = field(default_factory=list)
    hop_ms: list[float] = field(default_factory=list)  # unloaded: the hop floor's calls

    @property
    def hop_p50(self) -> float:
        return nearest_rank(self.hop_ms, 0.5)

    @property
    def label(self) -> str:
        return "unloaded" if self.clients == 1 else f"{self.clients} clients"

    def added_ms(self, q: float) -> float:
        return self.fluxport.latency_ms(q) - self.direct.latency_ms(q)

    @property
    def ratio(self) -> float:
        return self.fluxport.throughput / self.direct.throughput if self.direct.throughput else float("nan")


def fmt_errors(phase: Phase) -> str:
    errors = phase.errors
    if not errors:
        return "0"
    return f"{sum(errors.values())} (" + ", ".join(f"{k}: {v}" for k, v in errors.most_common()) + ")"


def print_step(step: Step) -> None:
    print(f"\n== {step.label}: {step.clients} concurrent client(s), {step.direct.window_s:g} s measured ==")
    head = f"{'path':<9} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}"
    head += (
        f" {'429+RA':>6} {'cpu flux/emu/cli/other':>23} {'cli ms/req':>10} {'loop lag p99/max':>17}  errors"
    )
    print(head)
    for phase in (step.direct, step.fluxport):
        cpu = "/".join(f"{phase.cpu.get(k, 0.0):.0%}" for k in ("fluxport", "emulator", "client", "others"))
        done = len(phase.samples) or 1
        client_ms = phase.cpu.get("client", 0.0) * phase.wall_s / done * 1000
        print(
            f"{phase.path:<9} {len(phase.ok_in_window):>8} {phase.throughput:>8.1f} "
            f"{phase.latency_ms(0.5):>9.1f} {phase.latency_ms(0.95):>9.1f} {phase.latency_ms(0.99):>9.1f} "
            f"{phase.deliberate:>6} {cpu:>23} {client_ms:>10.2f} "
            f"{phase.loop_lag_ms[0]:>8.1f}/{phase.loop_lag_ms[1]:<8.1f}  "
            f"{fmt_errors(phase)}"
        )
    print(
        f"added latency (fluxport - direct): p50 {step.added_ms(0.5):+.1f} ms, "
        f"p95 {step.added_ms(0.95):+.1f} ms, p99 {step.added_ms(0.99):+.1f} ms; "
        f"throughput {step.ratio:.3f} x direct; fluxport peak RSS {step.fluxport.peak_rss / MIB:.0f} MiB"
    )
    if step.fluxport.stages:
        print(
            f"  {'where the time goes (ms)':<22} {'direct p50/p99':>18} {'fluxport p50/p99':>18}"
            f" {'added p50':>10}"
        )
        for name, _, _ in STAGES:
            d, f = step.direct.stages.get(name, []), step.fluxport.stages.get(name, [])
            dp, fp = (
                (nearest_rank(d, 0.5), nearest_rank(d, 0.99)),
                (nearest_rank(f, 0.5), nearest_rank(f, 0.99)),
            )
            print(
                f"  {name:<22} {dp[0]:>8.1f}/{dp[1]:<9.1f} {fp[0]:>8.1f}/{fp[1]:<9.1f}"
                f" {fp[0] - dp[0]:>+10.1f}"
            )
    if step.hop_ms:
        own = step.added_ms(0.5) - step.hop_p50
        print(
            f"  one extra HTTP hop alone (a no-op server on fluxport's stack, the same client): "
            f"p50 {step.hop_p50:.2f} ms, p99 {nearest_rank(step.hop_ms, 0.99):.2f} ms "
            f"({len(step.hop_ms)} calls); fluxport's own share of the added p50: {own:+.2f} ms"
        )
    for note in step.notes:
        print(f"note: {note}")


def check_targets(steps: list[Step], peak_rss: int) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured in this run), the figure)."""
    by = {s.clients: s for s in steps}
    rows: list[tuple[str, bool | None, str]] = []
    errors = sum(sum(s.fluxport.errors.values()) + sum(s.direct.errors.values()) for s in steps)
    deliberate = sum(s.fluxport.deliberate + s.direct.deliberate for s in steps)
    rows.append(
        (
            "zero errors beyond deliberate 429s with Retry-After",
            errors == 0,
            f"{errors} errors, {deliberate} deliberate 429s",
        )
    )

    def unloaded(s: Step) -> tuple[bool, str]:
        figure = f"{s.added_ms(0.5):+.2f} ms"
        if s.hop_ms:
            figure += f" (the hop alone: {s.hop_p50:.2f} ms)"
        return s.added_ms(0.5) <= 2, figure

    def at(clients: int, name: str, test: Callable[[Step], tuple[bool, str]]) -> None:
        step = by.get(clients)
        if step is None:
            rows.append((name, None, f"not run (no {clients}-client step)"))
        else:
            ok, figure = test(step)
            rows.append((name, ok, figure))

    at(200, "200 clients: throughput >= 0.95 x direct", lambda s: (s.ratio >= 0.95, f"{s.ratio:.3f} x"))
    at(
        200,
        "200 clients: added p99 <= 100 ms",
        lambda s: (s.added_ms(0.99) <= 100, f"{s.added_ms(0.99):+.1f} ms"),
    )
    at(500, "500 clients: throughput >= 0.9 x direct", lambda s: (s.ratio >= 0.9, f"{s.ratio:.3f} x"))
    at(1, "unloaded: added p50 <= 2 ms", unloaded)
    rows.append(("fluxport peak RSS <= 500 MiB", peak_rss <= 500 * MIB, f"{peak_rss / MIB:.0f} MiB"))
    return rows


# ---------------------------------------------------------------------------------------------
# Main


def raise_fd_limit(clients: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 4 * clients + 1024)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def file_create_ms(directory: Path, files: int = 200) -> float:
    """Median milliseconds to create, write and close a small new file in `directory`: every image
    fluxport stores is a new file, and this cost differs widely between machines (VM disks)."""
    times = []
    payload = b"x" * 4096
    with tempfile.TemporaryDirectory(dir=directory, prefix=".create-") as scratch:
        for i in range(files):
            begin = time.perf_counter()
            fd = os.open(os.path.join(scratch, f"{i}.png"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
            times.append((time.perf_counter() - begin) * 1000)
    return nearest_rank(times, 0.5)


def start_profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        print("note: py-spy not found; no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-f",
            "raw",
            "--threads",
            "-o",
            str(out),
            "-d",
            str(max(1, round(seconds))),
            "-r",
            "100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def bench(
    args: argparse.Namespace, emulator: EmulatorProcess, fluxport: FluxportProcess, hop: HopProcess
) -> int:
    procs = {
        "fluxport": psutil.Process(fluxport.proc.pid),
        "emulator": psutil.Process(emulator.proc.pid),
        "client": psutil.Process(),
    }
    monitor = Monitor(fluxport.proc.pid)
    rng = random.Random(args.seed)
    seeds = iter(lambda: rng.randrange(2**31), None)
    through = ThroughSdk if args.client == "sdk" else ThroughHttpx
    steps: list[Step] = []
    try:
        # Warm-up, unmeasured: connections, lazy imports, the database.
        with client_pool(4, args.transport) as http:
            direct = Direct(emulator.base_url, http)
            fx = through(fluxport.url, fluxport.key, http)
            for _ in range(args.warmup):
                for call in (direct, fx):
                    outcome, _ = await call(next(seeds))
                    if outcome != "ok":
                        raise RuntimeError(f"warm-up request failed: {outcome}\n{fluxport.tail()}")
            await http.aclose()
        for clients in args.steps:
            ramp = args.ramp if clients > 1 else 0.0
            phases: dict[str, Phase] = {}
            for path in ("direct", "fluxport"):
                emulator.reset()
                monitor.phase_peak = monitor.rss()
                with client_pool(clients, args.transport) as http:
                    call: Callable[[int], Awaitable[Outcome]]
                    call = (
                        Direct(emulator.base_url, http)
                        if path == "direct"
                        else through(fluxport.url, fluxport.key, http)
                    )
                    spy = None
                    if args.profile and path == "fluxport":
                        args.profile.mkdir(parents=True, exist_ok=True)
                        out = args.profile / f"fluxport-{clients}.txt"
                        spy = start_profile(fluxport.proc.pid, out, ramp + args.duration)
                    phase = await run_phase(path, call, clients, args.duration, ramp, procs, seeds)
                    if spy is not None:
                        spy.wait()
                    await http.aclose()
                phase.peak_rss = monitor.phase_peak
                phase.attribute(emulator.stages())
                phases[path] = phase
            step = Step(clients, phases["direct"], phases["fluxport"])
            if clients == 1:
                with client_pool(1, args.transport) as http:
                    step.hop_ms = await measure_hop(
                        through(hop.url, KEY, http), args.duration, args.latency, seeds
                    )
                    await http.aclose()
            for phase in (step.direct, step.fluxport):
                if phase.polled:
                    step.notes.append(
                        f"{phase.path}: {phase.polled} requests polled the status URL"
                        f" ({phase.stream_then_poll} of them after opening the status stream)"
                    )
            for phase in (step.direct, step.fluxport):
                if phase.cpu["others"] > 0.25:
                    step.notes.append(
                        f"{phase.path}: other processes on this machine used {phase.cpu['others']:.0%}"
                        " of a core meanwhile; the figures are disturbed"
                    )
                if phase.cpu["client"] > 0.8:
                    step.notes.append(
                        f"{phase.path}: the client process used {phase.cpu['client']:.0%} of a core;"
                        " it may be a bottleneck"
                    )
            print_step(step)
            steps.append(step)
    finally:
        monitor.stop()

    print(
        f"\ntargets ({psutil.cpu_count()} CPUs here; the targets are stated for 2 cores; "
        f"client: {args.client}, generation {args.latency:g} s, {args.duration:g} s per phase):"
    )
    rows = check_targets(steps, monitor.peak)
    for name, met, figure in rows:
        verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
        print(f"  {verdict:<8} {name:<55} {figure}")
    missed = [name for name, met, _ in rows if met is False]
    print("all measured targets met" if not missed else f"{len(missed)} target(s) not met")
    if fluxport.proc.poll() is not None:
        print(f"fluxport exited early:\n{fluxport.tail()}", file=sys.stderr)
        return 1
    return 1 if args.strict and missed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="1,50,200,500", help="concurrent clients per step (1 = unloaded)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--ramp", type=float, default=None, help="staggered start (default: --latency)")
    parser.add_argument("--latency", type=float, default=2.0, help="the emulator's generation seconds")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests each way first")
    parser.add_argument("--client", choices=("sdk", "httpx"), default="sdk", help="how to call fluxport")
    parser.add_argument(
        "--transport",
        choices=("aiohttp", "httpcore"),
        default="aiohttp",
        help="the load generator's connection pool (both paths)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy raw profiles of fluxport here (GIL holder only)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument("--quick", action="store_true", help="CI: steps 1,20 and 4 s phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.duration, args.warmup = "1,20", 4.0, 1
    args.steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    if not args.steps or min(args.steps) < 1:
        parser.error("--steps takes positive client counts, e.g. 1,50,200")
    if args.ramp is None:
        args.ramp = args.latency
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(max(args.steps))
    runner: Callable[[Any], int] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the client's own CPU cost, kept low (fluxport's uvicorn uses it too)

        runner = uvloop.run
    started = time.monotonic()
    emulator = EmulatorProcess(args.latency)
    hop = HopProcess()
    try:
        with tempfile.TemporaryDirectory(prefix="fluxport-load-") as tmp:
            fluxport = FluxportProcess(emulator.base_url, Path(tmp))
            try:
                print(
                    f"load benchmark: steps {args.steps}, {args.duration:g} s per phase after a "
                    f"{args.ramp:g} s staggered start; fal emulator at {emulator.base_url} "
                    f"(pid {emulator.proc.pid}, generation {args.latency:g} s); fluxport at {fluxport.url} "
                    f"(pid {fluxport.proc.pid}); client pid {os.getpid()} ({args.client}); "
                    f"creating a small file in fluxport's data dir takes {file_create_ms(Path(tmp)):.3f} ms "
                    "here (median)",
                    flush=True,
                )
                code = runner(bench(args, emulator, fluxport, hop))
            finally:
                fluxport.stop()
    finally:
        hop.stop()
        emulator.stop()
    print(f"done in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
