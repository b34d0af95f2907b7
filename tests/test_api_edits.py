"""POST /v1/images/edits exactly as the SDK sends it, and the bad-input suite."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer
from tests.imagefactory import huge_png, jpeg_bytes, not_an_image, png_bytes, truncated_png, webp_bytes

DUMMY = "flux.2-dummy"


def size_of(result: object) -> tuple[int, int]:
    data = result.data  # type: ignore[attr-defined]
    assert data
    image = Image.open(io.BytesIO(base64.b64decode(data[0].b64_json)))
    return image.size


def test_edit_with_one_image_takes_its_shape(client: openai.OpenAI) -> None:
    # A single file is sent as the part "image"; auto size = the reference's shape at 1K.
    result = client.images.edit(
        model=DUMMY, image=png_bytes(600, 400), prompt="make it blue", response_format="b64_json"
    )
    w, h = size_of(result)
    assert result.size == f"{w}x{h}"
    assert abs(w / h - 1.5) < 0.01 and abs(w * h - 1024 * 1024) < 5000


def test_edit_with_four_images_as_image_array(client: openai.OpenAI) -> None:
    # A list is sent as four "image[]" parts, each an octet-stream named "upload".
    images = [png_bytes(256, 256), jpeg_bytes(300, 200), webp_bytes(200, 300), png_bytes(512, 128)]
    raw = client.images.with_raw_response.edit(
        model=DUMMY, image=images, prompt="combine them", size="512x512", n=2, response_format="b64_json"
    )
    result = raw.parse()
    assert raw.headers["x-fluxport-provider"] == "local"
    assert result.data is not None and len(result.data) == 2
    assert size_of(result) == (512, 512)


def test_edit_with_indexed_parts_and_bracketed_fields(server: LiveServer) -> None:
    files = [
        ("image[0]", ("a.png", png_bytes(256, 256), "image/png")),
        ("image[1]", ("b", jpeg_bytes(256, 256), "x/y")),
    ]
    data = {
        "prompt": "x",
        "model": DUMMY,
        "n": "1",
        "seed": "5",
        "response_format": "b64_json",
        "foo[bar]": "1",
    }
    r = httpx.post(f"{server.api}/images/edits", data=data, files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["seed"] == 5


BAD_UPLOADS = {
    "non-image bytes": [not_an_image()],
    "empty file": [b""],
    "truncated png": [truncated_png()],
    "70 MP png": [huge_png(10000, 7000)],
    "five images": [png_bytes(128, 128)] * 5,
    "too small": [png_bytes(63, 200)],
    "9:1": [png_bytes(900, 100)],
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_reference_images_are_400_naming_image(client: openai.OpenAI, case: str) -> None:
    uploads = BAD_UPLOADS[case]
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model=DUMMY, image=uploads if len(uploads) > 1 else uploads[0], prompt="x")
    assert info.value.param == "image", info.value.message
    assert info.value.status_code == 400


def test_string_where_a_file_belongs_and_other_files(server: LiveServer) -> None:
    # A text part named like a file (multipart, no filename): OpenAI's own invalid_type error.
    r = httpx.post(
        f"{server.api}/images/edits",
        data={"prompt": "x", "model": DUMMY},
        files=[("image[0]", (None, b"hello"))],
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "image[0]"
    r = httpx.post(
        f"{server.api}/images/edits",
        data={"prompt": "x", "model": DUMMY},
        files=[("image", ("a.png", png_bytes(128, 128))), ("mask", ("m.png", png_bytes(128, 128)))],
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = httpx.post(f"{server.api}/images/edits", data={"prompt": "x", "model": DUMMY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(f"{server.api}/images/edits", json={"prompt": "x", "model": DUMMY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_malformed_multipart_is_400(server: LiveServer) -> None:
    body = b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz\r\nContent-Disp'
    r = httpx.post(
        f"{server.api}/images/edits",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["param"] in ("image", None)
