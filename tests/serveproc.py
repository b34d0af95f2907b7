"""A real `fluxport serve` subprocess on a free port (for kill -9 and memory measurements)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["healthy", "rss_bytes", "serve", "start", "stop", "wait_ready"]

_PROVIDER_KEYS = ("FAL_KEY", "FLUXPORT_FAL_KEY", "REPLICATE_API_TOKEN", "FLUXPORT_REPLICATE_API_TOKEN")


def serve(
    data_dir: Path,
    port: int,
    log: Path,
    *,
    strip_prefixes: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
    **env_overrides: str,
) -> subprocess.Popen[bytes]:
    """Start `fluxport serve` (auth none) on `port` with `data_dir`; returns once /healthz answers.

    `strip_prefixes` also drops inherited variables that start with them (e.g. "FLUXPORT_");
    `args` are more options for `fluxport serve` (e.g. "--workers", "2")."""
    proc = start(data_dir, port, log, strip_prefixes=strip_prefixes, args=args, **env_overrides)
    wait_ready(proc, port, log)
    return proc


def start(
    data_dir: Path,
    port: int,
    log: Path,
    *,
    strip_prefixes: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
    **env_overrides: str,
) -> subprocess.Popen[bytes]:
    """`serve` without waiting: the process, however far it has got (its output goes to `log`)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROVIDER_KEYS and not (strip_prefixes and k.startswith(strip_prefixes))
    }
    env |= {"FLUXPORT_DATA_DIR": str(data_dir), "FLUXPORT_AUTH": "none", "HF_HUB_OFFLINE": "1"}
    env |= env_overrides
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluxport.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def healthy(port: int) -> bool:
    """Whether /healthz answers 200 on `port` now."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 120) -> None:
    """Return once /healthz answers; raise, with the end of the log, if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fluxport serve exited: {log.read_text(errors='replace')[-2000:]}")
        if healthy(port):
            return
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fluxport serve did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
