"""API keys over real HTTP: every /v1 route needs one, revocation, limits, budgets, usage, the CLI,
and the first start of `fluxport serve` that mints and prints a key once."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.routing import Route

from fluxport.keys import create_key, find_key
from fluxport.storage.db import Database
from tests.conftest import LiveServer, free_port, start_server
from tests.emulators import EmulatorConfig, FalEmulator
from tests.test_cli import run_cli

KEY_LINE = re.compile(r"^\s*(fp_[A-Za-z0-9_-]{32,})\s*$", re.MULTILINE)


def db_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{(data_dir / 'fluxport.db').resolve()}"


def make_key(data_dir: Path, name: str = "test", **limits: Any) -> str:
    async def go() -> str:
        db = await Database.open(db_url(data_dir))
        try:
            return (await create_key(db, name=name, **limits))[1]
        finally:
            await db.close()

    return asyncio.run(go())


def revoke(data_dir: Path, secret: str) -> None:
    async def go() -> None:
        db = await Database.open(db_url(data_dir))
        try:
            row = await find_key(db, secret)
            assert row is not None
            await db.revoke_api_key(row.id)
        finally:
            await db.close()

    asyncio.run(go())


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    data = tmp_path / "data"
    secret = make_key(data)  # a key exists, so the server mints none of its own
    live = start_server(data, auth="keys")
    yield live, secret
    live.stop()


def all_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI >= 0.16x nests them)."""
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                yield method, prefix + route.path
        elif hasattr(route, "original_router"):  # fastapi.routing._IncludedRouter
            inner = prefix + (getattr(route.include_context, "prefix", "") or "")
            yield from all_routes(route.original_router.routes, inner)
        elif isinstance(getattr(route, "routes", None), list):  # Mount, Router
            yield from all_routes(route.routes, prefix + getattr(route, "path", ""))


def v1_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (method, re.sub(r"\{[^}]+\}", "x", path))
        for method, path in all_routes(app.routes)
        if method != "HEAD" and (path == "/v1" or path.startswith("/v1/"))
    ]


