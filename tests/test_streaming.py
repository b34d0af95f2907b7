"""Streamed image requests (`stream=True`), driven by the official openai SDK against live servers:
the local provider's real partial images (flux.2-dummy on the CPU), the hosted adapters against
the fal and Replicate emulators, failures mid-stream, disconnects and Idempotency-Key replays."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image

from fluxport.storage.db import Database
from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, ReplicateEmulator
from tests.imagefactory import png_bytes

DUMMY = "flux.2-dummy"


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def records(server: LiveServer, request_id: str | None = None, prompt: str | None = None) -> Any:
    """The request's record once it is over, its attempts and its images."""

    async def fetch() -> Any:
        db = await Database.open(server.settings.resolved_database_url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if request_id is not None:
                    row = await db.get_request(request_id)
                else:
                    rows = await db.find_requests(prompt=prompt)
                    row = rows[0] if rows else None
                if row is not None and row.status not in ("queued", "running"):
                    return row, await db.list_attempts(row.id), await db.list_images(row.id)
                await asyncio.sleep(0.1)
            raise AssertionError("the request never finished")
        finally:
            await db.close()

    return asyncio.run(fetch())


def raw_events(server: LiveServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """The stream as it is on the wire: (response headers, [(event, data or comment)])."""
    out: list[tuple[str, Any]] = []
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.api}/images/generations", json=body, headers=headers or {}) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in r.iter_lines():
            if line.startswith(":"):
                out.append((":", line[1:].strip()))
            elif line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((event, json.loads(line.split(":", 1)[1])))
                event = "message"
        return r.headers, out


# -- the local provider: real partial images --------------------------------------------------


def test_generate_streams_real_partials_then_each_image(server: LiveServer, client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            model=DUMMY,
            prompt="a lighthouse at dusk",
            size="256x256",
            n=2,
            stream=True,
            partial_images=2,
            extra_body={"seed": 11},
        )
    )
    partials = [e for e in events if isinstance(e, ImageGenPartialImageEvent)]
    completed = [e for e in events if isinstance(e, ImageGenCompletedEvent)]
    assert [type(e) for e in events[-2:]] == [ImageGenCompletedEvent] * 2  # the images come last
    assert len(partials) == 4 and len(completed) == 2  # 2 partials for each of the 2 images
    assert sorted((e.image_index, e.partial_image_index) for e in partials) == [  # type: ignore[attr-defined]
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    for event in partials:
        assert event.type == "image_generation.partial_image"
        assert event.output_format == "png" and event.background == "opaque" and event.quality == "auto"
        assert event.created_at > 0
        image = decode(event.b64_json)
        assert image.format == "PNG" and f"{image.width}x{image.height}" == event.size == "256x256"
    for event in completed:
        assert event.type == "image_generation.completed" and event.size == "256x256"
        assert event.usage.input_tokens == 0  # FLUX is billed per megapixel: the tokens are zero
        assert decode(event.b64_json).size == (256, 256)

    # The same request unstreamed makes the same images: one generation path.
    plain = client.images.generate(
        model=DUMMY,
        prompt="a lighthouse at dusk",
        size="256x256",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    assert [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    # A partial is the estimate on the way there: not the final image, and not the same for each step.
    finals = [np.asarray(decode(e.b64_json), dtype=np.int16) for e in completed]
    for event in partials:
        pixels = np.asarray(decode(event.b64_json).convert("RGB"), dtype=np.int16)
        assert np.abs(pixels - finals[event.image_index]).mean() > 0.5  # type: ignore[attr-defined]


def test_partial_images_zero_sends_only_the_completed_event(client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            model=DUMMY, prompt="zero partials", size="256x256", stream=True, partial_images=0
        )
    )
    assert [type(e) for e in events] == [ImageGenCompletedEvent]


def test_stream_in_another_format_and_url_links(server: LiveServer) -> None:
    headers, events = raw_events(
        server,
        {
            "model": DUMMY,
            "prompt": "webp please",
            "size": "320x256",
            "output_format": "webp",
            "response_format": "url",
            "stream": True,
            "partial_images": 1,
        },
    )
    assert headers["x-fluxport-provider"] == "local"
    assert headers["x-fluxport-normalization"] == "partial_images=passthrough"
    kinds = [kind for kind, _ in events if kind != ":"]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    partial, completed = (data for kind, data in events if kind != ":")
    assert decode(partial["b64_json"]).format == "WEBP" and partial["output_format"] == "webp"
    assert completed["size"] == "320x256" and completed["provider"] == "local"
    assert "partial_images=passthrough" in completed["normalization"]
    # response_format=url: the completed event has the bytes and the stored link.
    stored = httpx.get(completed["url"], timeout=10)
    assert stored.status_code == 200 and stored.content == base64.b64decode(completed["b64_json"])
    row, attempts, images = records(server, completed["request_id"])
    assert row.status == "succeeded" and len(images) == 1 and [a.status for a in attempts] == ["succeeded"]
    assert row.params["stream"] == {"partial_images": 1}


def test_edit_streams_image_edit_events(client: openai.OpenAI) -> None:
    events = list(
        client.images.edit(
            model=DUMMY,
            image=[("ref.png", png_bytes(128, 128), "image/png")],
            prompt="make it blue",
            size="256x256",
            stream=True,
            partial_images=3,
        )
    )
    assert [type(e) for e in events] == [ImageEditPartialImageEvent] * 3 + [ImageEditCompletedEvent]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]  # type: ignore[union-attr]
    assert all(e.type.startswith("image_edit.") for e in events)


def test_bad_stream_parameters_are_400s_naming_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        list(client.images.generate(model=DUMMY, prompt="x", stream=True, partial_images=4))
    assert exc.value.body["param"] == "partial_images"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model=DUMMY, prompt="x", stream=True, extra_body={"dry_run": True})  # type: ignore[call-overload]
    assert exc.value.body["param"] == "stream"  # type: ignore[index]


