"""Image bytes on local disk, written atomically; paths are relative to the store's root."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, Literal

__all__ = ["TEMP_SUFFIX", "BlobStore", "new_image_id"]

log = logging.getLogger(__name__)

# Leftover temp files (a crash mid-write) end in this, so a sweep can find and remove them.
TEMP_SUFFIX: Final = ".tmp"
_IMAGE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EXT: Final = re.compile(r"[a-z0-9]{1,10}")
WRITE_THREADS: Final = 4


def new_image_id() -> str:
    """An unguessable image id: 192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


class BlobStore:
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
        if not _IMAGE_ID.fullmatch(image_id):
            raise ValueError(f"invalid image id {image_id!r}")
        ext = ext.removeprefix(".").lower()
        if not _EXT.fullmatch(ext):
            raise ValueError(f"invalid extension {ext!r}")
        # Hashing spreads ids evenly and keeps shard names to [0-9a-f] (ids may start with '-').
        shard = hashlib.sha256(image_id.encode()).hexdigest()[:2]
        return f"{shard}/{image_id}.{ext}"

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

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self.resolve(path).read_bytes)

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

    def exists(self, path: str) -> bool:
        return self.resolve(path).is_file()

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
