"""POST /v1/images/generations with the official openai SDK against a live server."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from fluxport.media import sniff_format
from tests.conftest import LiveServer

DUMMY = "flux.2-dummy"


def decode(b64: str | None) -> tuple[bytes, Image.Image]:
    assert b64
    data = base64.b64decode(b64)
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def test_b64_json(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY, prompt="a red fox", size="512x384", response_format="b64_json"
    )
    result = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-fluxport-provider"] == "local"
    assert "response_format=emulated" in raw.headers["x-fluxport-normalization"]
    assert result.size == "512x384"
    assert result.data is not None and len(result.data) == 1
    data, image = decode(result.data[0].b64_json)
    assert sniff_format(data) == "png" and image.size == (512, 384)
    assert result.data[0].url is None


def test_url_is_served_and_unguessable(server: LiveServer, client: openai.OpenAI) -> None:
    result = client.images.generate(model=DUMMY, prompt="a lighthouse", size="640x480")
    assert result.data is not None
    url = result.data[0].url
    assert url and url.startswith(server.url + "/images/")
    image_id = url.rsplit("/", 1)[1].split(".")[0]
    assert len(image_id) >= 32  # 24 random bytes, url-safe base64
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (640, 480)
    # A guessed id is a plain 404 in the OpenAI error shape.
    missing = httpx.get(server.url + "/images/" + "A" * 32 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_n3_gives_three_different_images(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model=DUMMY, prompt="cats", n=3, size="256x256", response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 3
    blobs = [decode(d.b64_json)[0] for d in result.data]
    assert len(set(blobs)) == 3
    seeds = [d.model_extra["seed"] for d in result.data if d.model_extra]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "webp", "avif"])
def test_every_output_format(client: openai.OpenAI, fmt: str) -> None:
    result = client.images.generate(
        model=DUMMY,
        prompt="a boat",
        size="300x260",
        output_format=fmt,
        response_format="b64_json",  # type: ignore[arg-type]
    )
    assert result.output_format == fmt
    assert result.data is not None
    data, image = decode(result.data[0].b64_json)
    assert sniff_format(data) == fmt
    assert image.size == (300, 260)


def test_output_compression_changes_lossy_size(client: openai.OpenAI) -> None:
    def size_at(quality: int) -> int:
        result = client.images.generate(
            model=DUMMY,
            prompt="a field",
            size="512x512",
            extra_body={"seed": 7},
            output_format="jpeg",
            output_compression=quality,
            response_format="b64_json",
        )
        assert result.data is not None
        return len(decode(result.data[0].b64_json)[0])

    assert size_at(20) < size_at(95)


def test_same_seed_same_image_other_seed_other_image(client: openai.OpenAI) -> None:
    def make(seed: int) -> bytes:
        result = client.images.generate(
            model=DUMMY,
            prompt="a quiet lake",
            size="384x384",
            response_format="b64_json",
            extra_body={"seed": seed},
        )
        assert result.data is not None
        return decode(result.data[0].b64_json)[0]

    assert make(1234) == make(1234)
    assert make(1234) != make(1235)


def test_aspect_ratio_and_resolution_via_extra_body(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY,
        prompt="a skyline",
        response_format="b64_json",
        extra_body={"aspect_ratio": "21:9", "resolution": "0.5K"},
    )
    result = raw.parse()
    assert result.size == "682x384"  # 16:9 at 0.5K
    assert "aspect_ratio=converted" in raw.headers["x-fluxport-normalization"]
    assert result.data is not None
    assert decode(result.data[0].b64_json)[1].size == (682, 384)


def test_custom_size_beyond_limits_is_scaled_and_stated(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY, prompt="tall", size="100x3000", response_format="b64_json"
    )
    result = raw.parse()
    assert result.size == "256x2048"
    assert "size=converted" in raw.headers["x-fluxport-normalization"]
    assert result.data is not None
    assert decode(result.data[0].b64_json)[1].size == (256, 2048)


def test_prompt_enhancement_returns_revised_prompt(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model=DUMMY,
        prompt="a dog",
        size="256x256",
        response_format="b64_json",
        extra_body={"prompt_enhancement": "on"},
    )
    assert result.data is not None
    assert result.data[0].revised_prompt


def test_openai_only_fields_are_accepted_and_reported(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY, prompt="x", size="256x256", quality="high", moderation="low", response_format="b64_json"
    )
    assert raw.status_code == 200
    assert "quality=ignored" in raw.headers["x-fluxport-normalization"]


# -- errors: each status raised as its SDK exception, with param naming the field ------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "size": "huge"}, "size"),
        ({"prompt": "x", "size": "0x10"}, "size"),
        ({"prompt": "x", "output_format": "bmp"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "response_format": "file"}, "response_format"),
        ({"prompt": "x", "extra_body": {"seed": -1}}, "seed"),
        ({"prompt": "x", "extra_body": {"seed": "abc"}}, "seed"),
        ({"prompt": "x", "extra_body": {"aspect_ratio": "wide"}}, "aspect_ratio"),
        ({"prompt": "x", "extra_body": {"resolution": "8KK"}}, "resolution"),
        ({"prompt": "x", "extra_body": {"cfg_scale": 99}}, "cfg_scale"),
        ({"prompt": "x", "extra_body": {"prompt_enhancement": "maybe"}}, "prompt_enhancement"),
        ({"prompt": "x", "extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "stream": True, "partial_images": 9}, "partial_images"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=DUMMY, **kwargs)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert info.value.request_id and info.value.request_id.startswith("req_")


def test_missing_prompt_and_bad_json(server: LiveServer) -> None:
    r = httpx.post(f"{server.api}/images/generations", json={"model": DUMMY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(
        f"{server.api}/images/generations", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.api}/images/generations", content=b'{"prompt":"\xff\xfe"}')
    assert r.status_code == 400
    r = httpx.post(f"{server.api}/images/generations", json=["prompt"])
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="flux.9-ultra", prompt="x")
    assert info.value.param == "model"
    assert "flux.2-dummy" in info.value.message


def test_known_model_without_provider_is_503_not_retried(server: LiveServer) -> None:
    client = server.client(max_retries=2)
    with pytest.raises(openai.InternalServerError) as info:
        client.images.generate(model="flux.2-dev", prompt="x")
    err = info.value
    assert err.status_code == 503
    assert err.response.headers["x-should-retry"] == "false"
    assert err.response.headers.get("x-stainless-retry-count") is None
    assert "FAL_KEY" in err.message and "FLUXPORT_LOCAL_WEIGHTS" in err.message
    # With nothing else configured the default model is the dummy: a plain call (the SDK's
    # default shape, no model) works on a fresh install.
    result = server.client().images.generate(prompt="x", response_format="b64_json")
    assert result.data and result.data[0].b64_json


def test_every_response_has_a_request_id(server: LiveServer) -> None:
    for method, path in [
        ("GET", "/healthz"),
        ("GET", "/v1/nope"),
        ("GET", "/openapi.json"),
        ("DELETE", "/v1/models/x"),
    ]:
        r = httpx.request(method, server.url + path)
        assert r.headers["x-request-id"].startswith("req_"), path
    assert httpx.get(server.url + "/v1/nope").json()["error"]["code"] == "not_found"


def test_docs_and_openapi(server: LiveServer) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/images/generations" in spec["paths"] and "/v1/images/edits" in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