def test_every_v1_route_answers_401_without_a_key_and_not_with_one(keyed: tuple[LiveServer, str]) -> None:
    live, secret = keyed
    app = live.server.config.app
    assert isinstance(app, FastAPI)
    routes = v1_routes(app)
    # The routes this test knows today; a new /v1 route is checked all the same.
    assert {("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("GET", "/v1/usage")} <= set(
        routes
    )
    assert len(routes) >= 6
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer fp_wrong"}, {"Authorization": secret}):
            r = httpx.request(method, live.url + path, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["x-request-id"].startswith("req_")
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, live.url + path, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
        assert r.status_code != 401, (method, path, r.text)
    # Outside /v1: the pages, the playground, health and stored images need no key.
    for path in ("/", "/healthz", "/playground", "/images/nope.png", "/metrics"):
        assert httpx.get(live.url + path, timeout=30).status_code != 401, path


def test_sdk_with_a_valid_key_works_and_bad_or_revoked_keys_do_not(keyed: tuple[LiveServer, str]) -> None:
    live, secret = keyed
    client = live.client(api_key=secret)
    assert any(m.id == "flux.2-dummy" for m in client.models.list().data)
    img = client.images.generate(
        model="flux.2-dummy", prompt="a key", size="256x256", response_format="b64_json"
    )
    assert img.data and img.data[0].b64_json
    with pytest.raises(openai.AuthenticationError) as err:
        live.client(api_key="fp_" + "x" * 32).models.list()
    assert err.value.code == "invalid_api_key"
    revoke(live.settings.data_dir, secret)
    deadline = time.monotonic() + 3
    while True:  # the server notices the revocation within about a second
        try:
            client.models.list()
        except openai.AuthenticationError as exc:
            assert "revoked" in exc.message
            break
        assert time.monotonic() < deadline, "revocation did not take effect"
        time.sleep(0.2)


def test_requests_are_attributed_to_their_key(keyed: tuple[LiveServer, str]) -> None:
    live, secret = keyed
    raw = live.client(api_key=secret).images.with_raw_response.generate(
        model="flux.2-dummy", prompt="mine", size="256x256"
    )

    async def go() -> Any:
        db = await Database.open(live.settings.resolved_database_url)
        try:
            row = await find_key(db, secret)
            return row, await db.get_request(raw.headers["x-request-id"])
        finally:
            await db.close()

    key, request = asyncio.run(go())
    assert request is not None and key is not None and request.api_key_id == key.id


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = make_key(data, rate_limit_per_minute=3)
    live = start_server(data, auth="keys")
    try:
        client = live.client(api_key=secret)
        for _ in range(3):
            client.models.list()
        with pytest.raises(openai.RateLimitError) as err:
            client.models.list()
        assert err.value.code == "rate_limit_exceeded"
        assert "3 requests per minute" in err.value.message
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    finally:
        live.stop()


def test_monthly_budget_answers_403_and_usage_shows_the_spend(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = make_key(data, monthly_budget_usd=0.01)
    with FalEmulator(EmulatorConfig(queue=0.0, run=0.03), key="fk") as fal:  # type: ignore[arg-type]
        live = start_server(data, auth="keys", fal_key="fk", fal_url=fal.base_url)
        try:
            client = live.client(api_key=secret)
            first = client.images.generate(model="flux.2-dev", prompt="p", size="1024x768")
            assert first.usage is not None
            cost = first.usage.model_dump()["cost_usd"]
            assert cost == pytest.approx(0.012)
            with pytest.raises(openai.PermissionDeniedError) as err:
                client.images.generate(model="flux.2-dev", prompt="p", size="1024x768")
            assert err.value.code == "budget_exceeded"
            assert "$0.0120" in err.value.message and "$0.0100" in err.value.message
            assert len(fal.requests_to("POST")) == 1
            # A dry run costs nothing: answered even over budget.
            dry = client.images.generate(
                model="flux.2-dev", prompt="p", size="1024x768", extra_body={"dry_run": True}
            )
            assert dry.model_dump()["dry_run"] is True

            usage = httpx.get(f"{live.api}/usage", headers={"Authorization": f"Bearer {secret}"}).json()
            assert usage["object"] == "usage"
            assert usage["api_key"]["monthly_budget_usd"] == 0.01
            assert usage["budget_remaining_usd"] == 0
            for period in ("this_month", "all_time"):
                figures = usage[period]
                assert figures["requests"] == 3  # succeeded, refused over budget, dry run
                assert figures["succeeded"] == 1
                assert figures["images"] == 1
                assert figures["megapixels"] == pytest.approx(1024 * 768 / 1e6)
                assert figures["cost_usd"] == pytest.approx(cost)
        finally:
            live.stop()


def test_usage_without_auth_counts_keyless_requests(tmp_path: Path) -> None:
    live = start_server(tmp_path / "data")
    try:
        live.client().images.generate(model="flux.2-dummy", prompt="open", size="256x256")
        usage = httpx.get(f"{live.api}/usage").json()
        assert usage["api_key"] is None
        assert usage["all_time"]["requests"] == 1 and usage["all_time"]["images"] == 1
        assert usage["all_time"]["megapixels"] == pytest.approx(256 * 256 / 1e6)
    finally:
        live.stop()


def test_cli_keys_create_list_revoke(tmp_path: Path) -> None:
    created = run_cli(tmp_path, "keys", "create", "--name", "ci", "--rate-limit", "5", "--budget", "2.5")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert KEY_LINE.fullmatch(secret) and len(secret) >= 35
    assert "shown once" in created.stderr
    listed = run_cli(tmp_path, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ci" in listed.stdout and "5/min" in listed.stdout and "$2.5" in listed.stdout
    assert secret[:10] in listed.stdout and secret not in listed.stdout
    revoked = run_cli(tmp_path, "keys", "revoke", secret[:10] + "…")
    assert revoked.returncode == 0, revoked.stderr
    assert "Revoked" in revoked.stderr
    assert run_cli(tmp_path, "keys", "revoke", "fp_nosuchkey").returncode == 1

    async def go() -> Any:
        db = await Database.open(db_url(tmp_path / "data"))
        try:
            return await db.list_api_keys()
        finally:
            await db.close()

    (row,) = asyncio.run(go())
    assert row.revoked_at is not None and row.name == "ci" and row.monthly_budget_usd == 2.5


class Serve:
    """`fluxport serve` in a subprocess, its stderr collected by a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "FLUXPORT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
        for name in ("FAL_KEY", "REPLICATE_API_TOKEN", "FLUXPORT_AUTH", "FLUXPORT_PORT"):
            env.pop(name, None)
        env["COLUMNS"] = "200"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluxport.cli",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        stream = self.proc.stderr
        self.reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, "".join(self.lines)
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "fluxport serve did not start"
            time.sleep(0.1)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return "".join(self.lines)


def test_first_start_creates_and_prints_one_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Serve(data)
    try:
        time.sleep(0.2)
        keys = KEY_LINE.findall("".join(first.lines))
        assert len(keys) == 1, "".join(first.lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{first.port}/v1", api_key=keys[0], max_retries=0)
        assert client.models.list().data
    finally:
        out = first.stop()
    assert out.count(keys[0]) == 1  # shown once, in the banner
    assert "Auth: API keys" in out

    second = Serve(data)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{second.port}/v1", api_key=keys[0], max_retries=0)
        assert client.models.list().data
    finally:
        out = second.stop()
    assert KEY_LINE.findall(out) == [], out


def test_auth_none_is_announced_loudly(tmp_path: Path) -> None:
    env = {**os.environ, "FLUXPORT_AUTH": "none"}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxport.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env={**env, "FLUXPORT_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "AUTH IS OFF" in err and "FLUXPORT_AUTH=none" in err
    assert KEY_LINE.findall(err) == []
