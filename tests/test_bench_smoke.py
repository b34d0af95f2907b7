"""`python -m bench.load --quick` runs end to end: the emulator, a real `fluxport serve`, both client paths.

No timing assertions: the speed targets live in the benchmark's own output, not in tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_load_benchmark_quick_runs_and_prints_its_table() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXPORT_", "FAL_", "REPLICATE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--quick"],
        cwd=ROOT,
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    for heading in ("== unloaded:", "== 20 clients:"):
        assert heading in out, out
    assert out.count("\ndirect ") == 2 and out.count("\nfluxport ") == 2, out
    assert "added latency (fluxport - direct)" in out
    assert "where the time goes (ms)" in out
    assert "creating a small file in fluxport's data dir takes" in out
    assert "one extra HTTP hop alone" in out and "fluxport's own share of the added p50" in out
    assert "targets (" in out and "fluxport peak RSS <= 500 MiB" in out


def test_ttfb_benchmark_quick_runs_and_prints_its_table() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXPORT_", "FAL_", "REPLICATE_"))}
    done = subprocess.run(
        [sys.executable, "bench/ttfb.py", "--quick", "--steps", "4", "--partials", "0,2"],
        cwd=ROOT,
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    assert "flux.2-dummy at 512x512, 4 steps, medians of 2 runs" in out, out
    rows = {
        line.split("  ")[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("unstreamed", "stream"))
    }
    assert set(rows) == {"unstreamed", "stream, partial_images=0", "stream, partial_images=2"}, out
    two = rows["stream, partial_images=2"]
    # headers, first partial, "p0 / p1", completed, per partial: every figure printed.
    assert len(two) == 9 and two[5] == "/", out
    headers, first, second, completed = (float(two[i]) for i in (2, 3, 6, 7))
    assert 0 < headers <= first <= second <= completed, out


def test_gpu_benchmark_runs_its_modes_on_the_dummy() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu.py",
            "--dummy",
            "--size",
            "128",
            "--steps",
            "6",
            "--repeat",
            "1",
            "--modes",
            "plain,taylorseer,turbo-8,batch-2,group,fp8,nf4",
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert list(rows) == ["plain", "taylorseer", "turbo-8", "batch-2", "group", "fp8", "nf4"], out
    assert rows["plain"][-1] == "1.00" and all(float(r[2]) > 0 for r in rows.values()), out
