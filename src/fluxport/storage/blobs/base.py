"""What every image store offers, and the names blobs get in any of them."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

__all__ = ["BlobStore", "BlobStream", "Download", "LocalFile", "Redirect", "blob_path", "new_image_id"]

_IMAGE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EXT: Final = re.compile(r"[a-z0-9]{1,10}")


def new_image_id() -> str:
    """An unguessable image id: 192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def blob_path(image_id: str, ext: str) -> str:
    """Where an image lives in any store, `<shard>/<image_id>.<ext>`: 256 shards keep any one
    directory small (and spread an object store's keys)."""
    if not _IMAGE_ID.fullmatch(image_id):
        raise ValueError(f"invalid image id {image_id!r}")
    ext = ext.removeprefix(".").lower()
    if not _EXT.fullmatch(ext):
        raise ValueError(f"invalid extension {ext!r}")
    # Hashing spreads ids evenly and keeps shard names to [0-9a-f] (ids may start with '-').
    shard = hashlib.sha256(image_id.encode()).hexdigest()[:2]
    return f"{shard}/{image_id}.{ext}"


@dataclass(frozen=True, slots=True)
class LocalFile:
    """Serve this file from disk."""

    path: Path


@dataclass(frozen=True, slots=True)
class BlobStream:
    """Serve these bytes as they arrive from the store."""

    chunks: AsyncIterator[bytes]
    size: int
    etag: str | None = None
    last_modified: datetime | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the client here (a presigned URL, valid as long as the link)."""

    url: str


# How a download is served; see BlobStore.download.
Download = LocalFile | BlobStream | Redirect


class BlobStore(Protocol):
    """Where image bytes live: a local directory (`LocalBlobStore`, the default) or an S3-compatible
    bucket (`S3BlobStore`). `path`s are what save() returns, relative to the store (its root or its
    bucket prefix), recorded with each image; they are built from unguessable ids (blob_path)."""

    async def start(self) -> None:
        """Get ready before serving (create directories, check the bucket answers); raises with
        a message saying what is wrong when the store cannot be used."""
        ...

    async def save(self, image_id: str, content: bytes | Callable[[], bytes], ext: str) -> str:
        """Store atomically (readers see all of a blob or none of it); returns its path. `content`:
        the bytes, or a function that makes them (an encoder), run off the event loop first."""
        ...

    async def read(self, path: str) -> bytes:
        """The blob's bytes; FileNotFoundError when there is none."""
        ...

    async def size(self, path: str) -> int | None:
        """The stored blob's size in bytes; None when there is none."""
        ...

    async def delete(self, path: str) -> bool:
        """Remove a blob; False if it was already gone."""
        ...

    async def delete_many(self, paths: Sequence[str]) -> int:
        """Remove these blobs (the expiry sweep); returns how many were removed (an object store
        that cannot tell counts every path it was asked to remove)."""
        ...

    async def inventory(self) -> dict[str, int]:
        """Every stored blob: path -> size (the start-up repair)."""
        ...

    async def download(self, path: str, *, valid_for_s: float) -> Download | None:
        """How to serve a blob for a link that stays valid `valid_for_s` more seconds; None when
        there is no such blob."""
        ...

    def sync_soon(self) -> None:
        """The caller's answer is out: make the blobs saved so far durable, in the background."""
        ...

    async def aclose(self) -> None:
        """Finish the writes in progress; the store is not used after this."""
        ...

    def describe(self) -> str:
        """Where the blobs are, for logs (no credentials)."""
        ...
