"""GET /v1/models/{id}/providers on a live server: every provider, its price and its recorded figures."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from fluxport.storage.db import Database
from tests.conftest import LiveServer, start_server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("providers-data"), prices={"local/flux.2-dev": 0.002})
    asyncio.run(record(server.settings.resolved_database_url))
    yield server
    server.stop()


async def record(url: str) -> None:
    """Attempts as the gateway would record them, straight into the server's database."""
    db = await Database.open(url)
    try:
        await db.create_request(
            id="req_a", model="flux.2-dev", operation="generate", prompt="p", params={}, n=1
        )
        now = datetime.now(UTC)
        rows = [
            ("fal", "succeeded", 4000.0, 3000.0, timedelta(hours=1)),
            ("fal", "succeeded", 2000.0, 1000.0, timedelta(hours=2)),
            ("fal", "failed", None, None, timedelta(hours=3)),
            ("fal", "cancelled", 1.0, 1.0, timedelta(hours=4)),  # a hedge loser: not counted
            ("fal", "succeeded", 1.0, 1.0, timedelta(days=31)),  # outside the 30-day window
        ]
        for provider, status, total, ttfb, ago in rows:
            aid = await db.start_attempt(
                request_id="req_a", provider=provider, model="flux.2-dev", started_at=now - ago
            )
            await db.finish_attempt(
                aid,
                status=status,
                error=None,
                queued_ms=None,
                ttfb_ms=ttfb,
                generation_ms=total,
                total_ms=total,
                provider_request_id=None,
                normalization=None,
                billed_usd=None,
            )
    finally:
        await db.close()


def test_every_provider_with_price_and_stats(live: LiveServer) -> None:
    r = httpx.get(f"{live.api}/models/flux.2-dev/providers")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "flux.2-dev" and body["window_days"] == 30
    rows = {row["provider"]: row for row in body["data"]}
    assert list(rows) == ["local", "fal", "replicate"]
    assert set(rows["fal"]) == {
        "provider",
        "configured",
        "detail",
        "requests",
        "success_rate",
        "p50_ms",
        "p95_ms",
        "ttfb_p50_ms",
        "price_per_mp_usd",
        "input_price_per_mp_usd",
    }
    fal = rows["fal"]
    assert fal["configured"] is False and "FAL_KEY" in fal["detail"]
    assert (fal["requests"], fal["success_rate"]) == (3, 2 / 3)
    assert (fal["p50_ms"], fal["p95_ms"], fal["ttfb_p50_ms"]) == (2000.0, 4000.0, 1000.0)
    assert (fal["price_per_mp_usd"], fal["input_price_per_mp_usd"]) == (0.012, 0.012)
    # No data: null figures, zero requests. The configured local price wins over the catalog's $0.
    local = rows["local"]
    assert (local["requests"], local["success_rate"], local["p50_ms"], local["ttfb_p50_ms"]) == (
        0,
        None,
        None,
        None,
    )
    assert (local["price_per_mp_usd"], local["input_price_per_mp_usd"]) == (0.002, 0.002)
    assert (rows["replicate"]["price_per_mp_usd"], rows["replicate"]["input_price_per_mp_usd"]) == (
        0.012,
        0.0,
    )


def test_aliases_and_percent_encoding(live: LiveServer) -> None:
    for path in ("black-forest-labs%2FFLUX.2-dev", "black-forest-labs/FLUX.2-dev", "FLUX.2-DEV"):
        r = httpx.get(f"{live.api}/models/{path}/providers")
        assert r.status_code == 200 and r.json()["model"] == "flux.2-dev", (path, r.text)
        # The catch-all still answers for the model itself.
        model = httpx.get(f"{live.api}/models/{path}")
        assert model.status_code == 200 and model.json()["id"] == "flux.2-dev"
    flash = httpx.get(f"{live.api}/models/fal%2Fflux.2-dev-flash/providers").json()
    assert [(row["provider"], row["price_per_mp_usd"]) for row in flash["data"]] == [
        ("local", 0.0),
        ("fal", 0.005),
    ]
    assert all(row["requests"] == 0 for row in flash["data"])


def test_unknown_model_is_404(live: LiveServer) -> None:
    r = httpx.get(f"{live.api}/models/nope%2Fnothing/providers")
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model"
