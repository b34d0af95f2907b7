"""OpenAI-compatible upstreams (FLUXPORT_UPSTREAMS): another real `fluxport serve` running the
dummy model as the gateway's worker, and an emulator shaped like SGLang-Diffusion's and
vLLM-Omni's image endpoints. Driven over HTTP with the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fluxport.settings import Settings, UpstreamConfig
from fluxport.storage.db import Database
from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, Fault, FaultKind, OpenAIImagesEmulator, seed_colour
from tests.imagefactory import png_bytes

FLUX = "black-forest-labs/FLUX.2-dev"


def pixel(b64: str) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return im.convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


def upstream(name: str, base_url: str, **kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name=name, base_url=base_url, models=kw.pop("models", {"flux.2-dev": FLUX}), **kw)


# -- fluxport as its own worker ---------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("worker"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def gateway(worker: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(
        tmp_path_factory.mktemp("gateway"),
        upstreams=[
            upstream("worker-a", worker.api, models={"flux.2-dev": "flux.2-dummy"}, max_images_per_call=2)
        ],
    )
    yield live
    live.stop()


def test_a_fluxport_worker_serves_the_gateway(gateway: LiveServer, worker: LiveServer) -> None:
    raw = gateway.client().images.with_raw_response.generate(
        model="flux.2-dev",
        prompt="a harbour at dawn",
        size="256x256",
        n=3,
        response_format="b64_json",
        extra_body={"seed": 21, "cfg_scale": 3.5, "provider": "worker-a"},
    )
    result = raw.parse()
    assert raw.headers["x-fluxport-provider"] == "worker-a"
    report = dict(item.split("=") for item in raw.headers["x-fluxport-normalization"].split(", "))
    assert report["n"] == "emulated"  # 3 images, 2 per call: two calls
    assert report["cfg_scale"] == "renamed" and report["seed"] == "passthrough"
    assert [d.seed for d in result.data] == [21, 22, 23]
    # The worker made them: the dummy's own images for those seeds, passed through untouched.
    direct = worker.client().images.generate(
        model="flux.2-dummy",
        prompt="a harbour at dawn",
        size="256x256",
        n=3,
        response_format="b64_json",
        extra_body={"seed": 21, "guidance_scale": 3.5},
    )
    # Passed through untouched: each image is the worker's PNG. The worker made them in calls
    # of 2 + 1 and directly in one of 3; CPU kernels may round a batch of 1 differently from one
    # of 3 (seen on AMD EPYC), so the pixels are compared within that rounding.
    for got, want in zip(result.data, direct.data, strict=True):
        a, b = (Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in (got, want))
        assert a.format == b.format == "PNG" and a.size == b.size == (256, 256)
        pixels = [np.asarray(img.convert("RGB"), dtype=np.int16) for img in (a, b)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 2

    async def worker_rows() -> Any:
        db = await Database.open(worker.settings.resolved_database_url)
        try:
            return await db.find_requests(prompt="a harbour at dawn")
        finally:
            await db.close()

    rows = asyncio.run(worker_rows())
    assert sorted(r.n for r in rows if r.status == "succeeded") == [1, 2, 3]  # the two calls, then ours


def test_the_worker_appears_in_models_and_rankings(gateway: LiveServer) -> None:
    models = httpx.get(f"{gateway.api}/models", timeout=10).json()
    dev = next(m for m in models["data"] if m["id"] == "flux.2-dev")
    names = {p["name"]: p for p in dev["providers"]}
    assert names["worker-a"]["configured"] is True
    assert "flux.2-dummy" in names["worker-a"]["detail"]
    ranking = httpx.get(f"{gateway.api}/models/flux.2-dev/providers", timeout=10).json()
    assert "worker-a" in [r["provider"] for r in ranking["data"]]
    page = httpx.get(f"{gateway.url}/models/flux.2-dev", timeout=10)
    assert page.status_code == 200 and "worker-a" in page.text


def test_an_edit_goes_to_the_worker_as_multipart(gateway: LiveServer) -> None:
    result = gateway.client().images.edit(
        model="flux.2-dev",
        image=[("a.png", png_bytes(128, 128), "image/png"), ("b.png", png_bytes(96, 128), "image/png")],
        prompt="blend them",
        size="256x256",
        response_format="b64_json",
        extra_body={"provider": "worker-a"},
    )
    assert result.data and Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (
        256,
        256,
    )


# -- SGLang-Diffusion / vLLM-Omni shaped servers ---------------------------------------------------


@pytest.fixture
def vllm() -> Iterator[OpenAIImagesEmulator]:
    with OpenAIImagesEmulator(EmulatorConfig(run=0.05), flavour="vllm-omni", api_key="vk") as emulator:
        yield emulator


@pytest.fixture
def sglang() -> Iterator[OpenAIImagesEmulator]:
    with OpenAIImagesEmulator(EmulatorConfig(run=0.05), flavour="sglang") as emulator:
        yield emulator


def test_vllm_omni_gets_its_native_fields(vllm: OpenAIImagesEmulator, tmp_path: Path) -> None:
    live = start_server(
        tmp_path,
        upstreams=[
            upstream("omni", vllm.api, api_key="vk", output_formats=["png", "webp"], price_per_mp=0.01)
        ],
    )
    try:
        raw = live.client().images.with_raw_response.generate(
            model="flux.2-dev",
            prompt="a red kite",
            size="1024x768",
            n=2,
            output_format="webp",
            response_format="b64_json",
            extra_body={"seed": 5, "num_inference_steps": 28, "negative_prompt": "blur", "provider": "omni"},
        )
    finally:
        live.stop()
    result = raw.parse()
    [sent] = vllm.requests_to("POST", "/images/generations")
    assert sent.headers["authorization"] == "Bearer vk"
    assert sent.body == {
        "model": FLUX,
        "prompt": "a red kite",
        "n": 2,
        "size": "1024x768",
        "response_format": "b64_json",
        "seed": 5,
        "output_format": "webp",
        "num_inference_steps": 28,
        "negative_prompt": "blur",
    }
    assert "output_format=passthrough" in raw.headers["x-fluxport-normalization"]
    for got, seed in zip((pixel(d.b64_json) for d in result.data), (5, 6), strict=True):
        assert max(abs(g - w) for g, w in zip(got, seed_colour(seed), strict=True)) <= 6  # webp: lossy
    assert result.usage is not None and result.usage.model_dump()["cost_usd"] == pytest.approx(0.02)


def test_the_upstream_key_goes_with_its_own_image_links(tmp_path: Path) -> None:
    """An upstream started with an API key guards its /content files as well: the download from
    its own origin carries the key."""
    with OpenAIImagesEmulator(EmulatorConfig(run=0.05), flavour="sglang", api_key="sk") as guarded:
        guarded.answer_urls = True
        live = start_server(tmp_path, upstreams=[upstream("sgl", guarded.api, api_key="sk")])
        try:
            result = live.client().images.generate(
                model="flux.2-dev", prompt="keyed links", size="256x256", response_format="b64_json"
            )
        finally:
            live.stop()
    download = next(r for r in guarded.requests if r.method == "GET" and r.path.endswith("/content"))
    assert download.headers.get("authorization") == "Bearer sk"
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (256, 256)


def test_a_relative_url_answer_is_downloaded_from_the_upstream(
    sglang: OpenAIImagesEmulator, tmp_path: Path
) -> None:
    sglang.answer_urls = True  # answers /v1/images/<id>/content links, as SGLang without storage
    live = start_server(tmp_path, upstreams=[upstream("sgl", sglang.api)])
    try:
        result = live.client().images.generate(
            model="flux.2-dev",
            prompt="links",
            size="512x512",
            output_format="jpeg",
            response_format="b64_json",
            extra_body={"seed": 9, "provider": "sgl"},
        )
    finally:
        live.stop()
    assert next(r.path for r in sglang.requests if r.method == "GET").endswith("/content")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "JPEG" and image.size == (512, 512)  # converted by fluxport (png native)


def test_the_upstream_key_and_its_refusal(vllm: OpenAIImagesEmulator, tmp_path: Path) -> None:
    live = start_server(tmp_path, upstreams=[upstream("omni", vllm.api, api_key="wrong")])
    try:
        with pytest.raises(openai.APIStatusError) as exc:
            live.client().images.generate(model="flux.2-dev", prompt="x", extra_body={"provider": "omni"})
    finally:
        live.stop()
    assert exc.value.status_code == 502 and "credentials" in exc.value.message


def test_fails_over_between_upstreams(
    vllm: OpenAIImagesEmulator, sglang: OpenAIImagesEmulator, tmp_path: Path
) -> None:
    vllm.script(Fault(FaultKind.SERVER_ERROR))
    live = start_server(
        tmp_path, upstreams=[upstream("omni", vllm.api, api_key="vk"), upstream("sgl", sglang.api)]
    )
    try:
        raw = live.client().images.with_raw_response.generate(
            model="flux.2-dev", prompt="fail over", size="512x512", extra_body={"provider": ["omni", "sgl"]}
        )
    finally:
        live.stop()
    assert raw.headers["x-fluxport-provider"] == "sgl" and raw.headers["x-fluxport-attempts"] == "omni,sgl"


def test_load_is_shared_by_in_flight_count(tmp_path: Path) -> None:
    config = EmulatorConfig(run=0.4)
    with (
        OpenAIImagesEmulator(config, flavour="vllm-omni") as a,
        OpenAIImagesEmulator(config, flavour="vllm-omni") as b,
    ):
        live = start_server(
            tmp_path,
            upstreams=[
                upstream("gpu-a", a.api, max_concurrency=2),
                upstream("gpu-b", b.api, max_concurrency=2),
            ],
        )
        try:
            client = live.client()
            errors: list[BaseException] = []

            def one(i: int) -> None:
                try:
                    client.images.generate(model="flux.2-dev", prompt=f"spread {i}", size="256x256")
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            live.stop()
        assert errors == []
        assert a.served + b.served == 8 and a.served >= 3 and b.served >= 3
        assert a.peak_in_flight <= 2 and b.peak_in_flight <= 2  # max_concurrency held


def test_an_abandoned_request_closes_the_upstream_connection(tmp_path: Path) -> None:
    with OpenAIImagesEmulator(EmulatorConfig(run=5.0), flavour="sglang") as slow:
        live = start_server(tmp_path, upstreams=[upstream("slow", slow.api)])
        try:
            with httpx.Client(timeout=httpx.Timeout(0.5)) as http, pytest.raises(httpx.ReadTimeout):
                http.post(
                    f"{live.api}/images/generations",
                    json={"model": "flux.2-dev", "prompt": "given up", "size": "256x256"},
                )
            deadline = time.monotonic() + 5
            while slow.abandoned == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            live.stop()
        assert slow.abandoned == 1 and slow.served == 0  # cancelled by closing the connection


def test_a_hedge_on_a_slow_upstream_cancels_the_loser(tmp_path: Path) -> None:
    with OpenAIImagesEmulator(EmulatorConfig(run=0.05), flavour="vllm-omni") as gpu:
        live = start_server(tmp_path, upstreams=[upstream("gpu", gpu.api)], hedge_min_samples=3)
        try:
            client = live.client()
            for _ in range(3):  # its latency history: ~0.05 s
                client.images.generate(model="flux.2-dev", prompt="warm", size="256x256")
            slow_once = iter([5.0])
            gpu.config.run = lambda _rng: next(slow_once, 0.05)  # the next call stalls, later ones not
            raw = client.images.with_raw_response.generate(
                model="flux.2-dev", prompt="hedged", size="256x256", extra_body={"hedge": True}
            )
            deadline = time.monotonic() + 5
            while gpu.abandoned == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            live.stop()
        # A backup call started after the usual time and won; the stalled call's connection was
        # closed (the emulator saw its client leave), so it never finished.
        assert raw.headers["x-fluxport-attempts"] == "gpu,gpu"
        assert gpu.abandoned == 1 and gpu.served == 4


# -- configuration ------------------------------------------------------------------------------


def test_upstreams_from_a_file_and_what_is_refused(tmp_path: Path) -> None:
    listing = [{"name": "gpu-a", "base_url": "http://10.0.0.5:8000/v1", "models": {"flux.2-dev": FLUX}}]
    path = tmp_path / "upstreams.json"
    path.write_text(json.dumps(listing))
    settings = Settings(upstreams_file=path)
    assert [u.name for u in settings.upstreams] == ["gpu-a"] and settings.upstreams[0].max_concurrency == 4
    assert "secret" not in repr(upstream("x", "http://h/v1", api_key="secret"))  # never in logs
    for bad, words in [
        ([{**listing[0], "name": "fal"}], "built-in"),
        (listing * 2, "used twice"),
        ([{**listing[0], "models": {"flux.9": "x"}}], "unknown models"),
        ([{**listing[0], "base_url": "ftp://x"}], "base_url"),
    ]:
        with pytest.raises(ValueError, match=words):
            Settings(upstreams=bad)
