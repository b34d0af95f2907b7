"""Two real `fluxport serve` processes on one PostgreSQL database and one Redis, driven over HTTP
with the openai SDK: what one replica decides, the other agrees with.

The fal and Replicate emulators stand in for the hosted providers (shared by both replicas, as the
real ones would be). Each test skips with the reason where PostgreSQL or Redis is not reachable.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fluxport.keys import create_key
from fluxport.storage.db import Database
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, ReplicateEmulator
from tests.serveproc import serve, stop
from tests.services import free_port, postgres_or_skip, redis_or_skip, unique_prefix

FAST = EmulatorConfig(queue=0.0, run=0.3)


@dataclass
class Fleet:
    db_url: str
    env: dict[str, str]
    a: str  # replica A's base URL
    b: str
    fal: FalEmulator
    replicate: ReplicateEmulator

    def client(self, base: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    def new_key(self, **kwargs: Any) -> str:
        return self.new_key_with_id(**kwargs)[1]

    def new_key_with_id(self, **kwargs: Any) -> tuple[str, str]:
        async def go() -> tuple[str, str]:
            db = await Database.open(self.db_url)
            try:
                row, secret = await create_key(db, name=f"t-{secrets.token_hex(3)}", **kwargs)
                return row.id, secret
            finally:
                await db.close()

        return asyncio.run(go())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fluxport.cli", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _admin_url(url: str) -> str:
    return url.replace("postgresql+asyncpg", "postgresql")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pg = postgres_or_skip()
    redis_url = redis_or_skip()
    # A database of this module's own, so that no other test (or CI run beside it) shares it.
    name = f"fptest_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(_admin_url(pg))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    db_url = pg.rsplit("/", 1)[0] + f"/{name}"
    asyncio.run(_migrate(db_url))  # keys are created before the servers start
    tmp = tmp_path_factory.mktemp("replicas")
    with (
        FalEmulator(FAST, key="fal-k") as fal,
        ReplicateEmulator(FAST, token="r8-k") as replicate,
    ):
        env = {
            "FLUXPORT_DATABASE_URL": db_url,
            "FLUXPORT_REDIS_URL": redis_url,
            "FLUXPORT_REDIS_PREFIX": unique_prefix(),
            "FLUXPORT_AUTH": "keys",
            "FAL_KEY": "fal-k",
            "FLUXPORT_FAL_URL": fal.base_url,
            "REPLICATE_API_TOKEN": "r8-k",
            "FLUXPORT_REPLICATE_URL": replicate.base_url,
            "FLUXPORT_HOSTED_POLL_INTERVAL_S": "0.05",
            "FLUXPORT_BREAKER_FAILURES": "2",
            "FLUXPORT_BREAKER_COOLDOWN_S": "120",
            # fal first while it is up: it is the cheaper one here.
            "FLUXPORT_ROUTER_STRATEGY": "cheapest",
            "FLUXPORT_PRICES": '{"fal/flux.2-dev": 0.001}',
        }
        procs = []
        ports = [free_port(), free_port()]
        try:
            for i, port in enumerate(ports):
                data = tmp / f"replica-{i}"
                procs.append(
                    serve(data, port, tmp / f"replica-{i}.log", strip_prefixes=("FLUXPORT_",), **env)
                )
            yield Fleet(
                db_url, env, f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", fal, replicate
            )
        finally:
            for proc in procs:
                stop(proc)
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _migrate(url: str) -> None:
    db = await Database.open(url)
    await db.close()


def test_both_replicas_say_they_share_state(fleet: Fleet) -> None:
    for base in (fleet.a, fleet.b):
        health = httpx.get(f"{base}/healthz").json()
        assert health["status"] == "ok" and health["live_state"] == "redis" and health["redis"] == "ok"


def test_a_rate_limit_holds_across_replicas(fleet: Fleet) -> None:
    key = fleet.new_key(rate_limit_per_minute=5)
    clients = [fleet.client(fleet.a, key), fleet.client(fleet.b, key)]

    def call(i: int) -> int:
        try:
            clients[i % 2].models.list()
        except openai.RateLimitError as exc:
            assert exc.response.headers["retry-after"]
            return 429
        return 200

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(call, range(12)))
    assert codes.count(200) == 5 and codes.count(429) == 7


def test_a_key_revoked_through_one_replica_is_refused_by_the_other_within_a_second(fleet: Fleet) -> None:
    key_id, key = fleet.new_key_with_id()
    on_b = fleet.client(fleet.b, key)
    on_b.models.list()  # B has it cached as valid
    # Keys are managed with the CLI (there is no key-admin HTTP route): run it as replica A's host.
    revoked = fleet.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.monotonic()
    while True:
        try:
            on_b.models.list()
        except openai.AuthenticationError as exc:
            assert "revoked" in exc.message
            break
        assert time.monotonic() - revoked_at < 1.0 + 0.5  # the watch interval, and a margin for the CLI
        time.sleep(0.05)
    with pytest.raises(openai.AuthenticationError):
        fleet.client(fleet.a, key).models.list()


def test_one_idempotency_key_on_two_replicas_generates_and_bills_once(fleet: Fleet) -> None:
    key = fleet.new_key()
    before = len(fleet.replicate.requests_to("POST"))

    def send(base: str) -> httpx.Response:
        raw = fleet.client(base, key).images.with_raw_response.generate(
            model="flux.2-dev",
            prompt="one lighthouse",
            size="1024x768",
            response_format="b64_json",
            extra_headers={"Idempotency-Key": "replicas-1"},
            extra_body={"provider": "replicate"},
        )
        return raw.http_response

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [fleet.a, fleet.b, fleet.a, fleet.b]))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3
    assert len(fleet.replicate.requests_to("POST")) == before + 1  # one generation
    for base in (fleet.a, fleet.b):  # billed once, whichever replica is asked
        usage = httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        assert usage["all_time"]["requests"] == 1
        assert usage["all_time"]["cost_usd"] == pytest.approx(
            float(answers[0].headers["x-fluxport-cost-usd"])
        )


def test_a_breaker_tripped_on_one_replica_routes_the_other_away(fleet: Fleet) -> None:
    key = fleet.new_key()
    gen = dict(model="flux.2-dev", prompt="p", size="1024x768", response_format="b64_json")
    on_a, on_b = fleet.client(fleet.a, key), fleet.client(fleet.b, key)
    first = on_b.images.with_raw_response.generate(**gen)  # type: ignore[call-overload]
    assert first.headers["x-fluxport-provider"] == "fal"  # fal leads while it is up
    # fal starts failing: A sees two failures (failing over to Replicate each time) and trips it.
    fleet.fal.script(*(Fault(FaultKind.SERVER_ERROR) for _ in range(20)))
    for _ in range(2):
        raw = on_a.images.with_raw_response.generate(**gen)  # type: ignore[call-overload]
        assert raw.headers["x-fluxport-provider"] == "replicate"
    tripped_at = time.monotonic()
    submitted = len(fleet.fal.requests_to("POST"))
    time.sleep(1.0)  # a trip reaches every replica within a second
    raw = on_b.images.with_raw_response.generate(**gen)  # type: ignore[call-overload]
    assert raw.headers["x-fluxport-provider"] == "replicate"
    assert len(fleet.fal.requests_to("POST")) == submitted  # B never tried fal
    assert time.monotonic() - tripped_at < 30
    fleet.fal.script()  # nothing more queued for later tests


def test_stats_merge_both_replicas(fleet: Fleet) -> None:
    key = fleet.new_key()
    since = datetime.now(UTC)
    for base in (fleet.a, fleet.b):
        fleet.client(base, key).images.generate(
            model="flux.2-dev",
            prompt="stats",
            size="1024x768",
            response_format="b64_json",
            extra_body={"provider": "replicate"},
        )

    async def count() -> int:
        db = await Database.open(fleet.db_url)
        try:
            rows = await db.recent_outcomes()
        finally:
            await db.close()
        return len(rows.get(("replicate", "flux.2-dev"), []))

    attempts = asyncio.run(count())
    out = fleet.cli("stats", "--model", "flux.2-dev")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "replicate" in line)
    cells = [c.strip() for c in row.strip("│┃| ").split("│")]
    assert int(cells[5]) == attempts >= 2  # every replica's attempts, counted together
    assert datetime.now(UTC) - since < timedelta(minutes=5)


def test_a_replica_restarting_leaves_the_others_requests_in_flight(fleet: Fleet) -> None:
    """Start-up repair on a shared database interrupts only requests older than any live one."""

    async def go() -> tuple[str, str, int]:
        from fluxport.storage.schema import requests as requests_table

        db = await Database.open(fleet.db_url)
        try:
            fresh, old = (f"req_{secrets.token_hex(8)}" for _ in range(2))
            for rid in (fresh, old):
                fields = {"model": "flux.2-dev", "operation": "generate", "prompt": "p", "params": {}, "n": 1}
                await db.create_request(id=rid, **fields)  # type: ignore[arg-type]
            async with db.engine.begin() as conn:
                await conn.execute(
                    requests_table.update()
                    .where(requests_table.c.id == old)
                    .values(created_at=datetime.now(UTC) - timedelta(hours=1))
                )
            interrupted = await db.mark_interrupted(datetime.now(UTC) - timedelta(minutes=6))
            a, b = await db.get_request(fresh), await db.get_request(old)
            assert a is not None and b is not None
            return a.status, b.status, interrupted
        finally:
            await db.close()

    fresh_status, old_status, interrupted = asyncio.run(go())
    assert fresh_status == "queued" and old_status == "interrupted" and interrupted >= 1


def test_workers_need_shared_state(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXPORT_")}
    env["FLUXPORT_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "fluxport.cli", "serve", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    text = " ".join((out.stdout + out.stderr).split())
    assert "--workers 2 needs state shared by every worker" in text
    assert "FLUXPORT_REDIS_URL" in text and "not SQLite" in text


def test_two_workers_on_one_port_share_one_limit(fleet: Fleet, tmp_path: Path) -> None:
    import psutil

    port = free_port()
    proc = serve(
        tmp_path / "data",
        port,
        tmp_path / "workers.log",
        strip_prefixes=("FLUXPORT_",),
        args=("--workers", "2"),
        **fleet.env,
    )
    try:
        workers = [
            c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn" in " ".join(c.cmdline())
        ]
        assert len(workers) == 2
        key = fleet.new_key(rate_limit_per_minute=4)

        def call(_: int) -> int:
            # A fresh connection each time: the kernel spreads them over both workers.
            try:
                fleet.client(f"http://127.0.0.1:{port}", key).models.list()
            except openai.RateLimitError:
                return 429
            return 200

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(16)))
        assert codes.count(200) == 4 and codes.count(429) == 12
    finally:
        stop(proc)


def test_the_playground_limit_per_ip_holds_across_replicas(fleet: Fleet) -> None:
    # Each submission counts before its form is read: empty forms (400) count, cheaply.
    codes = [
        httpx.post(f"{base}/playground/api/jobs", files={"prompt": (None, "")}).status_code
        for base in [fleet.a, fleet.b] * 7
    ]
    limit = 10  # FLUXPORT_PLAYGROUND_RATE_PER_MINUTE's default
    assert all(code != 429 for code in codes[:limit])
    assert codes[limit:] == [429] * (len(codes) - limit)


def test_postgres_going_away_is_a_503_never_a_500(fleet: Fleet, tmp_path: Path) -> None:
    """A replica whose database connection is cut (a proxy in front of the real server) answers
    503 storage_unavailable with Retry-After, and serves again once the database is back."""
    from urllib.parse import urlsplit

    from tests.services import CuttableProxy

    real = urlsplit(fleet.db_url.replace("postgresql+asyncpg", "postgresql"))
    proxy = CuttableProxy(real.port or 5432)
    env = {**fleet.env, "FLUXPORT_DATABASE_URL": fleet.db_url.replace(f":{real.port}/", f":{proxy.port}/")}
    port = free_port()
    proc = serve(tmp_path / "data", port, tmp_path / "pg.log", strip_prefixes=("FLUXPORT_",), **env)
    base = f"http://127.0.0.1:{port}"
    try:
        key = fleet.new_key()
        fleet.client(base, key).models.list()
        proxy.cut()
        fresh_key = fleet.new_key()  # not cached by the replica: its lookup needs the database
        with pytest.raises(openai.InternalServerError) as err:
            fleet.client(base, fresh_key).models.list()
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        assert err.value.code == "storage_unavailable"
        assert httpx.get(f"{base}/healthz").status_code == 200
        proxy.restore()
        deadline = time.monotonic() + 10
        while True:
            try:
                fleet.client(base, fresh_key).models.list()
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        proxy.cut()
        stop(proc)
