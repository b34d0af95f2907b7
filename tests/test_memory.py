"""Freed memory goes back to the OS (glibc's malloc_trim), on demand and from the periodic task."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fluxport import memory

pytestmark = pytest.mark.skipif(
    memory._TRIM is None or memory.rss_bytes() is None, reason="needs glibc's malloc_trim and /proc"
)

MIB = 1024 * 1024


def _fragment(keep: list[bytes], mib: int = 192) -> None:
    """Allocate `mib` MiB in 64 KiB blocks on a thread (its own arena, as the workers' are), then
    free all but every 32nd block, which pins the freed pages between them in the heap."""
    blocks = [b"\x01" * (64 * 1024) for _ in range(mib * 16)]  # written: resident, not lazily zero
    keep.extend(blocks[::32])
    del blocks


def _fragmented() -> list[bytes]:
    keep: list[bytes] = []
    thread = threading.Thread(target=_fragment, args=(keep,))
    thread.start()
    thread.join()
    return keep


def test_release_freed_memory_returns_pinned_free_pages() -> None:
    keep = _fragmented()
    before = memory.rss_bytes() or 0
    memory.release_freed_memory()
    after = memory.rss_bytes() or 0
    assert before - after > 64 * MIB, (before >> 20, after >> 20)
    assert len(keep) == 192 * 16 // 32  # the pinned blocks are still there


async def test_release_forever_trims_once_the_resident_size_moved() -> None:
    task = asyncio.create_task(memory.release_forever(interval_s=0.05, change_bytes=32 * MIB))
    try:
        await asyncio.sleep(0.1)
        high = memory.rss_bytes() or 0
        keep = await asyncio.to_thread(_fragmented)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (memory.rss_bytes() or 0) < high + 64 * MIB:
                break
        assert (memory.rss_bytes() or 0) < high + 64 * MIB
        assert keep
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
