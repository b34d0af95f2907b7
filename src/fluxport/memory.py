"""Returning freed memory to the OS: glibc keeps what large requests free.

A large request allocates and frees hundreds of MiB: latents and decoded pixels in the pipeline,
images decoded and encoded on worker threads, the base64 answer. glibc's allocator keeps the freed
pages in its per-thread arenas, so a server that made ten 2048x2048 images stayed ~500 MiB above
what it still used (bench/soak.py). `malloc_trim(0)` hands them back. It runs off the event loop:
after each local job on the device worker, and from `release_forever` when the resident size has
moved by `change_bytes` since it last looked (a quiet server is left alone). On other C libraries
(musl, macOS, Windows) both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["release_forever", "release_freed_memory", "rss_bytes"]

logger = logging.getLogger("fluxport.memory")


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()
_STATM = Path("/proc/self/statm")


def release_freed_memory() -> None:
    """Hand the freed heap back to the OS (blocking: milliseconds; call it off the event loop)."""
    if _TRIM is not None:
        _TRIM()


def rss_bytes() -> int | None:
    """This process's resident set size, where /proc tells it."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def release_forever(*, interval_s: float = 10.0, change_bytes: int = 32 * 1024 * 1024) -> None:
    """Every `interval_s`, trim in a thread while memory is on the move: when the resident size
    moved by `change_bytes` since the last look, and once more after that (freeing does not lower
    the resident size by itself, so a request that just ended shows no change), for as long as a
    trim still returns `change_bytes`. A quiet server is not trimmed. Runs until cancelled."""
    if _TRIM is None or rss_bytes() is None:
        return
    last = rss_bytes() or 0
    pending = False
    while True:
        await asyncio.sleep(interval_s)
        rss = rss_bytes() or 0
        moved = abs(rss - last) >= change_bytes
        if not (moved or pending):
            continue
        await asyncio.to_thread(release_freed_memory)
        last = rss_bytes() or 0
        pending = moved or rss - last >= change_bytes
        logger.debug("RSS %d MiB, %d MiB after returning freed memory", rss >> 20, last >> 20)
