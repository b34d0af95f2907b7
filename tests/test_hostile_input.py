"""Hostile input against a real `fluxport serve` subprocess: every bad request is a 4xx that names
the parameter (where there is one), never a 5xx, and the server's memory stays bounded."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.imagefactory import huge_png, jpeg_bytes, png_bytes, truncated_png
from tests.serveproc import rss_bytes, serve, stop

DUMMY = "flux.2-dummy"
MiB = 1024 * 1024


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api, api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    port = free_port()
    proc = serve(root / "data", port, root / "server.log", FLUXPORT_DUMMY_STEPS="1")
    try:
        yield Server(proc, port)
    finally:
        stop(proc)
    log = (root / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def error_of(r: httpx.Response) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return dict(body["error"])


def edit(live: Server, files: list[tuple[str, Any]], **fields: Any) -> httpx.Response:
    data = {"model": DUMMY, "prompt": "x", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{live.api}/images/edits", data=data, files=files, timeout=120)


# --------------------------------------------------------------------------------------------
# Reference images, through the official SDK


def bomb() -> bytes:
    """A 1.6 KB-ish PNG that declares 40000 x 40000 pixels (1.6 GP)."""
    return huge_png(40000, 40000, complete=False)


def wrong_magic() -> bytes:
    data = png_bytes(128, 128)
    return b"\xff\xd8\xff\xe0" + data[4:]  # JPEG magic on PNG data


BAD_REFERENCES: dict[str, list[bytes]] = {
    "decompression bomb": [bomb()],
    "truncated png": [truncated_png()],
    "truncated jpeg": [jpeg_bytes(256, 256)[:600]],
    "wrong magic bytes": [wrong_magic()],
    "magic only": [b"\x89PNG\r\n\x1a\n"],
    "five references": [png_bytes(128, 128)] * 5,
    "9:1 aspect": [png_bytes(1152, 128)],
    "1:9 aspect": [png_bytes(128, 1152)],
}


@pytest.mark.parametrize("case", BAD_REFERENCES)
def test_bad_references_are_400_naming_image(live: Server, case: str) -> None:
    uploads = BAD_REFERENCES[case]
    with pytest.raises(openai.BadRequestError) as info:
        live.client().images.edit(model=DUMMY, prompt="x", image=uploads if len(uploads) > 1 else uploads[0])
    assert info.value.status_code == 400
    assert info.value.param == "image", info.value.message


def test_a_50_mb_upload_is_refused_without_the_server_growing(live: Server) -> None:
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(50 * MiB)  # over the 50 MiB limit by the signature
    before = rss_bytes(live.proc.pid)
    for _ in range(3):
        r = edit(live, [("image", ("big.png", big, "image/png"))])
        err = error_of(r)
        assert r.status_code in (400, 413) and err["param"] == "image", err
    grown = rss_bytes(live.proc.pid) - before
    assert grown < 40 * MiB, f"the server grew by {grown / MiB:.1f} MiB"


def test_a_body_over_the_limit_is_413_before_it_is_read(live: Server) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 999999999999\r\n\r\n"
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


# --------------------------------------------------------------------------------------------
# Multipart


MALFORMED_MULTIPART = {
    "truncated part": b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz\r\nContent',
    "no closing boundary": b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi',
    "garbage": b"\x00\x01\x02 not multipart at all",
    "no disposition": b"--xyz\r\nContent-Type: text/plain\r\n\r\nhi\r\n--xyz--\r\n",
    "header without colon": b"--xyz\r\nbroken header line\r\n\r\nhi\r\n--xyz--\r\n",
    "empty": b"",
}


@pytest.mark.parametrize("case", MALFORMED_MULTIPART)
def test_malformed_multipart_is_400(live: Server, case: str) -> None:
    r = httpx.post(
        f"{live.api}/images/edits",
        content=MALFORMED_MULTIPART[case],
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    error_of(r)  # a part may parse before the damage: then a missing prompt or image is named


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=\xff"],
)
def test_multipart_without_a_usable_boundary_is_400(live: Server, content_type: str) -> None:
    r = httpx.post(
        f"{live.api}/images/edits",
        content=b"--xyz--\r\n",
        headers={"content-type": content_type.encode("latin-1")},  # type: ignore[dict-item]
    )
    error_of(r)


def test_too_many_parts_is_400(live: Server) -> None:
    files = [("image", ("a.png", png_bytes(64, 64), "image/png"))] * 9
    err = error_of(edit(live, files))
    assert err["param"] in ("image", None)
    fields = [(f"f{i}", (None, b"1")) for i in range(300)]
    err = error_of(edit(live, [("image", ("a.png", png_bytes(64, 64), "image/png")), *fields]))


def test_invalid_utf8_in_a_multipart_text_field_is_400_naming_it(live: Server) -> None:
    files = [("image", ("a.png", png_bytes(128, 128), "image/png")), ("prompt", (None, b"caf\xe9 \xff\xfe"))]
    r = httpx.post(f"{live.api}/images/edits", data={"model": DUMMY}, files=files, timeout=60)
    err = error_of(r)
    assert err["param"] == "prompt", err


def test_a_huge_text_field_is_refused(live: Server) -> None:
    files = [("image", ("a.png", png_bytes(128, 128), "image/png")), ("prompt", (None, b"a" * (3 * MiB)))]
    r = httpx.post(f"{live.api}/images/edits", data={"model": DUMMY}, files=files, timeout=60)
    err = error_of(r)
    assert err["param"] in ("prompt", None)


def test_deep_bracket_nesting_in_field_names(live: Server) -> None:
    files = [
        ("image", ("a.png", png_bytes(128, 128), "image/png")),
        ("x" + "[a]" * 5000, (None, b"1")),
    ]
    r = httpx.post(f"{live.api}/images/edits", data={"model": DUMMY, "prompt": "x"}, files=files, timeout=60)
    assert r.status_code < 500, r.text[:300]


# --------------------------------------------------------------------------------------------
# JSON and parameters


def gen(live: Server, body: object) -> httpx.Response:
    return httpx.post(f"{live.api}/images/generations", json=body, timeout=120)


def raw(live: Server, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(
        f"{live.api}/images/generations", content=content, headers={"content-type": content_type}, timeout=60
    )


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "flux.2-dummy", "prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"model": "flux.2-dummy", "prompt": "\xff\xfe\xfd"}',
        b"\xff\xfe{\x00}\x00",
        b'{"prompt": "\\ud800"}',  # a lone surrogate escape
        b"",
        b"null",
        b"[]",
        b'"prompt"',
        b"{",
        b'{"prompt": NaN}',
        b"[" * 100_000 + b"]" * 100_000,  # a nesting bomb
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ],
)
def test_bad_json_is_400(live: Server, content: bytes) -> None:
    error_of(raw(live, content))


def test_deep_but_parseable_nesting_in_an_extra_field(live: Server) -> None:
    body = (
        '{"model": "flux.2-dummy", "prompt": "x", "size": "256x256", "deep": ' + "[" * 900 + "]" * 900 + "}"
    )
    r = raw(live, body.encode())
    assert r.status_code < 500, r.text[:300]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "x" * 40_000),
        ("prompt", ""),
        ("prompt", 5),
        ("n", 0),
        ("n", 11),
        ("n", -1),
        ("n", 1.5),
        ("n", "many"),
        ("n", 10**30),
        ("size", "100000x100000"),
        ("size", "1024x"),
        ("size", "-1024x-1024"),
        ("size", "1e3x1e3"),
        ("size", "0:1"),
        ("size", "١٠٢٤x١٠٢٤"),  # Arabic-Indic digits
        ("aspect_ratio", "1:0"),
        ("aspect_ratio", "a:b"),
        ("aspect_ratio", "99999999999999999999:1"),
        ("resolution", "9K"),
        ("resolution", "-1"),
        ("resolution", "nan"),
        ("resolution", "inf"),
        ("resolution", 1e308),
        ("seed", -1),
        ("seed", 2**70),
        ("output_compression", 101),
        ("output_format", "bmp"),
        ("response_format", "file"),
        ("model", "gpt-image-1\x00"),
        ("cfg_scale", float("inf")),
    ],
)
def test_bad_parameters_are_400_naming_them(live: Server, field: str, value: object) -> None:
    body: dict[str, object] = {"model": DUMMY, "prompt": "a cat", "size": "256x256", field: value}
    if field in ("aspect_ratio", "resolution"):
        del body["size"]
    content = json.dumps(body, allow_nan=True).encode()
    err = error_of(raw(live, content))
    if isinstance(value, float) and not math.isfinite(value):
        assert err["code"] == "invalid_json", err  # NaN and Infinity are not JSON
    else:
        assert err["param"] == field, err


@pytest.mark.parametrize(
    "body", [{"size": "9:1"}, {"aspect_ratio": "9:1"}, {"size": "2304x256"}, {"size": "9x9"}]
)
def test_extreme_shapes_are_refused_or_fitted_into_limits(live: Server, body: dict[str, str]) -> None:
    # Documented: ratios snap to the nearest supported one and custom sizes are scaled into limits.
    r = gen(live, {"model": DUMMY, "prompt": "x", "response_format": "b64_json", **body})
    if r.status_code == 200:
        w, h = (int(v) for v in r.json()["size"].split("x"))
        assert 64 <= w <= 4096 and 64 <= h <= 4096 and max(w, h) / min(w, h) <= 8, r.json()["size"]
    else:
        assert error_of(r)["param"] == next(iter(body)), r.text


def test_huge_headers_are_refused(live: Server) -> None:
    r = httpx.post(
        f"{live.api}/images/generations",
        json={"model": DUMMY, "prompt": "x"},
        headers={"x-junk": "a" * 200_000},
        timeout=30,
    )
    assert r.status_code == 431, r.text
    many = {f"x-h{i}": "v" * 20 for i in range(5000)}
    body = {"model": DUMMY, "prompt": "x", "size": "256x256"}
    try:
        r = httpx.post(f"{live.api}/images/generations", json=body, headers=many, timeout=30)
    except httpx.RemoteProtocolError:
        return  # the server closed the connection: refused, and no 5xx
    assert r.status_code < 500


def test_the_server_still_serves_after_all_that(live: Server) -> None:
    r = gen(live, {"model": DUMMY, "prompt": "still alive", "size": "256x256", "response_format": "b64_json"})
    assert r.status_code == 200, r.text[:300]
