"""fluxport with FAL_KEY / REPLICATE_API_TOKEN pointed at the protocol emulators, driven by the SDK."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, ReplicateEmulator, seed_colour
from tests.imagefactory import jpeg_bytes, png_bytes, webp_bytes

FAST = EmulatorConfig(queue=0.01, run=0.05)


@pytest.fixture(scope="module")
def fal() -> Iterator[FalEmulator]:
    with FalEmulator(FAST, key="fal-test-key") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def replicate() -> Iterator[ReplicateEmulator]:
    with ReplicateEmulator(FAST, token="r8-test") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def fal_server(fal: FalEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("fal"), fal_key="fal-test-key", fal_url=fal.base_url)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def replicate_server(
    replicate: ReplicateEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    live = start_server(
        tmp_path_factory.mktemp("replicate"), replicate_api_token="r8-test", replicate_url=replicate.base_url
    )
    yield live
    live.stop()


def first_image(result: object) -> Image.Image:
    data = result.data  # type: ignore[attr-defined]
    assert data
    image = Image.open(io.BytesIO(base64.b64decode(data[0].b64_json)))
    image.load()
    return image


@pytest.mark.parametrize(
    ("model", "endpoint"), [("flux.2-dev", "fal-ai/flux-2"), ("flux.2-dev-flash", "fal-ai/flux-2/flash")]
)
def test_fal_generation(fal: FalEmulator, fal_server: LiveServer, model: str, endpoint: str) -> None:
    fal.reset()
    raw = fal_server.client().images.with_raw_response.generate(
        model=model,
        prompt="a red barn",
        size="1024x768",
        n=2,
        response_format="b64_json",
        output_format="webp",
        extra_body={"seed": 42, "cfg_scale": 3.5},
    )
    result = raw.parse()
    assert raw.headers["x-fluxport-provider"] == "fal"
    norm = raw.headers["x-fluxport-normalization"]
    assert "cfg_scale=renamed" in norm and "n=renamed" in norm and "response_format=emulated" in norm
    assert result.data is not None and len(result.data) == 2
    image = first_image(result)
    assert image.size == (1024, 768) and image.format == "WEBP"
    assert image.convert("RGB").getpixel((10, 10)) == pytest.approx(seed_colour(42), abs=3)
    submits = [r for r in fal.requests if r.method == "POST"]
    assert submits[-1].path == "/" + endpoint
    assert submits[-1].headers["authorization"] == "Key fal-test-key"
    body = submits[-1].body
    assert body["image_size"] == {"width": 1024, "height": 768}
    assert body["num_images"] == 2 and body["seed"] == 42 and body["guidance_scale"] == 3.5


def test_fal_edit_with_four_references_and_n_beyond_fal(fal: FalEmulator, fal_server: LiveServer) -> None:
    fal.reset()
    images = [png_bytes(256, 256), jpeg_bytes(300, 200), webp_bytes(200, 300), png_bytes(512, 256)]
    raw = fal_server.client().images.with_raw_response.edit(
        model="flux.2-dev-flash", image=images, prompt="combine", n=6, size="512x512", response_format="url"
    )
    result = raw.parse()
    assert result.data is not None and len(result.data) == 6  # 4 + 2: two fal calls
    assert "n=emulated" in raw.headers["x-fluxport-normalization"]
    submits = [r for r in fal.requests if r.method == "POST"]
    assert {r.path for r in submits} == {"/fal-ai/flux-2/flash/edit"}
    assert sorted(r.body["num_images"] for r in submits) == [2, 4]
    assert all(
        len(r.body["image_urls"]) == 4 and r.body["image_urls"][0].startswith("data:image/png;base64,")
        for r in submits
    )


def test_fal_avif_is_converted_by_the_service(fal: FalEmulator, fal_server: LiveServer) -> None:
    raw = fal_server.client().images.with_raw_response.generate(
        model="flux.2-dev",
        prompt="x",
        size="1000x1000",
        output_format="avif",
        response_format="b64_json",  # type: ignore[arg-type]
    )
    assert "output_format=converted" in raw.headers["x-fluxport-normalization"]
    image = first_image(raw.parse())
    assert image.format == "AVIF" and image.size == (1000, 1000)


def test_fal_faults_surface_as_sdk_errors(fal: FalEmulator, fal_server: LiveServer) -> None:
    client = fal_server.client()
    fal.script(Fault(FaultKind.SAFETY))
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="flux.2-dev", prompt="x", size="512x512")
    assert info.value.code == "content_policy_violation"
    fal.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.05)] * 8)
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="flux.2-dev", prompt="x", size="512x512")
    assert limited.value.response.headers.get("retry-after")
    fal.reset()
    fal.script(Fault(FaultKind.SERVER_ERROR))
    with pytest.raises(openai.APIStatusError) as failed:
        client.images.generate(model="flux.2-dev", prompt="x", size="512x512")
    assert failed.value.status_code == 502 and "fal" in failed.value.message


def test_replicate_generation_and_edit(replicate: ReplicateEmulator, replicate_server: LiveServer) -> None:
    client = replicate_server.client()
    raw = client.images.with_raw_response.generate(
        model="flux.2-dev",
        prompt="a harbour",
        size="16:9",
        n=2,
        output_format="jpeg",
        response_format="b64_json",
        extra_body={"seed": 7, "go_fast": False},
    )
    result = raw.parse()
    assert raw.headers["x-fluxport-provider"] == "replicate"
    assert "n=emulated" in raw.headers["x-fluxport-normalization"]
    assert result.size == "1365x768" and result.data is not None and len(result.data) == 2
    assert first_image(result).size == (1365, 768)
    creates = [r for r in replicate.requests if r.method == "POST" and r.path.endswith("/predictions")]
    assert creates[-1].path == "/v1/models/black-forest-labs/flux-2-dev/predictions"
    assert creates[-1].headers["authorization"] == "Bearer r8-test"
    inputs = sorted((r.body["input"] for r in creates[-2:]), key=lambda i: i["seed"])
    assert [i["seed"] for i in inputs] == [7, 8]
    assert (
        inputs[0]["aspect_ratio"] == "16:9"
        and inputs[0]["output_format"] == "jpg"
        and inputs[0]["go_fast"] is False
    )
    edit = client.images.edit(
        model="flux.2-dev", image=[png_bytes(300, 300)] * 4, prompt="edit", response_format="b64_json"
    )
    assert edit.data is not None
    last = [r for r in replicate.requests if r.method == "POST" and r.path.endswith("/predictions")][-1]
    assert len(last.body["input"]["input_images"]) == 4


def test_replicate_refuses_what_it_cannot_honour(replicate_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        replicate_server.client().images.generate(model="flux.2-dev", prompt="x", extra_body={"cfg_scale": 3})
    assert info.value.param == "cfg_scale"
    # flash has no Replicate route: with only Replicate configured it is a 503 that says how to fix it.
    with pytest.raises(openai.InternalServerError) as unavailable:
        replicate_server.client().images.generate(model="flux.2-dev-flash", prompt="x")
    assert unavailable.value.status_code == 503 and "FAL_KEY" in unavailable.value.message


def test_models_show_provider_state(fal_server: LiveServer) -> None:
    model = fal_server.client().models.retrieve("flux.2-dev")
    providers = {p["name"]: p["configured"] for p in (model.model_extra or {})["providers"]}
    assert providers == {"local": False, "fal": True, "replicate": False}


def test_fluxport_serve_with_fal_env(fal: FalEmulator, tmp_path: Path) -> None:
    """The real `fluxport serve` command, configured only through the environment."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "FAL_KEY": "fal-test-key",
        "FLUXPORT_FAL_URL": fal.base_url,
        "FLUXPORT_DATA_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "FLUXPORT_AUTH": "none",  # keys: tests/test_auth.py
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxport.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        result = client.images.generate(model="flux.2-dev-flash", prompt="served", size="512x512")
        assert result.data and result.data[0].url
        assert httpx.get(result.data[0].url).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hosted_attempts_are_recorded_with_their_timings(fal: FalEmulator, fal_server: LiveServer) -> None:
    import asyncio

    from fluxport.storage.db import Database

    fal.reset()
    raw = fal_server.client().images.with_raw_response.generate(
        model="flux.2-dev", prompt="timed", size="512x512"
    )
    request_id = raw.headers["x-request-id"]

    async def attempts():  # type: ignore[no-untyped-def]
        db = await Database.open(fal_server.settings.resolved_database_url)
        try:
            return await db.list_attempts(request_id)
        finally:
            await db.close()

    (attempt,) = asyncio.run(attempts())
    assert attempt.provider == "fal" and attempt.status == "succeeded" and attempt.provider_request_id
    assert attempt.submitted_ms is not None and attempt.first_status_ms is not None
    assert attempt.ttfb_ms is not None and attempt.total_ms is not None
    assert attempt.submitted_ms <= attempt.first_status_ms <= attempt.ttfb_ms <= attempt.total_ms
    assert attempt.normalization and attempt.normalization["n"] == "renamed"
