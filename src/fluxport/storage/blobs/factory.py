"""The blob store the settings ask for."""

from __future__ import annotations

import re
from typing import Final

from fluxport.settings import Settings
from fluxport.storage.blobs.base import BlobStore
from fluxport.storage.blobs.local import LocalBlobStore

__all__ = ["open_blob_store", "parse_blob_url"]

# S3's bucket naming rules (3-63 lowercase letters, digits, dots, hyphens; a letter or digit at
# each end), which MinIO and R2 share.
_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART: Final = re.compile(r"[A-Za-z0-9!_.*'()=+-]+")


def parse_blob_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at its ends); ValueError, saying
    what is expected, for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ValueError(
            f"FLUXPORT_BLOB_URL must be s3://bucket/prefix, not {url!r}; "
            "leave it unset to keep images in the data directory"
        )
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"FLUXPORT_BLOB_URL: {bucket!r} is not a bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens)"
        )
    prefix = prefix.strip("/")
    if prefix and not all(
        _PREFIX_PART.fullmatch(part) and part not in (".", "..") for part in prefix.split("/")
    ):
        raise ValueError(
            f"FLUXPORT_BLOB_URL: the prefix {prefix!r} must be /-separated names of letters, "
            "digits and !_.*'()=+- (no empty, '.' or '..' parts, no query)"
        )
    return bucket, prefix


def open_blob_store(settings: Settings) -> BlobStore:
    """`<data_dir>/images` unless FLUXPORT_BLOB_URL names a bucket. Call its start() before use."""
    if not settings.blob_url:
        return LocalBlobStore(settings.images_dir, fsync=settings.image_fsync)
    bucket, prefix = parse_blob_url(settings.blob_url)
    try:
        from fluxport.storage.blobs.s3 import S3BlobStore
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "FLUXPORT_BLOB_URL names an S3 bucket but obstore is not installed: pip install 'fluxport[s3]'"
        ) from exc
    return S3BlobStore(
        bucket,
        prefix,
        endpoint_url=settings.blob_endpoint_url,
        region=settings.blob_region,
        access_key_id=settings.blob_access_key_id,
        secret_access_key=settings.blob_secret_access_key,
        session_token=settings.blob_session_token,
        downloads=settings.blob_downloads,
    )
