"""Image bytes in an S3-compatible bucket (AWS S3, MinIO, R2, Ceph...), through obstore (the
`s3` extra; imported only when FLUXPORT_BLOB_URL names a bucket).

Every replica reads and writes the same objects, so any of them serves any image link. A PUT is
atomic (an object is all there or not there), so nothing is ever torn; objects are keyed
`<prefix>/<shard>/<image_id>.<ext>` with unguessable ids, like the local store's files.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal

import obstore
from obstore.store import S3Store

from fluxport.storage.blobs.base import BlobStream, Download, Redirect, blob_path

if TYPE_CHECKING:
    from obstore import BytesStream
    from obstore.store import S3Config

__all__ = ["MAX_PRESIGN_S", "S3BlobStore"]

# SigV4 presigned URLs live at most 7 days; a redirect is signed anew on every download anyway.
MAX_PRESIGN_S: Final = 7 * 24 * 3600
ENCODE_THREADS: Final = 4
STREAM_CHUNK: Final = 256 * 1024


def _mime(path: str) -> str:
    ext = path.rsplit(".", 1)[-1]
    return "image/jpeg" if ext in ("jpg", "jpeg") else f"image/{ext}"


def _checked(path: str) -> str:
    """A key relative to the prefix, as save() makes them: refuses anything that could name an
    object outside it."""
    if not path or "\0" in path or "\\" in path or path.startswith("/"):
        raise ValueError(f"invalid blob path {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"blob path escapes the store: {path!r}")
    return path


class S3BlobStore:
    """Blobs as objects under `s3://bucket/prefix`. Credentials: the ones given, else obstore's
    usual chain (the AWS_* environment variables, web identity, container or instance roles).

    `downloads`: "proxy" streams each object through this server (the bucket stays private and
    unreachable to clients); "presign" answers a download with a redirect to a presigned GET URL
    that is valid until the link expires (the bytes then never pass through the gateway)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        downloads: Literal["proxy", "presign"] = "proxy",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.downloads = downloads
        config: S3Config = {}
        if endpoint_url:
            # Path-style requests (endpoint/bucket/key): what MinIO, moto and most others expect.
            config["endpoint"] = endpoint_url
            config["virtual_hosted_style_request"] = False
        if region:
            config["region"] = region
        if access_key_id and secret_access_key:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
            if session_token:
                config["session_token"] = session_token
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=config,
            client_options={
                "allow_http": bool(endpoint_url and endpoint_url.startswith("http://")),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=60),
            },
            # A few quick retries, not obstore's default of three minutes' worth: a request waits.
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=15)},
        )
        # Encoders (Pillow, CPU-bound) run here, not on the loop and not in the default executor.
        self._encoders = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="fluxport-encode")

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return where + (f" at {self.endpoint_url}" if self.endpoint_url else "") + f" ({self.downloads})"

    async def start(self) -> None:
        """One LIST of at most one key: the bucket exists and the credentials may read it."""
        try:
            async for _ in obstore.list(self._store, chunk_size=1):
                break
        except Exception as exc:
            raise RuntimeError(f"the image store {self.describe()} cannot be used: {exc}") from exc

    async def save(self, image_id: str, content: bytes | Callable[[], bytes], ext: str) -> str:
        path = blob_path(image_id, ext)
        if isinstance(content, bytes):
            data = content
        else:
            data = await asyncio.get_running_loop().run_in_executor(self._encoders, content)
        await obstore.put_async(
            self._store,
            path,
            data,
            attributes={
                "Content-Type": _mime(path),
                "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
            },
            use_multipart=False,  # one PUT: atomic, and an image is far below its 5 GB limit
        )
        return path

    async def read(self, path: str) -> bytes:
        result = await obstore.get_async(self._store, _checked(path))
        return bytes(await result.bytes_async())

    async def size(self, path: str) -> int | None:
        try:
            meta = await obstore.head_async(self._store, _checked(path))
        except FileNotFoundError:
            return None
        return meta["size"]

    async def delete(self, path: str) -> bool:
        # S3 answers a DELETE of a missing key with success: ask first, to tell the two apart.
        if await self.size(path) is None:
            return False
        await obstore.delete_async(self._store, path)
        return True

    async def delete_many(self, paths: Sequence[str]) -> int:
        """Bulk DeleteObjects (1000 keys a request); counts every path asked for."""
        keys = [_checked(path) for path in paths]
        if keys:
            await obstore.delete_async(self._store, keys)
        return len(keys)

    async def inventory(self) -> dict[str, int]:
        files: dict[str, int] = {}
        async for batch in obstore.list(self._store, chunk_size=1000):
            for meta in batch:
                files[meta["path"]] = meta["size"]
        return files

    async def download(self, path: str, *, valid_for_s: float) -> Download | None:
        path = _checked(path)
        if self.downloads == "presign":
            # Checked first, so that a missing object is this server's 404, not the bucket's 403.
            if await self.size(path) is None:
                return None
            seconds = min(MAX_PRESIGN_S, max(1, math.ceil(valid_for_s)))
            url = await obstore.sign_async(self._store, "GET", path, timedelta(seconds=seconds))
            return Redirect(url)
        try:
            result = await obstore.get_async(self._store, path)
        except FileNotFoundError:
            return None
        meta = result.meta
        return BlobStream(
            _chunks(result.stream(min_chunk_size=STREAM_CHUNK)),
            size=meta["size"],
            etag=meta["e_tag"],
            last_modified=meta["last_modified"],
        )

    def sync_soon(self) -> None:
        """Nothing to do: an object is durable once its PUT has answered."""

    async def aclose(self) -> None:
        await asyncio.to_thread(self._encoders.shutdown, wait=True)


async def _chunks(stream: BytesStream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield bytes(chunk)
