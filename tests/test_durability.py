"""Records, disconnects and back-pressure: nothing is lost, nothing hangs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from fluxport.storage.db import Database
from tests.conftest import LiveServer, start_server

DUMMY = "flux.2-dummy"


def fetch_request(server: LiveServer, request_id: str):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        db = await Database.open(server.settings.resolved_database_url)
        try:
            return await db.get_request(request_id), await db.list_attempts(request_id)
        finally:
            await db.close()

    return asyncio.run(go())


def test_request_and_attempts_are_recorded(server: LiveServer, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        model=DUMMY,
        prompt="a recorded cat",
        n=2,
        size="320x256",
        response_format="url",
        extra_body={"seed": 11},
    )
    request_id = raw.headers["x-request-id"]
    row, attempts = fetch_request(server, request_id)
    assert row is not None
    assert row.status == "succeeded" and row.provider == "local" and row.model == DUMMY
    assert (row.width, row.height, row.images, row.n) == (320, 256, 2, 2)
    assert row.params["seed"] == 11 and row.params["size"] == "320x256"
    assert row.total_ms and row.total_ms > 0 and row.generation_ms is not None and row.ttfb_ms is not None
    assert attempts and all(a.status == "succeeded" and a.provider == "local" for a in attempts)


def test_rejected_requests_are_recorded_too(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=DUMMY, prompt="x", n=12)
    row, attempts = fetch_request(server, info.value.request_id or "")
    assert row is not None and row.status == "rejected" and row.error["param"] == "n"
    assert attempts == []


def _hang_up(server: LiveServer, prompt: str, headers: dict[str, str] | None = None) -> None:
    """Send a slow generation and give up on it after half a second."""
    body = {"model": DUMMY, "prompt": prompt, "n": 4, "size": "2048x2048", "response_format": "url"}
    with httpx.Client(timeout=httpx.Timeout(0.5)) as http:
        try:
            response = http.post(f"{server.api}/images/generations", json=body, headers=headers or {})
            pytest.skip(f"generation finished before the client gave up ({response.status_code})")
        except httpx.ReadTimeout:
            pass


def _finished(server: LiveServer, prompt: str):  # type: ignore[no-untyped-def]
    """The request with `prompt` (its id never reached the client) once it is over, and its images."""

    async def latest():  # type: ignore[no-untyped-def]
        db = await Database.open(server.settings.resolved_database_url)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                rows = await db.find_requests(prompt=prompt)
                if rows and rows[0].status not in ("queued", "running"):
                    return rows[0], await db.list_images(rows[0].id), await db.list_attempts(rows[0].id)
                await asyncio.sleep(0.2)
            raise AssertionError("the abandoned generation never finished")
        finally:
            await db.close()

    return asyncio.run(latest())


def test_a_client_that_hangs_up_cancels_its_generation(server: LiveServer) -> None:
    t0 = time.monotonic()
    _hang_up(server, "slow and abandoned")
    row, images, attempts = _finished(server, "slow and abandoned")
    assert row.status == "cancelled" and row.error["code"] == "client_disconnected"
    assert row.client_disconnected is True and row.images == 0 and images == []
    assert [a.status for a in attempts] == ["cancelled"]
    # Stopped, not run to the end: four 2048x2048 dummy images take far longer than this.
    assert time.monotonic() - t0 < 30


def test_with_an_idempotency_key_a_hung_up_request_finishes_for_the_retry(server: LiveServer) -> None:
    headers = {"Idempotency-Key": "hang-up-then-retry"}
    _hang_up(server, "slow but collectable", headers)
    row, images, _ = _finished(server, "slow but collectable")
    assert row.status == "succeeded" and row.images == 4
    assert row.client_disconnected is True
    assert len(images) == 4
    for image in images:
        assert (server.settings.images_dir / image.path).stat().st_size == image.bytes > 0
    # The retry with the same key is answered from the stored response: no second generation.
    body = {
        "model": DUMMY,
        "prompt": "slow but collectable",
        "n": 4,
        "size": "2048x2048",
        "response_format": "url",
    }
    again = httpx.post(f"{server.api}/images/generations", json=body, headers=headers, timeout=60)
    assert again.status_code == 200 and len(again.json()["data"]) == 4
    assert {d["url"].rsplit("/", 1)[1].split(".")[0] for d in again.json()["data"]} == {i.id for i in images}


def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    live = start_server(tmp_path, local_queue_size=1)
    try:
        client = live.client()
        client.images.generate(model=DUMMY, prompt="warm", size="256x256", response_format="b64_json")

        def one(_: int) -> str:
            try:
                client.images.generate(
                    model=DUMMY, prompt="busy", n=2, size="1024x1024", response_format="b64_json"
                )
                return "ok"
            except openai.RateLimitError as exc:
                retry_after = exc.response.headers.get("retry-after")
                assert retry_after is not None and 1 <= float(retry_after) <= 120
                assert exc.type == "rate_limit_error"
                return "429"

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(one, range(6)))
        assert "429" in outcomes and "ok" in outcomes
    finally:
        live.stop()


def test_a_request_that_cannot_be_recorded_is_not_run(tmp_path: Path) -> None:
    """The record is committed while the first provider call starts; if the database refuses it,
    the call is cancelled upstream and the client gets a 503 to retry, not an unrecorded image."""
    from tests.emulators import EmulatorConfig, FalEmulator

    fal = FalEmulator(EmulatorConfig(queue=0.0, run=0.5, seed=3), key="fk")
    fal.start()
    live = start_server(tmp_path, fal_key="fk", fal_url=fal.base_url)
    try:
        database = live.settings.resolved_database_url.split(":///", 1)[1]
        with sqlite3.connect(database) as conn:  # the database itself refuses: no mock in fluxport
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON requests WHEN NEW.prompt = 'refused' "
                "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
            )
        client = live.client(max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.images.generate(model="flux.2-dev", prompt="refused", size="512x512")
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "storage_unavailable"
        jobs = list(fal.jobs.values())
        assert len(jobs) <= 1 and all(job.cancelled for job in jobs)  # submitted at most, then cancelled
        # The next request is recorded and runs as usual.
        ok = client.images.with_raw_response.generate(model="flux.2-dev", prompt="fine", size="512x512")
        row, attempts = fetch_request(live, ok.headers["x-request-id"])
        assert row is not None and row.status == "succeeded" and [a.status for a in attempts] == ["succeeded"]
    finally:
        live.stop()
        fal.stop()
