"""Routing benchmark: the seeds' FLUX.2 [dev] provider table, replayed by the emulators, time-scaled.

fal: p50 8,347 ms, p95 19,515 ms, 100 % success; Replicate: p50 8,831 ms, p95 10,284 ms, 48.6 %
success (a failure takes as long as a success). One request stream goes through a real
`fluxport serve` process in four set-ups: (a) fal only, (b) Replicate only, (c) fluxport balanced,
(d) fluxport balanced with hedging. It prints success rate, p50 and p95 (in the table's time,
i.e. divided by the time scale) and the mean cost per delivered image, from the emulators' billing
ledgers (a provider bills a request that completes, not one cancelled before it completes), and
the ratios of (d) to (a) against the targets: success >= 99.9 %, p95 <= 0.75 x, cost <= 1.10 x.

    .venv/bin/python bench/routing.py                 # about two minutes on 2 cores
    .venv/bin/python bench/routing.py --requests 2000 --hedge-percentile 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, Latency, ReplicateEmulator  # noqa: E402

# The seeds' Provider Rankings for FLUX.2 [dev] (anchors.md §7 style figures), in seconds.
FAL = {"p50": 8.347, "p95": 19.515, "success": 1.0}
REPLICATE = {"p50": 8.831, "p95": 10.284, "success": 0.486}


@dataclass
class Outcome:
    ok: bool
    seconds: float
    images: int
    attempts: str


@dataclass
class Row:
    name: str
    success: float
    p50_s: float
    p95_s: float
    cost_per_image: float
    hedged: float  # share of requests that started a backup attempt
    fluxport_cost: float  # what fluxport itself reported (x-fluxport-cost-usd), per image


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def start_fluxport(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket_port() as port:
        pass
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxport.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "FLUXPORT_AUTH": "none", **env},  # a local benchmark: no API keys
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fluxport did not start")


class socket_port:
    """A free loopback port (closed again before fluxport binds it)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def drive(
    url: str, count: int, concurrency: int, extra: dict[str, Any], first_seed: int
) -> list[Outcome]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    costs: list[float] = []

    async def one(i: int) -> Outcome:
        async with gate:
            t = time.monotonic()
            try:
                raw = await client.images.with_raw_response.generate(
                    model="flux.2-dev",
                    prompt=f"benchmark image {i}",
                    size="512x512",
                    extra_body={"seed": first_seed + i, **extra},
                )
                costs.append(float(raw.headers["x-fluxport-cost-usd"]))
                return Outcome(True, time.monotonic() - t, 1, raw.headers["x-fluxport-attempts"])
            except openai.APIError:
                return Outcome(False, time.monotonic() - t, 0, "")

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await client.close()
    drive.costs = costs  # type: ignore[attr-defined]
    return list(outcomes)


