"""The S3-compatible image store (storage/blobs/s3.py), against moto's standalone S3 server.

No real S3 server (MinIO, Ceph, AWS itself) can be installed or reached on this machine; moto's
standalone server is the closest maintained stand-in: a real HTTP server on loopback speaking the
S3 REST API (PUT/GET/HEAD/DELETE, bulk DeleteObjects, ListObjectsV2, presigned URLs), which
obstore talks to exactly as it would to a bucket. The local directory stays the tested default
(tests/test_storage.py, tests/test_repair_and_expiry.py). These tests skip when moto or obstore
is not installed (`pip install -e '.[dev]'`) or moto's server cannot start.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from fluxport.settings import Settings
from fluxport.storage.blobs import BlobStore, BlobStream, Redirect, new_image_id, open_blob_store
from fluxport.storage.db import Database, ImageRow
from fluxport.storage.repair import repair_on_start
from tests import serveproc
from tests.conftest import free_port, start_server

pytest.importorskip("obstore", reason="the s3 extra (obstore) is not installed: pip install -e '.[dev]'")
moto_server = pytest.importorskip(
    "moto.server", reason="moto's standalone server is not installed: pip install -e '.[dev]'"
)
boto3 = pytest.importorskip("boto3", reason="boto3 (installed with moto) is missing")

BUCKET = "fluxport-test"
REGION = "us-east-1"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
PNG = b"\x89PNG\r\n\x1a\n" + b"not really a png, but bytes all the same" * 10


@dataclass
class Moto:
    endpoint: str
    s3: Any  # a boto3 S3 client: an independent view of the bucket

    def keys(self, prefix: str) -> dict[str, int]:
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
        return {o["Key"]: o["Size"] for o in listed.get("Contents", [])}

    def body(self, key: str) -> bytes:
        return bytes(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def settings(self, prefix: str, **overrides: Any) -> dict[str, Any]:
        return {
            "blob_url": f"s3://{BUCKET}/{prefix}",
            "blob_endpoint_url": self.endpoint,
            "blob_region": REGION,
            **KEYS,
            **overrides,
        }


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    port = free_port()
    try:
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"moto's standalone S3 server could not start: {exc!r}")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        yield Moto(endpoint, s3)
    finally:
        server.stop()


def store_for(moto: Moto, tmp_path: Path, prefix: str, **overrides: Any) -> BlobStore:
    from fluxport.storage.blobs.s3 import S3BlobStore

    store = open_blob_store(Settings(data_dir=tmp_path, **moto.settings(prefix, **overrides)))
    assert isinstance(store, S3BlobStore)
    return store


def prefix() -> str:
    return f"run-{uuid.uuid4().hex[:12]}/images"


async def test_save_read_size_delete_under_the_prefix(moto: Moto, tmp_path: Path) -> None:
    where = prefix()
    store = store_for(moto, tmp_path, where)
    await store.start()
    image_id = new_image_id()
    assert len(image_id) == 32  # 192 random bits

    path = await store.save(image_id, lambda: PNG, "png")  # an encoder: run off the loop
    assert path.endswith(f"/{image_id}.png") and not path.startswith("/")
    assert moto.keys(where) == {f"{where}/{path}": len(PNG)}  # the key is under the prefix
    assert moto.body(f"{where}/{path}") == PNG
    head = moto.s3.head_object(Bucket=BUCKET, Key=f"{where}/{path}")
    assert head["ContentType"] == "image/png"
    assert head["ContentDisposition"] == f'inline; filename="{image_id}.png"'
    assert await store.read(path) == PNG
    assert await store.size(path) == len(PNG)
    assert await store.inventory() == {path: len(PNG)}

    jpg = await store.save(new_image_id(), b"\xff\xd8jpeg", "jpg")
    assert moto.s3.head_object(Bucket=BUCKET, Key=f"{where}/{jpg}")["ContentType"] == "image/jpeg"

    assert await store.delete(path) is True
    assert await store.delete(path) is False  # already gone (S3 itself would answer success)
    assert await store.size(path) is None
    assert await store.download(path, valid_for_s=60) is None
    with pytest.raises(FileNotFoundError):
        await store.read(path)
    assert moto.keys(where) == {f"{where}/{jpg}": 6}
    assert await store.delete_many([jpg]) == 1
    assert moto.keys(where) == {}
    await store.aclose()


async def test_missing_objects_and_bad_paths(moto: Moto, tmp_path: Path) -> None:
    store = store_for(moto, tmp_path, prefix())
    missing = "ab/" + new_image_id() + ".png"
    assert await store.size(missing) is None
    assert await store.download(missing, valid_for_s=60) is None
    with pytest.raises(FileNotFoundError):
        await store.read(missing)
    for bad in ("", "/abs.png", "../other/x.png", "ab/../../x.png", "ab//x.png", "a\\b.png"):
        with pytest.raises(ValueError):
            await store.read(bad)
    with pytest.raises(ValueError):
        await store.save("not/an/id", PNG, "png")
    await store.aclose()


async def test_downloads_proxied_or_presigned(moto: Moto, tmp_path: Path) -> None:
    where = prefix()
    proxy = store_for(moto, tmp_path, where)
    path = await proxy.save(new_image_id(), PNG, "png")
    streamed = await proxy.download(path, valid_for_s=60)
    assert isinstance(streamed, BlobStream)
    assert streamed.size == len(PNG) and streamed.etag
    assert b"".join([chunk async for chunk in streamed.chunks]) == PNG

    presign = store_for(moto, tmp_path, where, blob_downloads="presign")
    signed = await presign.download(path, valid_for_s=90.2)
    assert isinstance(signed, Redirect)
    url = urlsplit(signed.url)
    assert f"{url.scheme}://{url.netloc}" == moto.endpoint
    assert url.path == f"/{BUCKET}/{where}/{path}"
    assert parse_qs(url.query)["X-Amz-Expires"] == ["91"]  # until the link expires, rounded up
    async with httpx.AsyncClient() as http:
        got = await http.get(signed.url)
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    await proxy.aclose()
    await presign.aclose()


async def test_start_refuses_a_bucket_that_is_not_there(moto: Moto, tmp_path: Path) -> None:
    store = store_for(moto, tmp_path, "x", blob_url="s3://no-such-bucket-here/x")
    with pytest.raises(RuntimeError, match=r"s3://no-such-bucket-here/x.*cannot be used"):
        await store.start()
    await store.aclose()


def test_settings_refuse_what_is_not_an_s3_url() -> None:
    for bad, says in (
        ("gs://bucket/x", "must be s3://bucket/prefix"),
        ("s3://Bad_Bucket/x", "is not a bucket name"),
        ("s3://bucket/../x", "prefix"),
        ("s3://bucket/a?b=1", "prefix"),
    ):
        with pytest.raises(ValueError, match=says):
            Settings(blob_url=bad)
    with pytest.raises(ValueError, match="presign needs FLUXPORT_BLOB_URL"):
        Settings(blob_downloads="presign")
    assert Settings(blob_url="s3://bucket.example-1/a/b/").blob_url == "s3://bucket.example-1/a/b/"


async def test_start_up_repair_deletes_expired_objects_only(moto: Moto, tmp_path: Path) -> None:
    """Objects of expired images go; fresh ones and objects with no record (another replica may
    be about to commit theirs) stay."""
    where = prefix()
    store = store_for(moto, tmp_path, where)
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await db.create_request(id="r1", model="m", operation="generate", prompt="p", params={}, n=2)
        now = datetime.now(UTC)
        paths = {}
        rows = []
        for index, (name, age) in enumerate((("old", 7200), ("fresh", 5))):
            image_id = f"{name}-image-000000000000000000"
            paths[name] = await store.save(image_id, PNG, "png")
            created = now - timedelta(seconds=age)
            rows.append(
                ImageRow(image_id, "r1", index, paths[name], "png", "image/png", 1, 1, len(PNG), created)
            )
        await db.add_images(rows)
        paths["orphan"] = await store.save("orphan-image-0000000000000000", PNG, "png")

        report = await repair_on_start(db, store, ttl_s=3600)
        assert report.expired_files == 1
        assert report.orphan_files == 0 and report.missing_files == 0
        assert set(moto.keys(where)) == {f"{where}/{paths['fresh']}", f"{where}/{paths['orphan']}"}
        assert await db.get_image("old-image-000000000000000000") is not None  # records are kept
    finally:
        await db.close()
        await store.aclose()


def _generate(live: Any) -> tuple[str, dict[str, Any]]:
    client = live.client()
    result = client.images.generate(
        model="flux.2-dummy", prompt="a red square", size="256x256", response_format="url"
    )
    assert result.data and result.data[0].url
    return result.data[0].url, result.model_dump()


def _object_of(moto: Moto, where: str, url: str) -> str:
    name = url.rsplit("/", 1)[1]
    (key,) = [k for k in moto.keys(where) if k.endswith("/" + name)]
    return key


def test_proxied_links_end_to_end_and_expiry(moto: Moto, tmp_path: Path) -> None:
    where = prefix()
    live = start_server(tmp_path, **moto.settings(where, image_ttl_s=4, dummy_steps=1))
    try:
        url, body = _generate(live)
        key = _object_of(moto, where, url)
        got = httpx.get(url)
        assert got.status_code == 200, got.text
        assert got.content == moto.body(key)  # the bytes in the bucket, streamed through
        assert got.headers["content-type"] == "image/png"
        assert got.headers["content-length"] == str(len(got.content))
        assert got.headers["content-disposition"] == f'inline; filename="{url.rsplit("/", 1)[1]}"'
        assert 0 <= int(got.headers["cache-control"].rsplit("=", 1)[1]) <= 4
        assert Image.open(io.BytesIO(got.content)).size == (256, 256)
        assert not list((tmp_path / "images").rglob("*.png"))  # nothing written to the data dir

        while time.time() < body["created"] + 4:
            time.sleep(0.1)
        gone = httpx.get(url)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "expired"
        deadline = time.monotonic() + 15
        while key in moto.keys(where) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert key not in moto.keys(where), "the expiry sweep deletes the object"
        assert httpx.get(url).json()["error"]["code"] == "expired"  # the record is kept
    finally:
        live.stop()


def test_presigned_links_end_to_end(moto: Moto, tmp_path: Path) -> None:
    where = prefix()
    settings = moto.settings(where, image_ttl_s=600, dummy_steps=1, blob_downloads="presign")
    live = start_server(tmp_path, **settings)
    try:
        url, _ = _generate(live)
        key = _object_of(moto, where, url)
        redirect = httpx.get(url, follow_redirects=False)
        assert redirect.status_code == 307, redirect.text
        location = urlsplit(redirect.headers["location"])
        assert f"{location.scheme}://{location.netloc}" == moto.endpoint
        assert location.path == f"/{BUCKET}/{key}"
        assert 590 <= int(parse_qs(location.query)["X-Amz-Expires"][0]) <= 600
        got = httpx.get(url, follow_redirects=True)
        assert got.status_code == 200 and got.content == moto.body(key)
        assert got.headers["content-type"] == "image/png"

        # A wrong extension or id is still this server's 404, and so is an object gone from the bucket.
        assert httpx.get(url.rsplit(".", 1)[0] + ".jpg").status_code == 404
        moto.s3.delete_object(Bucket=BUCKET, Key=key)
        missing = httpx.get(url, follow_redirects=False)
        assert missing.status_code == 404 and missing.json()["error"]["type"]
    finally:
        live.stop()


def test_fluxport_serve_refuses_to_start_on_a_missing_bucket(moto: Moto, tmp_path: Path) -> None:
    env = {
        "FLUXPORT_BLOB_URL": f"s3://no-such-bucket-here/{prefix()}",
        "FLUXPORT_BLOB_ENDPOINT_URL": moto.endpoint,
        "FLUXPORT_BLOB_REGION": REGION,
        **KEYS,
    }
    with pytest.raises(RuntimeError, match="exited") as refused:
        serveproc.serve(tmp_path, free_port(), tmp_path / "serve.log", strip_prefixes=("FLUXPORT_",), **env)
    assert "the image store s3://no-such-bucket-here/" in str(refused.value)
    assert "cannot be used" in str(refused.value) and "NoSuchBucket" in str(refused.value)