def test_partial_images_without_stream_is_reported_ignored(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY, prompt="not streamed", size="256x256", partial_images=2
    )
    assert "partial_images=ignored" in raw.headers["x-fluxport-normalization"]
    assert len(raw.parse().data) == 1


def test_a_client_that_leaves_mid_stream_cancels_the_generation(server: LiveServer) -> None:
    prompt = "abandoned mid-stream"
    body = {
        "model": DUMMY,
        "prompt": prompt,
        "size": "1024x1024",
        "n": 4,
        "stream": True,
        "partial_images": 3,
        "num_inference_steps": 100,
    }
    t0 = time.monotonic()
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.api}/images/generations", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # the first partial has come: hang up
        else:
            pytest.fail("no partial image before the end of the stream")
    row, attempts, images = records(server, prompt=prompt)
    assert row.status == "cancelled" and row.error["code"] == "client_disconnected"
    assert images == [] and [a.status for a in attempts] == ["cancelled"]
    assert time.monotonic() - t0 < 30  # stopped: 100 steps of four 1024² images take far longer


def test_idempotent_stream_is_generated_once_and_replayed(server: LiveServer) -> None:
    body = {
        "model": DUMMY,
        "prompt": "once, streamed",
        "size": "256x256",
        "stream": True,
        "partial_images": 1,
    }
    key = {"Idempotency-Key": f"stream-{time.time_ns()}"}
    _, first = raw_events(server, body, key)
    headers, again = raw_events(server, body, key)
    assert headers.get("idempotent-replayed") == "true"
    completed = [data for kind, data in first if kind == "image_generation.completed"]
    replayed = [data for kind, data in again if kind == "image_generation.completed"]
    assert len(completed) == 1 and replayed == completed  # the completed events, partials left out
    assert [kind for kind, _ in again] == ["image_generation.completed"]
    rows = asyncio.run(_requests_with_prompt(server, "once, streamed"))
    assert [r.status for r in rows] == ["succeeded"]  # one generation


async def _requests_with_prompt(server: LiveServer, prompt: str) -> Any:
    db = await Database.open(server.settings.resolved_database_url)
    try:
        return await db.find_requests(prompt=prompt)
    finally:
        await db.close()


