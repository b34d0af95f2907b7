"""Soak check: a real `fluxport serve`'s RSS before, at peak and after each phase of a mixed load.

Run from the repository root: `.venv/bin/python bench/soak.py` (`--quick` for a smaller run).
The server serves only the local provider (flux.2-dummy, random weights, on the CPU) from a
temporary data directory; hosted provider keys and inherited FLUXPORT_* settings are stripped.

Phases, with the RSS (the server process and its children) sampled every 0.2 s in a thread:

  (a) start-up and one warm-up generation
  (b) playground jobs over its HTTP API, as the browser drives it (POST a form, follow the SSE)
  (c) JSON bodies close to FLUXPORT_MAX_JSON_BYTES (dry runs and refused ones) and multipart
      edits with reference images through the openai SDK
  (d) big generations (`--n`, `--size`; default n=10 at 2048x2048), `--repeat` times (default 2:
      if "after" grows from one to the next, something is kept; if not, the high-water is bounded)
  (e) idle (`--idle` seconds)
  (f) `--slow-clients N` (default 50; 0 skips it): /healthz latency alone, then while N clients
      trickle header bytes from another loopback address (127.0.0.2) until the server's header
      timeout (FLUXPORT_HEADER_TIMEOUT_S) closes them; and when it did

`--env KEY=VALUE` (repeatable) passes settings to the server, to test a hypothesis such as
MALLOC_ARENA_MAX=2 side by side with a plain run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serveproc import serve, stop  # noqa: E402
from tests.slowclients import slow_clients  # noqa: E402

MODEL = "flux.2-dummy"
MIB = 1024 * 1024
SAMPLE_S = 0.2
# Settings the soak gives the server; everything else FLUXPORT_* from the shell is dropped.
STRIPPED_PREFIXES = ("FLUXPORT_", "FAL_", "REPLICATE_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, port: int, log: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`fluxport serve` without the shell's provider keys and FLUXPORT_* settings, plus the soak's own."""
    # The playground's default is 10 submissions a minute per client; the soak sends more.
    env = {"FLUXPORT_PLAYGROUND_RATE_PER_MINUTE": "0"} | extra_env
    return serve(data_dir, port, log, strip_prefixes=STRIPPED_PREFIXES, **env)


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its children, in bytes (0 once it has gone)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@dataclass
class Phase:
    name: str
    before: int
    peak: int
    after: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class RssSampler:
    """Samples the server's RSS every SAMPLE_S seconds; tracks the peak of the current phase."""

    pid: int
    phases: list[Phase] = field(default_factory=list)
    _current: Phase | None = None
    _started: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._proc = psutil.Process(self.pid)

    def rss(self) -> int:
        return tree_rss(self._proc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rss = self.rss()
            with self._lock:
                if self._current is not None:
                    self._current.peak = max(self._current.peak, rss)

    def begin(self, name: str, before: int | None = None) -> None:
        rss = self.rss() if before is None else before
        with self._lock:
            self._current = Phase(name, rss, rss)
            self._started = time.monotonic()

    def end(self, note: str = "") -> Phase:
        rss = self.rss()
        with self._lock:
            phase = self._current
            assert phase is not None
            phase.peak = max(phase.peak, rss)
            phase.after, phase.note = rss, note
            phase.seconds = time.monotonic() - self._started
            self._current = None
        self.phases.append(phase)
        print(f"  {phase.name}: {phase.seconds:.1f} s, after {phase.after / MIB:.0f} MiB {note}", flush=True)
        return phase


# -- the workload --------------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    """A noisy RGB PNG (noise keeps it from compressing to nothing)."""
    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def warm_up(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "warm up", "size": "256x256", "response_format": "b64_json"}
    http.post("/v1/images/generations", json=body, timeout=300).raise_for_status()


def playground_job(http: httpx.Client, i: int) -> str:
    """One playground job as the browser runs it: POST the form, then follow its events to the end."""
    sizes = ("256x256", "512x512", "512x768", "768x768")
    form = {
        "prompt": f"a red fox in the snow, number {i}",
        "model": MODEL,
        "size": sizes[i % len(sizes)],
        "n": str(1 + i % 3),
        "seed": str(1000 + i),
        "output_format": ("png", "webp", "jpeg")[i % 3],
    }
    r = http.post("/playground/api/jobs", files={k: (None, v) for k, v in form.items()}, timeout=60)
    r.raise_for_status()
    kind = "message"
    with http.stream("GET", r.json()["events"], timeout=600) as events:
        events.raise_for_status()
        for line in events.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind in ("result", "error"):
                if kind == "error":
                    raise RuntimeError(f"playground job failed: {line[6:400]}")
                return str(json.loads(line[6:])["request_id"])
    raise RuntimeError("the playground's event stream ended without a result")


def big_json(http: httpx.Client, i: int, cap: int) -> int:
    """A JSON body just under the cap: a dry run with many 15 KiB extra fields, or (every third)
    a refused one carrying a single oversized extra field. Returns the status."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "x " * 15_000, "size": "1024x1024", "dry_run": True}
    room = cap - len(json.dumps(body)) - 4096
    if i % 3 == 2:
        body["huge_unknown_field"] = "y" * room
    else:
        chunk = 15 * 1024
        for k in range(room // (chunk + 16)):
            body[f"extra_{k:03d}"] = chr(ord("a") + k % 26) * chunk
    data = json.dumps(body).encode()
    assert len(data) <= cap, len(data)
    r = http.post(
        "/v1/images/generations", content=data, headers={"content-type": "application/json"}, timeout=60
    )
    if r.status_code not in (200, 400):
        raise RuntimeError(f"big body: {r.status_code} {r.text[:300]}")
    return r.status_code


def edit(client: openai.OpenAI, refs: list[bytes], i: int) -> None:
    images = [(f"ref{k}.png", ref, "image/png") for k, ref in enumerate(refs[: 1 + i % len(refs)])]
    result = client.images.edit(
        model=MODEL,
        image=images,
        prompt=f"make it blue {i}",
        size="512x512",
        response_format="b64_json" if i % 2 else "url",
    )
    assert result.data, "an edit answered no images"
    if result.data[0].b64_json:
        base64.b64decode(result.data[0].b64_json)


def big_generation(client: openai.OpenAI, n: int, size: str) -> None:
    result = client.images.generate(
        model=MODEL,
        prompt="a vast landscape",
        n=n,
        size=size,  # type: ignore[arg-type]  # the SDK lists OpenAI's sizes only
        response_format="b64_json",
        timeout=1800,
    )
    assert len(result.data) == n, len(result.data)


# -- run and report ------------------------------------------------------------------------------


@dataclass
class Workload:
    jobs: int = 40
    bodies: int = 30
    edits: int = 6
    n: int = 10
    size: str = "2048x2048"
    idle_s: float = 20.0
    json_cap: int = MIB
    repeat: int = 2
    slow_clients: int = 50
    header_timeout_s: float = 10.0


def run_soak(url: str, sampler: RssSampler, w: Workload) -> None:
    http = httpx.Client(base_url=url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
    try:
        # (a) the start-up RSS is the "before" of the warm-up.
        sampler.begin("a. warm-up")
        warm_up(http)
        sampler.end()

        sampler.begin("b. playground jobs")
        for i in range(w.jobs):
            playground_job(http, i)
        sampler.end(f"({w.jobs} jobs)")

        sampler.begin("c. big bodies + edits")
        statuses = [big_json(http, i, w.json_cap) for i in range(w.bodies)]
        refs = [png_bytes(512, 512) for k in range(4)]
        for i in range(w.edits):
            edit(client, refs, i)
        ok = statuses.count(200)
        kib = w.json_cap // 1024
        sampler.end(
            f"({w.bodies} bodies ~{kib} KiB: {ok} dry runs, {w.bodies - ok} refused; {w.edits} edits)"
        )

        for k in range(w.repeat):
            sampler.begin(f"d{k + 1}. big generation")
            big_generation(client, w.n, w.size)
            sampler.end(f"(n={w.n}, {w.size})")

        sampler.begin("e. idle")
        time.sleep(w.idle_s)
        sampler.end(f"({w.idle_s:.0f} s)")

        if w.slow_clients:
            sampler.begin("f. slow clients")
            slow_clients_phase(http, w)
            sampler.end(f"({w.slow_clients} clients)")
    finally:
        http.close()
        client.close()


def healthz_ms(http: httpx.Client, seconds: float) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t = time.perf_counter()
        http.get("/healthz").raise_for_status()
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.05)
    return sorted(out)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def slow_clients_phase(http: httpx.Client, w: Workload) -> None:
    """/healthz alone, then beside `w.slow_clients` clients trickling header bytes."""
    port = int(str(http.base_url).rstrip("/").rsplit(":", 1)[1])
    alone = healthz_ms(http, 3)
    clients, threads = slow_clients(port, w.slow_clients, duration_s=w.header_timeout_s + 10)
    beside = healthz_ms(http, w.header_timeout_s + 2)
    for thread in threads:
        thread.join(timeout=30)
    closed = sorted(c.closed_after_s for c in clients if c.closed_after_s is not None)
    statuses = sorted({str(c.status) for c in clients})
    print(
        f"  /healthz p50 / p99: alone {pct(alone, 0.5):.1f} / {pct(alone, 0.99):.1f} ms "
        f"({len(alone)} calls); "
        f"beside {w.slow_clients} slow clients {pct(beside, 0.5):.1f} / {pct(beside, 0.99):.1f} ms "
        f"({len(beside)} calls)",
        flush=True,
    )
    if closed:
        print(
            f"  slow clients: {len(closed)} of {len(clients)} closed by the server "
            f"(status {', '.join(statuses)}) "
            f"after {closed[0]:.1f}-{closed[-1]:.1f} s; header timeout {w.header_timeout_s:g} s",
            flush=True,
        )
    else:
        print(f"  slow clients: none closed by the server within {w.header_timeout_s + 10:g} s", flush=True)


def print_table(start_rss: int, phases: list[Phase], title: str) -> None:
    print(f"\n{title}")
    print(f"start-up RSS (no request yet): {start_rss / MIB:.0f} MiB")
    print(f"{'phase':<24}{'before':>9}{'peak':>9}{'after':>9}{'secs':>8}  (MiB)")
    for p in phases:
        print(f"{p.name:<24}{p.before / MIB:>9.0f}{p.peak / MIB:>9.0f}{p.after / MIB:>9.0f}{p.seconds:>8.1f}")
    if phases:
        overall = max(p.peak for p in phases)
        print(f"overall peak {overall / MIB:.0f} MiB; after the last phase {phases[-1].after / MIB:.0f} MiB")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: 8 jobs, 6 bodies, 2 edits, n=2 at 1024x1024 once, 5 s idle, 10 slow clients",
    )
    parser.add_argument("--jobs", type=int, help="playground jobs (default 40)")
    parser.add_argument("--bodies", type=int, help="big JSON bodies (default 30)")
    parser.add_argument("--edits", type=int, help="edits with reference images (default 6)")
    parser.add_argument("--n", type=int, help="images in the big generation (default 10)")
    parser.add_argument("--size", help="size of the big generation (default 2048x2048)")
    parser.add_argument("--idle", type=float, help="seconds idle at the end (default 20)")
    parser.add_argument("--repeat", type=int, help="big generations, one after the other (default 2)")
    parser.add_argument(
        "--slow-clients", type=int, help="slow-header clients in the last phase (default 50; 0 skips it)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment"
    )
    return parser.parse_args(argv)


def workload(args: argparse.Namespace) -> Workload:
    w = (
        Workload(jobs=8, bodies=6, edits=2, n=2, size="1024x1024", idle_s=5.0, repeat=1, slow_clients=10)
        if args.quick
        else Workload()
    )
    for name, attr in (
        ("jobs", "jobs"),
        ("bodies", "bodies"),
        ("edits", "edits"),
        ("n", "n"),
        ("size", "size"),
        ("idle", "idle_s"),
        ("repeat", "repeat"),
        ("slow_clients", "slow_clients"),
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(w, attr, value)
    return w


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    w = workload(args)
    extra = dict(item.split("=", 1) for item in args.env)
    if "FLUXPORT_MAX_JSON_BYTES" in extra:
        w.json_cap = int(extra["FLUXPORT_MAX_JSON_BYTES"])
    if "FLUXPORT_HEADER_TIMEOUT_S" in extra:
        w.header_timeout_s = float(extra["FLUXPORT_HEADER_TIMEOUT_S"])
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fluxport-soak-") as tmp:
        port = free_port()
        log = Path(tmp) / "serve.log"
        proc = start_server(Path(tmp) / "data", port, log, extra)
        try:
            sampler = RssSampler(proc.pid)
            start_rss = sampler.rss()
            sampler.start()
            run_soak(f"http://127.0.0.1:{port}", sampler, w)
            sampler.stop()
        except BaseException:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop(proc)
    env_note = f" with {' '.join(args.env)}" if args.env else ""
    print_table(
        start_rss, sampler.phases, f"fluxport serve RSS{env_note} ({time.monotonic() - began:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