def run_setup(
    name: str,
    fal: FalEmulator,
    replicate: ReplicateEmulator,
    env: dict[str, str],
    extra: dict[str, Any],
    args: argparse.Namespace,
) -> Row:
    fal.reset()
    replicate.reset()
    with tempfile.TemporaryDirectory() as data:
        proc, url = start_fluxport({**env, "FLUXPORT_DATA_DIR": data})
        try:
            # Warm-up: the router measures the providers before the measured stream starts.
            asyncio.run(drive(url, args.warmup, args.concurrency, extra, first_seed=10_000_000))
            billed_before = {e.request_id for e in fal.ledger + replicate.ledger}
            outcomes = asyncio.run(drive(url, args.requests, args.concurrency, extra, first_seed=0))
            reported = list(drive.costs)  # type: ignore[attr-defined]
            time.sleep(0.5)  # cancelled losers settle
            billed = [e for e in fal.ledger + replicate.ledger if e.request_id not in billed_before]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    good = [o for o in outcomes if o.ok]
    images = sum(o.images for o in good) or 1
    scale = args.time_scale
    return Row(
        name=name,
        success=len(good) / len(outcomes),
        p50_s=nearest_rank([o.seconds for o in good], 0.5) / scale,
        p95_s=nearest_rank([o.seconds for o in good], 0.95) / scale,
        cost_per_image=sum(e.usd for e in billed) / images,
        hedged=sum(1 for o in good if "," in o.attempts) / max(1, len(good)),
        fluxport_cost=sum(reported) / images,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=600, help="measured requests per set-up")
    parser.add_argument("--warmup", type=int, default=60, help="unmeasured requests first, per set-up")
    parser.add_argument("--concurrency", type=int, default=10, help="kept well under saturation")
    parser.add_argument("--time-scale", type=float, default=0.05, help="emulated seconds per table second")
    parser.add_argument("--hedge-percentile", type=float, default=0.01)
    parser.add_argument("--poll", type=float, default=0.1, help="status poll interval, in table seconds")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    ts = args.time_scale

    fal_cfg = EmulatorConfig(run=Latency(FAL["p50"], FAL["p95"]), time_scale=ts, seed=args.seed)
    rep_cfg = EmulatorConfig(
        run=Latency(REPLICATE["p50"], REPLICATE["p95"]),
        time_scale=ts,
        seed=args.seed + 1,
        failure_rate=1 - REPLICATE["success"],
        failure_kinds=[Fault(FaultKind.FAILED)],  # status "failed" at the end of the run
    )
    started = time.monotonic()
    with FalEmulator(fal_cfg, key="bench") as fal, ReplicateEmulator(rep_cfg, token="bench") as replicate:
        base = {
            "FAL_KEY": "bench",
            "FLUXPORT_FAL_URL": fal.base_url,
            "REPLICATE_API_TOKEN": "bench",
            "FLUXPORT_REPLICATE_URL": replicate.base_url,
            "HF_HUB_OFFLINE": "1",
            # Everything the router times is scaled with the emulated latencies.
            "FLUXPORT_HOSTED_POLL_INTERVAL_S": str(args.poll * ts),
            "FLUXPORT_HOSTED_MAX_POLL_INTERVAL_S": str(args.poll * ts),
            "FLUXPORT_BREAKER_COOLDOWN_S": str(30 * ts),
            "FLUXPORT_REQUEST_DEADLINE_S": str(300 * ts),
        }
        # The single-provider baselines measure the provider itself: no breaker in the way.
        solo = {**base, "FLUXPORT_BREAKER_FAILURES": "1000000"}
        hedged = {**base, "FLUXPORT_HEDGE": "true", "FLUXPORT_HEDGE_PERCENTILE": str(args.hedge_percentile)}
        rows = [
            run_setup("(a) fal only", fal, replicate, solo, {"provider": "fal"}, args),
            run_setup("(b) Replicate only", fal, replicate, solo, {"provider": "replicate"}, args),
            run_setup("(c) fluxport balanced", fal, replicate, base, {}, args),
            run_setup(
                f"(d) fluxport hedged @p{args.hedge_percentile * 100:g}", fal, replicate, hedged, {}, args
            ),
        ]
    elapsed = time.monotonic() - started

    print(
        f"\nrouting benchmark: {args.requests} requests per set-up (+{args.warmup} warm-up), "
        f"concurrency {args.concurrency}, time scale {ts:g}, polls every {args.poll:g} s "
        f"(figures in table seconds), {elapsed:.0f} s\n"
    )
    widths = (32, 9, 8, 8, 9, 7, 11)
    header = ("set-up", "success", "p50 s", "p95 s", "$/image", "hedged", "fluxport $")
    print(
        " ".join(
            f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for r in rows:
        print(
            f"{r.name:<32} {r.success:>9.2%} {r.p50_s:>8.2f} {r.p95_s:>8.2f} {r.cost_per_image:>9.5f} "
            f"{r.hedged:>7.1%} {r.fluxport_cost:>11.5f}"
        )
    a, d = rows[0], rows[3]
    p95_ratio = d.p95_s / a.p95_s
    cost_ratio = d.cost_per_image / a.cost_per_image
    print(f"\n(d) / (a): p95 {p95_ratio:.2f}x (target <= 0.75), cost {cost_ratio:.2f}x (target <= 1.10)")
    print(f"(d) success {d.success:.2%} (target >= 99.9 %)")
    met = d.success >= 0.999 and p95_ratio <= 0.75 and cost_ratio <= 1.10
    print("targets met" if met else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