# -- hosted providers: no pixels before the result -----------------------------------------------


@pytest.fixture(scope="module")
def fal() -> Iterator[FalEmulator]:
    with FalEmulator(EmulatorConfig(queue=0.05, run=0.4), key="fal-test-key") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def replicate() -> Iterator[ReplicateEmulator]:
    with ReplicateEmulator(EmulatorConfig(queue=0.01, run=0.05), token="r8-test") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def hosted(
    fal: FalEmulator, replicate: ReplicateEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    live = start_server(
        tmp_path_factory.mktemp("stream-hosted"),
        fal_key="fal-test-key",
        fal_url=fal.base_url,
        replicate_api_token="r8-test",
        replicate_url=replicate.base_url,
        stream_keepalive_s=0.05,
    )
    yield live
    live.stop()


def test_hosted_stream_sends_the_completed_image_and_keeps_alive(
    hosted: LiveServer, fal: FalEmulator
) -> None:
    before = len(fal.ledger)
    headers, events = raw_events(
        hosted,
        {
            "model": "flux.2-dev",
            "prompt": "hosted",
            "size": "512x512",
            "n": 2,
            "stream": True,
            "partial_images": 2,
            "provider": "fal",
        },
    )
    assert headers["x-fluxport-provider"] == "fal"
    assert headers["x-fluxport-normalization"] == "partial_images=emulated"
    assert any(kind == ":" for kind, _ in events)  # SSE comments while fal works (~0.45 s)
    completed = [data for kind, data in events if kind == "image_generation.completed"]
    assert [kind for kind, _ in events if kind != ":"] == ["image_generation.completed"] * 2
    assert [c["image_index"] for c in completed] == [0, 1]
    assert all(decode(c["b64_json"]).size == (512, 512) for c in completed)
    assert "partial_images=emulated" in completed[0]["normalization"]
    billed = fal.ledger[before:]
    assert len(billed) == 1 and completed[0]["usage"]["cost_usd"] == pytest.approx(
        sum(entry.usd for entry in billed)
    )


def test_a_streamed_duplicate_of_a_running_key_is_told_to_retry_then_replayed(
    hosted: LiveServer, fal: FalEmulator
) -> None:
    """No silent wait: the duplicate gets 409 idempotency_key_in_progress with Retry-After at
    once (a wait would have ended in a replay); the SDK's own retry, the first done, gets its
    completed event. fal bills once."""
    before = len(fal.ledger)
    client = hosted.client(max_retries=2)  # the SDK's default
    key = {"Idempotency-Key": f"running-{time.time_ns()}"}

    def call(c: openai.OpenAI) -> Any:
        return c.images.generate(
            model="flux.2-dev",
            prompt="dup",
            size="512x512",
            stream=True,
            extra_body={"provider": "fal"},
            extra_headers=key,
        )

    first = call(client)  # the headers are in: it runs (fal: ~0.45 s)
    with pytest.raises(openai.ConflictError) as refused:
        call(client.with_options(max_retries=0))
    error = refused.value.response.json()["error"]
    assert error["code"] == "idempotency_key_in_progress" and error["param"] == "Idempotency-Key"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    generated = list(first)
    retried = list(call(client))
    assert [type(e) for e in retried] == [type(e) for e in generated] == [ImageGenCompletedEvent]
    assert retried[0].b64_json == generated[0].b64_json
    assert len(fal.ledger) == before + 1  # generated once


def test_a_stream_that_fails_over_ends_in_one_image_billed_once(
    hosted: LiveServer, fal: FalEmulator, replicate: ReplicateEmulator
) -> None:
    fal_before, rep_before = len(fal.ledger), len(replicate.ledger)
    fal.script(Fault(FaultKind.SERVER_ERROR))
    events = list(
        hosted.client().images.generate(
            model="flux.2-dev",
            prompt="fail over while streaming",
            size="512x512",
            stream=True,
            extra_body={"provider": ["fal", "replicate"]},
        )
    )
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    done = events[0].model_dump()
    assert done["provider"] == "replicate" and done["attempts"] == ["fal", "replicate"]
    assert len(fal.ledger) == fal_before and len(replicate.ledger) == rep_before + 1
    row, attempts, images = records(hosted, done["request_id"])
    assert row.status == "succeeded" and len(images) == 1
    assert [a.status for a in attempts] == ["failed", "succeeded"]
    assert row.cost_usd == pytest.approx(done["usage"]["cost_usd"])


def test_leaving_a_hosted_stream_cancels_the_job_upstream(hosted: LiveServer, fal: FalEmulator) -> None:
    cancels = len(fal.requests_to("PUT", "/cancel"))
    prompt = "left while fal works"
    body = {"model": "flux.2-dev", "prompt": prompt, "size": "512x512", "stream": True, "provider": "fal"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{hosted.api}/images/generations", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith(":"):
                break  # a keep-alive while fal works: hang up
        else:
            pytest.fail("the stream ended before a keep-alive")
    row, attempts, images = records(hosted, prompt=prompt)
    assert row.status == "cancelled" and images == [] and [a.status for a in attempts] == ["cancelled"]
    assert len(fal.requests_to("PUT", "/cancel")) == cancels + 1


def test_an_error_after_the_stream_began_is_raised_by_the_sdk(hosted: LiveServer, fal: FalEmulator) -> None:
    fal.script(Fault(FaultKind.SERVER_ERROR), Fault(FaultKind.SERVER_ERROR), Fault(FaultKind.SERVER_ERROR))
    stream = hosted.client().images.generate(
        model="flux.2-dev",
        prompt="nothing but failures",
        size="512x512",
        stream=True,
        extra_body={"provider": "fal"},
    )
    with pytest.raises(openai.APIError) as exc:
        list(stream)
    assert "fal" in exc.value.message
    fal.script()  # clear what is left


def test_a_failure_before_the_stream_begins_is_an_http_error(fal: FalEmulator, tmp_path: Path) -> None:
    """Cooling down (the breaker open) is known before any attempt starts: a 503 with Retry-After,
    which the SDK can retry, not a 200 whose stream says error."""
    live = start_server(tmp_path, fal_key="fal-test-key", fal_url=fal.base_url, breaker_failures=1)
    try:
        fal.script(Fault(FaultKind.SERVER_ERROR))
        with pytest.raises(openai.APIStatusError):
            live.client().images.generate(
                model="flux.2-dev", prompt="trips it", extra_body={"provider": "fal"}
            )
        with pytest.raises(openai.APIStatusError) as exc:
            live.client().images.generate(
                model="flux.2-dev", prompt="cooling", stream=True, extra_body={"provider": "fal"}
            )
    finally:
        live.stop()
    assert exc.value.status_code == 503 and exc.value.response.headers.get("retry-after")


# -- the JS SDK -----------------------------------------------------------------------------------

JS = textwrap.dedent(
    """
    import OpenAI from "openai";
    const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-test" });
    const stream = await client.images.generate({
      model: "flux.2-dummy", prompt: "from node", size: "256x256", stream: true, partial_images: 2,
    });
    const seen = [];
    for await (const event of stream) {
      seen.push([event.type, event.partial_image_index ?? null, event.b64_json.length > 0]);
    }
    console.log(JSON.stringify(seen));
    """
)


@pytest.fixture(scope="session")
def node_openai(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed: the JS SDK check needs them")
    where = tmp_path_factory.mktemp("node-openai")
    (where / "package.json").write_text('{"type": "module", "private": true}')
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "openai@^6"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install the openai package: {done.stderr.strip()[:300]}")
    (where / "stream.mjs").write_text(JS)
    return where


def test_the_js_sdk_parses_the_stream(server: LiveServer, node_openai: Path) -> None:
    run = subprocess.run(
        ["node", "stream.mjs", server.api], cwd=node_openai, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [
        ["image_generation.partial_image", 0, True],
        ["image_generation.partial_image", 1, True],
        ["image_generation.completed", None, True],
    ]
