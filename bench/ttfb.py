"""Time to first pixels: a streamed request's first partial image and its completed image, beside
the same request unstreamed, through a real `fluxport serve` and the openai SDK.

Run from the repository root: `.venv/bin/python bench/ttfb.py` (`--quick`: fewer repeats). By
default the local provider serves flux.2-dummy on the CPU (random weights, tiny); `--model`,
`--size` and `--steps` choose the job, `--env KEY=VALUE` passes settings to the server (e.g.
FLUXPORT_LOCAL_WEIGHTS=/models/flux2-dev FLUXPORT_LOCAL_DEVICE=cuda on a GPU machine).

Printed per mode, medians over `--repeat` runs after one warm-up: time to the response headers,
to the first partial image, to each later partial and to the completed event; the unstreamed
request's time to its answer; and what a partial costs (the streamed run's extra seconds over
the unstreamed one, divided by the partials it sent).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serveproc import serve, stop  # noqa: E402

STRIPPED_PREFIXES = ("FLUXPORT_", "FAL_", "REPLICATE_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamed(client: openai.OpenAI, job: dict[str, Any], partials: int) -> dict[str, Any]:
    """One streamed request: seconds to headers, to each partial, to the completed event."""
    t0 = time.perf_counter()
    stream = client.images.generate(**job, stream=True, partial_images=partials)
    headers = time.perf_counter() - t0
    times: list[float] = []
    completed = None
    for event in stream:
        if event.type.endswith("partial_image"):
            times.append(time.perf_counter() - t0)
        elif event.type.endswith("completed"):
            completed = time.perf_counter() - t0
    if completed is None:
        raise RuntimeError("the stream ended without a completed event")
    return {"headers": headers, "partials": times, "completed": completed}


def unstreamed(client: openai.OpenAI, job: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    client.images.generate(**job, response_format="b64_json")
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(url: str, args: argparse.Namespace) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    job: dict[str, Any] = {
        "model": args.model,
        "prompt": "a lighthouse at dusk, oil on canvas",
        "size": args.size,
    }
    if args.steps:
        job["extra_body"] = {"num_inference_steps": args.steps}
    unstreamed(client, job)  # warm-up: the pipeline is built on first use
    plain: list[float] = []
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in args.partials}
    for _ in range(args.repeat):  # interleaved, so drift hits every mode alike
        plain.append(unstreamed(client, job))
        for k in args.partials:
            runs[k].append(streamed(client, job, k))
    steps = f", {args.steps} steps" if args.steps else ""
    print(f"\n{args.model} at {args.size}{steps}, medians of {args.repeat} runs (seconds)")
    print(
        f"{'mode':<24} {'headers':>8} {'1st partial':>12} {'partials':>26} {'completed':>10}"
        f" {'per partial':>12}"
    )
    base = median(plain)
    print(f"{'unstreamed':<24} {'':>8} {'':>12} {'':>26} {base:>10.3f} {'':>12}")
    for k, results in runs.items():
        heads = median([r["headers"] for r in results])
        every = [median([r["partials"][i] for r in results if len(r["partials"]) > i]) for i in range(k)]
        done = median([r["completed"] for r in results])
        first = f"{every[0]:.3f}" if every else "-"
        shown = " / ".join(f"{t:.3f}" for t in every) or "-"
        cost = f"{(done - base) / k:+.3f}" if k else "-"
        print(
            f"{f'stream, partial_images={k}':<24} {heads:>8.3f} {first:>12} {shown:>26} {done:>10.3f}"
            f" {cost:>12}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flux.2-dummy")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    parser.add_argument("--partials", default="0,1,3", help="partial_images values to compare")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats at 512x512")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = parser.parse_args(argv)
    args.partials = [int(k) for k in str(args.partials).split(",") if k.strip()]
    if args.quick:
        args.repeat, args.size = 2, "512x512"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="fluxport-ttfb-") as tmp:
        port = free_port()
        log = Path(tmp) / "serve.log"
        proc = serve(Path(tmp) / "data", port, log, strip_prefixes=STRIPPED_PREFIXES, **extra)
        try:
            run(f"http://127.0.0.1:{port}", args)
        except BaseException:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
