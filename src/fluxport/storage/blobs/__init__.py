"""Image blobs: the `BlobStore` interface, the local directory (default) and S3-compatible stores.

`open_blob_store(settings)` picks one: `FLUXPORT_BLOB_URL=s3://bucket/prefix` for a bucket every
replica shares (the `s3` extra), unset for `<data_dir>/images`.
"""

from fluxport.storage.blobs.base import (
    BlobStore,
    BlobStream,
    Download,
    LocalFile,
    Redirect,
    blob_path,
    new_image_id,
)
from fluxport.storage.blobs.factory import open_blob_store, parse_blob_url
from fluxport.storage.blobs.local import TEMP_SUFFIX, LocalBlobStore

__all__ = [
    "TEMP_SUFFIX",
    "BlobStore",
    "BlobStream",
    "Download",
    "LocalBlobStore",
    "LocalFile",
    "Redirect",
    "blob_path",
    "new_image_id",
    "open_blob_store",
    "parse_blob_url",
]
