"""`fluxport stats`: the Provider Rankings table from the attempts recorded in the data dir."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fluxport.settings import Settings
from fluxport.storage.db import Database
from tests.test_cli import run_cli


async def record(data_dir: Path) -> None:
    db = await Database.open(Settings(data_dir=data_dir).resolved_database_url)
    try:
        await db.create_request(
            id="req_s", model="flux.2-dev", operation="generate", prompt="p", params={}, n=1
        )
        now = datetime.now(UTC)
        rows = [
            ("replicate", "succeeded", 9000.0, timedelta(hours=1)),
            ("replicate", "failed", None, timedelta(hours=1)),
            ("fal", "succeeded", 1500.0, timedelta(hours=1)),
            ("fal", "succeeded", 2500.0, timedelta(days=3)),
            ("fal", "cancelled", 10.0, timedelta(hours=1)),
        ]
        for provider, status, total, ago in rows:
            aid = await db.start_attempt(
                request_id="req_s", provider=provider, model="flux.2-dev", started_at=now - ago
            )
            await db.finish_attempt(
                aid,
                status=status,
                error=None,
                queued_ms=None,
                ttfb_ms=total and total - 500,
                generation_ms=total,
                total_ms=total,
                provider_request_id=None,
                normalization=None,
                billed_usd=None,
            )
    finally:
        await db.close()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Table body rows by provider name: the cells between the box-drawing bars."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 7 and cells[0] in ("local", "fal", "replicate"):
            rows[cells[0]] = cells
    return rows


def test_stats_ranks_providers(tmp_path: Path) -> None:
    asyncio.run(record(tmp_path / "data"))
    out = run_cli(tmp_path, "stats", "--model", "black-forest-labs/FLUX.2-dev")
    assert out.returncode == 0, out.stderr
    assert "Provider Rankings: FLUX.2 [dev] (flux.2-dev), last 30 days" in out.stdout
    rows = table_rows(out.stdout)
    assert list(rows) == ["fal", "replicate", "local"]  # fastest median first, no data last
    assert rows["fal"] == ["fal", "1,500 ms", "2,500 ms", "100.0%", "1,000 ms", "2", "$0.012"]
    assert rows["replicate"] == ["replicate", "9,000 ms", "9,000 ms", "50.0%", "8,500 ms", "2", "$0.012"]
    assert rows["local"] == ["local", "no data yet", "", "", "", "0", "$0"]

    week = table_rows(run_cli(tmp_path, "stats", "-m", "flux.2-dev", "--window-days", "1").stdout)
    assert week["fal"][1:6] == ["1,500 ms", "1,500 ms", "100.0%", "1,000 ms", "1"]


def test_stats_for_every_model_and_unknown_model(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "stats")
    assert out.returncode == 0, out.stderr
    for model in ("flux.2-dev", "flux.2-dev-flash", "flux.2-dummy"):
        assert f"({model}), last 30 days" in out.stdout
    assert out.stdout.count("no data yet") == 3 + 2 + 1
    bad = run_cli(tmp_path, "stats", "-m", "nope")
    assert bad.returncode == 1 and "unknown model" in bad.stderr
