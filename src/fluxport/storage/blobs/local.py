"""Image bytes on local disk (the default store), written atomically; paths are relative to the
store's root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, Literal

from fluxport.storage.blobs.base import Download, LocalFile, blob_path

__all__ = ["TEMP_SUFFIX", "WRITE_THREADS", "LocalBlobStore"]

log = logging.getLogger(__name__)

# Leftover temp files (a crash mid-write) end in this, so a sweep can find and remove them.
TEMP_SUFFIX: Final = ".tmp"
WRITE_THREADS: Final = 4


class LocalBlobStore:
    """Stores blobs under `root` as `<shard>/<image_id>.<ext>`; file I/O runs in worker threads.

    A save is atomic (temp file, then rename): readers, and a process that dies, see all of a blob
    or none of it. It is made durable against power loss (fsync of the file and its directory)
    before save() returns with `fsync="before_answer"`; with `fsync="after_answer"` on the writer
    threads once the caller says its answer is out (sync_soon(), or close()), which spares the
    caller the wait and keeps the fsync off the disk while its records commit; a blob torn by a
    power cut in that window is found by its size and removed with its record at start-up
    (storage/repair.py).
    """

    def __init__(
        self, root: Path, *, fsync: Literal["before_answer", "after_answer"] = "before_answer"
    ) -> None:
        self.root = Path(root).resolve()
        self.fsync_before_return = fsync == "before_answer"
        self._syncing: asyncio.Future[None] | None = None  # the one fsync job under way
        self._unsynced: list[Path] = []
        self._closing = False
        # Writes wait on fsync, not on the CPU: their own threads, so that a burst of saves under
        # load does not queue the shared default executor (image codecs, DNS look-ups) behind them.
        self._writers = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="fluxport-blob")

    @staticmethod
    def relative_path(image_id: str, ext: str) -> str:
        """Where an image lives: 256 shard dirs keep any one directory small."""
        return blob_path(image_id, ext)

    def describe(self) -> str:
        return f"directory {self.root}"

    def resolve(self, path: str) -> Path:
        """The absolute path of a stored blob; refuses anything that would leave the root."""
        if not path or "\0" in path:
            raise ValueError("empty or invalid blob path")
        relative = Path(path)
        if relative.is_absolute():
            raise ValueError(f"blob path must be relative: {path!r}")
        full = (self.root / relative).resolve()
        if full == self.root or not full.is_relative_to(self.root):
            raise ValueError(f"blob path escapes the store: {path!r}")
        return full

    def prepare(self) -> None:
        """Create the root and all 256 shard directories up front (blocking; at start-up), so that
        no save has to create one, and fsync its parent, while a client waits."""
        self.root.mkdir(parents=True, exist_ok=True)
        created = False
        for shard in range(256):
            directory = self.root / f"{shard:02x}"
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                created = True
        if created:
            _fsync_dir(self.root)

    async def start(self) -> None:
        await asyncio.to_thread(self.prepare)

    async def save(self, image_id: str, content: bytes | Callable[[], bytes], ext: str) -> str:
        """Write atomically and durably; returns the path relative to the root. `content`: the
        bytes, or a function that makes them (an encoder), run on the writer thread first."""
        rel = self.relative_path(image_id, ext)
        target = self.root / rel  # safe without resolve(): relative_path admits no '/', '..' or links
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writers, self._write, target, content, self.fsync_before_return)
        if not self.fsync_before_return:
            self._unsynced.append(target)
        return rel

    def sync_soon(self) -> None:
        """Start making the blobs saved so far durable, in the background (`after_answer`).

        One sync job at a time takes every file saved meanwhile (and fsyncs each directory once):
        under load, a few thread hops for many files rather than one per file."""
        if self._unsynced and not self._syncing and not self._closing:
            self._sync_next(asyncio.get_running_loop())

    def _sync_next(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._unsynced = self._unsynced, []
        self._syncing = loop.run_in_executor(self._writers, _fsync_written, batch)
        self._syncing.add_done_callback(lambda future: self._synced(future, loop))

    def _synced(self, future: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        self._syncing = None
        if not future.cancelled() and future.exception() is not None:
            log.error("fsync of saved images failed: %r", future.exception())
        if self._unsynced and not self._closing and not loop.is_closed():
            self._sync_next(loop)

    def close(self) -> None:
        """Finish the writes and fsyncs in progress (and any still queued), stop the threads."""
        self._closing = True
        self._writers.shutdown(wait=True)
        if self._unsynced:
            _fsync_written(self._unsynced)
            self._unsynced = []

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self.resolve(path).read_bytes)

    async def size(self, path: str) -> int | None:
        target = self.resolve(path)

        def stat() -> int | None:
            try:
                return target.stat().st_size if target.is_file() else None
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(stat)

    async def download(self, path: str, *, valid_for_s: float) -> Download | None:
        # One stat, on the loop as the response's own (FileResponse stats the file again).
        return LocalFile(self.resolve(path)) if self.exists(path) else None

    async def delete(self, path: str) -> bool:
        """Remove a blob; returns False if it was already gone."""
        target = self.resolve(path)

        def unlink() -> bool:
            try:
                target.unlink()
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(unlink)

    async def delete_many(self, paths: Sequence[str]) -> int:
        return await asyncio.to_thread(_unlink, [self.resolve(path) for path in paths])

    def exists(self, path: str) -> bool:
        """Whether the blob is on disk (blocking: a stat)."""
        return self.resolve(path).is_file()

    async def inventory(self) -> dict[str, int]:
        files, _temps = await asyncio.to_thread(self.scan)
        return files

    def scan(self) -> tuple[dict[str, int], list[Path]]:
        """(relative path -> size of the stored files, temp files of interrupted writes) under the
        root (blocking: walks the directory)."""
        files: dict[str, int] = {}
        temps: list[Path] = []
        if not self.root.is_dir():
            return files, temps
        for directory, _dirs, names in os.walk(self.root):
            for name in names:
                full = Path(directory) / name
                if name.endswith(TEMP_SUFFIX):
                    temps.append(full)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        files[full.relative_to(self.root).as_posix()] = full.stat().st_size
        return files, temps

    @staticmethod
    def _write(target: Path, content: bytes | Callable[[], bytes], durable: bool = True) -> None:
        data = content if isinstance(content, bytes) else content()
        new_shard = not target.parent.is_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so os.replace is an atomic rename on one filesystem:
        # readers see the old file or the whole new one, never a partial write.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a front web server may serve these
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable or new_shard:
            _fsync_dir(target.parent)
        if new_shard:
            _fsync_dir(target.parent.parent)


def _unlink(paths: Sequence[Path]) -> int:
    """Remove these files; returns how many were there."""
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _fsync_written(targets: list[Path]) -> None:
    """Make blobs saved without fsync durable: their data, then the renames in their directories."""
    if os.name != "posix":
        return
    directories: dict[Path, None] = {}
    for target in targets:
        try:
            fd = os.open(target, os.O_RDONLY)
        except FileNotFoundError:  # deleted meanwhile (expired, or its request's record failed)
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        directories[target.parent] = None
    for directory in directories:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
