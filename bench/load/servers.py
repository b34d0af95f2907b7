"""The processes a load run measures: the fal emulator, the hop floor, `fluxport serve`; and
what they cost (CPU, RSS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
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


# `--workers N` (N > 1): the shared state several workers need, on this machine's servers.
POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432"
POSTGRES_ADMIN_DB = "test"  # connected to only to create and drop the benchmark's own database
REDIS = "redis://127.0.0.1:6379/15"


class FluxportProcess:
    """`fluxport serve` as shipped: API keys on (the default), with one key made for the clients.
    With `workers` > 1: `fluxport serve --workers N` on a new PostgreSQL database of its own
    (dropped at the end) and Redis (its own key prefix), as several workers require."""

    def __init__(self, fal_url: str, data_dir: Path, workers: int = 1) -> None:
        port = free_port()
        self.workers = workers
        self.database: str | None = None
        shared: dict[str, str] = {}
        if workers > 1:
            self.database = asyncio.run(_create_database())
            shared = {
                "FLUXPORT_DATABASE_URL": f"{POSTGRES}/{self.database}",
                "FLUXPORT_REDIS_URL": REDIS,
                "FLUXPORT_REDIS_PREFIX": f"{self.database}:",
            }
        try:
            url = shared.get("FLUXPORT_DATABASE_URL", f"sqlite+aiosqlite:///{data_dir / 'fluxport.db'}")
            self.key = asyncio.run(_make_key(url))
        except BaseException:
            self._drop_database()
            raise
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXPORT_", "REPLICATE_"))}
        env |= shared
        env |= {
            "FAL_KEY": KEY,
            "FLUXPORT_FAL_URL": fal_url,
            "FLUXPORT_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            # Every load client shares 127.0.0.1: the per-client connection cap (100) would refuse
            # the 500-client step, as it would any 500 connections from one address.
            "FLUXPORT_MAX_CONNECTIONS_PER_CLIENT": "0",
        }
        self.log_path = data_dir / "fluxport.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "fluxport.cli", "serve", "--port", str(port)]
        command += ["--log-level", "warning"]
        if workers > 1:
            command += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            command,
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
        self._drop_database()

    def _drop_database(self) -> None:
        if self.database is not None:
            asyncio.run(_drop_database(self.database))
            self.database = None


async def _make_key(database_url: str) -> str:
    from fluxport.keys import create_key
    from fluxport.storage.db import Database

    db = await Database.open(database_url)
    try:
        _, secret = await create_key(db, name="bench")
    finally:
        await db.close()
    return secret


async def _admin() -> Any:
    import asyncpg

    dsn = POSTGRES.replace("postgresql+asyncpg", "postgresql") + "/" + POSTGRES_ADMIN_DB
    try:
        return await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(f"--workers needs PostgreSQL at {dsn}: {exc!r}") from None


async def _create_database() -> str:
    """A new, empty database for one run (fluxport migrates it); Redis checked on the way."""
    import redis.asyncio as aioredis

    link = aioredis.from_url(REDIS)
    try:
        await link.ping()
    except (OSError, aioredis.RedisError) as exc:
        raise RuntimeError(f"--workers needs Redis at {REDIS}: {exc!r}") from None
    finally:
        await link.aclose()
    name = f"fluxport_bench_{uuid.uuid4().hex[:12]}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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


def cpu_split(process: psutil.Process | None, children: bool = True) -> tuple[float, float]:
    """(user, system) CPU seconds of `process` and, with `children`, of every live descendant (the
    workers of `fluxport serve --workers N`); None: the whole machine's busy time, as user."""
    if process is None:
        t = psutil.cpu_times()
        return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0), 0.0
    try:
        t = process.cpu_times()
        user, system = t.user, t.system
        for child in process.children(recursive=True) if children else ():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                user += c.user
                system += c.system
        return user, system
    except psutil.Error:
        return 0.0, 0.0


def cpu_seconds(process: psutil.Process | None, children: bool = True) -> float:
    """CPU seconds of `process` (and its children); None: the whole machine's busy time."""
    return sum(cpu_split(process, children))
