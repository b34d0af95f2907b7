"""Idempotency-Key over real HTTP: replays, concurrent duplicates, conflicts, edits and expiry, with
the fal emulator counting what fluxport actually submitted (and what it billed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, FalEmulator
from tests.imagefactory import png_bytes


@pytest.fixture
def fal() -> Iterator[FalEmulator]:
    # Slow enough that concurrent duplicates overlap the first request.
    with FalEmulator(EmulatorConfig(queue=0.0, run=0.4), key="fk") as emulator:  # type: ignore[arg-type]
        yield emulator


@pytest.fixture
def live(fal: FalEmulator, tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(tmp_path / "data", fal_key="fk", fal_url=fal.base_url)
    yield server
    server.stop()


def gen(live: LiveServer, key: str | None, prompt: str = "p", **kwargs: Any) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return (
        live.client(**kwargs)
        .images.with_raw_response.generate(
            model="flux.2-dev",
            prompt=prompt,
            size="1024x768",
            response_format="b64_json",
            extra_headers=headers,
        )
        .http_response
    )


def spend(live: LiveServer) -> tuple[int, float]:
    usage = httpx.get(f"{live.api}/usage").json()["all_time"]
    return usage["requests"], usage["cost_usd"]


def test_a_replay_returns_the_stored_answer_without_generating_or_billing(
    live: LiveServer, fal: FalEmulator
) -> None:
    first = gen(live, "retry-1")
    second = gen(live, "retry-1")
    assert second.status_code == 200
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    for header in ("x-fluxport-provider", "x-fluxport-cost-usd", "content-type"):
        assert second.headers[header] == first.headers[header]
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert len(fal.requests_to("POST")) == 1
    assert spend(live) == (1, pytest.approx(0.012))
    # Without the header, or with another key, the same body generates again.
    gen(live, None)
    gen(live, "retry-2")
    assert len(fal.requests_to("POST")) == 3


def test_concurrent_duplicates_make_one_generation(live: LiveServer, fal: FalEmulator) -> None:
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: gen(live, "together"), range(6)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 5
    assert len(fal.requests_to("POST")) == 1
    assert spend(live) == (1, pytest.approx(0.012))


def test_the_same_key_with_another_body_is_a_409(live: LiveServer, fal: FalEmulator) -> None:
    gen(live, "mine")
    with pytest.raises(openai.ConflictError) as err:
        gen(live, "mine", prompt="something else", max_retries=2)  # 409 must not be retried
    assert err.value.code == "idempotency_key_reused"
    assert err.value.param == "Idempotency-Key"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert len(fal.requests_to("POST")) == 1


def test_a_key_longer_than_255_characters_is_a_400(live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        gen(live, "k" * 256)
    assert err.value.param == "Idempotency-Key"


def test_client_errors_are_replayed_too(live: LiveServer, fal: FalEmulator) -> None:
    body = {"model": "flux.2-dev", "prompt": "   "}
    headers = {"Idempotency-Key": "empty-prompt"}
    first = httpx.post(f"{live.api}/images/generations", json=body, headers=headers)
    second = httpx.post(f"{live.api}/images/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 400
    assert second.content == first.content and second.headers["idempotent-replayed"] == "true"
    assert spend(live)[0] == 1  # one rejected request recorded, not two


def test_edits_are_idempotent_too(live: LiveServer, fal: FalEmulator) -> None:
    def edit(image: bytes, key: str) -> Any:
        # The SDK draws a new multipart boundary for every call: the hash must not depend on it.
        return (
            live.client()
            .images.with_raw_response.edit(
                model="flux.2-dev",
                prompt="make it blue",
                image=("ref.png", image, "image/png"),
                size="1024x768",
                response_format="b64_json",
                extra_headers={"Idempotency-Key": key},
            )
            .http_response
        )

    image = png_bytes(96, 64)
    first = edit(image, "edit-1")
    second = edit(image, "edit-1")
    assert second.content == first.content and second.headers["idempotent-replayed"] == "true"
    assert len(fal.requests_to("POST")) == 1
    with pytest.raises(openai.ConflictError):
        edit(png_bytes(96, 64, color=(1, 2, 3)), "edit-1")
    assert len(fal.requests_to("POST")) == 1


def test_answers_expire(live: LiveServer, fal: FalEmulator) -> None:
    app = live.server.config.app
    assert isinstance(app, FastAPI)
    app.state.idempotency.ttl_s = 1  # Settings allows 60 s at least; the test cannot wait that long
    first = gen(live, "short-lived")
    time.sleep(1.2)
    second = gen(live, "short-lived")
    assert "idempotent-replayed" not in second.headers
    assert second.content != first.content  # a new generation: another created time / request
    assert len(fal.requests_to("POST")) == 2
