"""`python -m bench.load`: parse the arguments, start the processes, run the steps."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from bench.load.loadgen import (
    Direct,
    Outcome,
    Phase,
    ThroughHttpx,
    ThroughSdk,
    client_pool,
    measure_hop,
    nearest_rank,
    run_phase,
)
from bench.load.report import Step, check_targets, print_step
from bench.load.servers import KEY, EmulatorProcess, FluxportProcess, HopProcess, Monitor

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


def start_profile(
    pid: int, out: Path, seconds: float, subprocesses: bool = False
) -> subprocess.Popen[bytes] | None:
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
            *(["--subprocesses"] if subprocesses else []),
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
                        spy = start_profile(
                            fluxport.proc.pid, out, ramp + args.duration, subprocesses=args.workers > 1
                        )
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
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="fluxport serve --workers N; above 1 on a new PostgreSQL database and Redis db 15 "
        "(127.0.0.1), its CPU summed over every worker",
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
    if args.workers < 1:
        parser.error("--workers takes a positive number of processes")
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
            fluxport = FluxportProcess(emulator.base_url, Path(tmp), args.workers)
            try:
                shared = f", PostgreSQL database {fluxport.database}, Redis" if fluxport.database else ""
                print(
                    f"load benchmark: steps {args.steps}, {args.duration:g} s per phase after a "
                    f"{args.ramp:g} s staggered start; fal emulator at {emulator.base_url} "
                    f"(pid {emulator.proc.pid}, generation {args.latency:g} s); fluxport at {fluxport.url} "
                    f"(pid {fluxport.proc.pid}, {args.workers} worker(s){shared}); "
                    f"client pid {os.getpid()} ({args.client}); "
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
