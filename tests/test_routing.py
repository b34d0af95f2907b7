"""Failover, circuit breaker, hedging, deadline, explicit order, dry run and cost, over real HTTP:
the SDK against fluxport, fluxport against the fal and Replicate emulators with injected faults."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from fluxport.storage.db import Database
from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, ReplicateEmulator
from tests.imagefactory import png_bytes

FAST = dict(queue=0.0, run=0.03)


@pytest.fixture
def fal() -> Iterator[FalEmulator]:
    with FalEmulator(EmulatorConfig(**FAST), key="fk") as emulator:  # type: ignore[arg-type]
        yield emulator


@pytest.fixture
def replicate() -> Iterator[ReplicateEmulator]:
    with ReplicateEmulator(EmulatorConfig(**FAST), token="rt") as emulator:  # type: ignore[arg-type]
        yield emulator


@pytest.fixture
def both(fal: FalEmulator, replicate: ReplicateEmulator, tmp_path: Path) -> Iterator[Any]:
    servers: list[LiveServer] = []

    def serve(**overrides: Any) -> LiveServer:
        live = start_server(
            tmp_path / f"s{len(servers)}",
            fal_key="fk",
            fal_url=fal.base_url,
            replicate_api_token="rt",
            replicate_url=replicate.base_url,
            **overrides,
        )
        servers.append(live)
        return live

    yield serve
    for live in servers:
        live.stop()


def attempts_of(server: LiveServer, request_id: str):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        db = await Database.open(server.settings.resolved_database_url)
        try:
            return await db.get_request(request_id), await db.list_attempts(request_id)
        finally:
            await db.close()

    return asyncio.run(go())


def gen(server: LiveServer, **kwargs: Any) -> Any:
    extra = kwargs.pop("extra_body", {})
    return server.client().images.with_raw_response.generate(
        model=kwargs.pop("model", "flux.2-dev"),
        prompt="p",
        size=kwargs.pop("size", "1024x768"),
        extra_body=extra,
        **kwargs,
    )


def test_fails_over_on_provider_failure_and_records_both(
    both: Any, fal: FalEmulator, replicate: ReplicateEmulator
) -> None:
    server = both()
    fal.script(Fault(FaultKind.SERVER_ERROR))
    raw = gen(server)
    assert raw.headers["x-fluxport-provider"] == "replicate"
    assert raw.headers["x-fluxport-attempts"] == "fal,replicate"
    row, attempts = attempts_of(server, raw.headers["x-request-id"])
    assert [(a.provider, a.status) for a in attempts] == [("fal", "failed"), ("replicate", "succeeded")]
    assert attempts[0].billed_usd == 0 and row.cost_usd == attempts[1].billed_usd > 0


@pytest.mark.parametrize(
    "kind", [FaultKind.UNAVAILABLE, FaultKind.MALFORMED, FaultKind.MISSING_IMAGES, FaultKind.RESET]
)
def test_every_provider_fault_kind_fails_over(both: Any, fal: FalEmulator, kind: FaultKind) -> None:
    server = both()
    fal.script(Fault(kind))
    raw = gen(server)
    assert raw.headers["x-fluxport-provider"] == "replicate", kind


def test_rate_limit_after_retries_fails_over(both: Any, fal: FalEmulator) -> None:
    server = both()
    fal.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.01)] * 10)
    assert gen(server).headers["x-fluxport-provider"] == "replicate"


def test_the_clients_own_4xx_never_fails_over(
    both: Any, fal: FalEmulator, replicate: ReplicateEmulator
) -> None:
    server = both()
    fal.script(Fault(FaultKind.VALIDATION, field="image_size"))
    with pytest.raises(openai.BadRequestError) as info:
        gen(server)
    assert info.value.param == "size"
    assert replicate.requests_to("POST") == []


def test_when_everything_fails_one_error_lists_what_was_tried(
    both: Any, fal: FalEmulator, replicate: ReplicateEmulator
) -> None:
    server = both()
    fal.script(Fault(FaultKind.SERVER_ERROR))
    replicate.script(Fault(FaultKind.SERVER_ERROR))
    with pytest.raises(openai.APIStatusError) as info:
        gen(server)
    assert info.value.status_code == 502
    assert "fal:" in info.value.message and "replicate:" in info.value.message


def test_breaker_trips_then_probes_the_provider_back_in(both: Any, fal: FalEmulator) -> None:
    server = both(breaker_failures=2, breaker_cooldown_s=1.0)
    order = {"provider": ["fal", "replicate"]}  # pin the order: ranking alone would also avoid fal
    fal.script(Fault(FaultKind.SERVER_ERROR), Fault(FaultKind.SERVER_ERROR))
    assert gen(server, extra_body=order).headers["x-fluxport-attempts"] == "fal,replicate"
    assert gen(server, extra_body=order).headers["x-fluxport-attempts"] == "fal,replicate"
    submitted = len(fal.requests_to("POST"))
    # Open: fal is skipped entirely, even when asked for first.
    assert gen(server, extra_body=order).headers["x-fluxport-attempts"] == "replicate"
    assert len(fal.requests_to("POST")) == submitted
    # With fal alone and its breaker open, the client is told to come back later.
    with pytest.raises(openai.InternalServerError) as info:
        server.client(max_retries=0).images.generate(
            model="flux.2-dev", prompt="p", extra_body={"provider": "fal"}
        )
    assert info.value.status_code == 503 and info.value.code == "providers_cooling_down"
    assert info.value.response.headers["retry-after"] == "1"
    time.sleep(1.1)
    # Half-open: one probe goes to fal; it succeeds and closes the breaker.
    assert gen(server, extra_body=order).headers["x-fluxport-attempts"] == "fal"
    assert gen(server, extra_body=order).headers["x-fluxport-attempts"] == "fal"


def test_hedge_starts_a_backup_and_cancels_the_loser(
    both: Any, fal: FalEmulator, replicate: ReplicateEmulator
) -> None:
    server = both(hedge=True, hedge_min_samples=5, hedge_percentile=0.5, router_strategy="fastest")
    for _ in range(5):  # measure fal as fast
        gen(server, size="512x512")
    durations = itertools.chain([3.0], itertools.repeat(0.03))
    fal.config.run = lambda rng: next(durations)
    fal.reset(fal.config)
    started = time.monotonic()
    raw = gen(server, size="512x512")
    assert time.monotonic() - started < 2.0
    assert raw.headers["x-fluxport-provider"] == "fal"
    assert raw.headers["x-fluxport-attempts"] == "fal,fal"  # the same provider again: it is the best
    row, attempts = attempts_of(server, raw.headers["x-request-id"])
    assert sorted(a.status for a in attempts) == ["cancelled", "succeeded"]
    loser = next(a for a in attempts if a.status == "cancelled")
    assert loser.billed_usd == 0
    time.sleep(0.2)
    cancels = fal.requests_to("PUT", "/cancel")
    assert len(cancels) == 1 and loser.provider == "fal"
    assert len(fal.ledger) == 1  # the cancelled primary was not billed
    assert row.cost_usd == pytest.approx(0.012)


def test_deadline_cancels_and_says_so(both: Any, fal: FalEmulator) -> None:
    server = both(request_deadline_s=0.5)
    fal.config.run = 5.0
    with pytest.raises(openai.APIStatusError) as info:
        gen(server, extra_body={"provider": "fal"})
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
    assert info.value.response.headers["x-should-retry"] == "false"
    time.sleep(0.3)
    assert len(fal.requests_to("PUT", "/cancel")) == 1
    assert fal.ledger == []


def test_explicit_provider_order(both: Any, fal: FalEmulator, replicate: ReplicateEmulator) -> None:
    server = both()
    assert (
        gen(server, extra_body={"provider": ["replicate", "fal"]}).headers["x-fluxport-provider"]
        == "replicate"
    )
    assert gen(server, extra_body={"provider": "fal"}).headers["x-fluxport-provider"] == "fal"
    replicate.script(Fault(FaultKind.SERVER_ERROR))
    raw = gen(server, extra_body={"provider": ["replicate", "fal"]})
    assert raw.headers["x-fluxport-attempts"] == "replicate,fal"
    for bad in ("openai", ["fal", "fal"], []):
        with pytest.raises(openai.BadRequestError) as info:
            gen(server, extra_body={"provider": bad})
        assert info.value.param == "provider"


def test_explicit_provider_without_the_capability_is_refused(both: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gen(both(), extra_body={"provider": "replicate", "cfg_scale": 3})
    assert info.value.param == "cfg_scale"


def test_cheapest_strategy_follows_configured_prices(both: Any) -> None:
    server = both(prices={"replicate/flux.2-dev": 0.001})
    raw = gen(server, extra_body={"strategy": "cheapest"})
    assert raw.headers["x-fluxport-provider"] == "replicate"
    assert float(raw.headers["x-fluxport-cost-usd"]) == pytest.approx(0.001)


def test_dry_run_estimates_without_generating(both: Any, fal: FalEmulator) -> None:
    server = both()
    raw = gen(server, size="1920x1080", extra_body={"dry_run": True})
    result = raw.parse()
    assert result.data == []
    extra = result.model_extra or {}
    assert extra["dry_run"] is True and extra["provider"] == "fal"
    assert result.usage is not None
    usage = result.usage.model_extra or {}
    assert usage["output_megapixels"] == 2 and usage["cost_usd"] == pytest.approx(0.024)
    assert raw.headers["x-fluxport-cost-usd"] == "0.024000"
    assert fal.requests_to("POST") == []


def test_usage_and_cost_for_a_flash_edit(both: Any) -> None:
    server = both()
    raw = server.client().images.with_raw_response.edit(
        model="flux.2-dev-flash",
        image=[png_bytes(300, 300), png_bytes(1500, 1500)],
        prompt="e",
        size="1024x1024",
    )
    usage = raw.parse().usage
    assert usage is not None
    extra = usage.model_extra or {}
    # Output 1 MP + references 1 MP and 3 MP (1500² is 2.1 MP, rounded up): 5 MP at $0.005.
    assert (extra["images"], extra["input_megapixels"], extra["output_megapixels"]) == (1, 4, 1)
    assert extra["cost_usd"] == pytest.approx(0.025)
    assert usage.input_tokens == 0  # OpenAI's required keys are present, so strict clients parse it
    assert raw.headers["x-fluxport-cost-usd"] == "0.025000"


def test_strict_sdk_parses_the_usage(both: Any) -> None:
    server = both()
    strict = openai.OpenAI(base_url=server.api, api_key="x", max_retries=0, _strict_response_validation=True)
    result = strict.images.generate(model="flux.2-dev", prompt="p", size="512x512")
    assert result.usage is not None and result.usage.total_tokens == 0


def test_metrics_count_requests_attempts_and_cost(both: Any, fal: FalEmulator) -> None:
    import httpx

    server = both()
    fal.script(Fault(FaultKind.SERVER_ERROR))
    gen(server)  # fal fails, replicate serves
    with pytest.raises(openai.BadRequestError):
        gen(server, extra_body={"seed": -1})
    text = httpx.get(server.url + "/metrics").text

    def value(name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} {labels} not in /metrics")

    assert value("fluxport_requests_total", model="flux.2-dev", status="succeeded") == 1
    assert value("fluxport_requests_total", model="flux.2-dev", status="rejected") == 1
    assert value("fluxport_attempts_total", provider="fal", outcome="failed") == 1
    assert value("fluxport_attempts_total", provider="replicate", outcome="succeeded") == 1
    assert value("fluxport_request_cost_usd_total", model="flux.2-dev") == pytest.approx(0.012)
    assert "fluxport_queue_depth" in text


def test_usage_megapixels_match_what_was_billed(both: Any, fal: FalEmulator) -> None:
    # 1183x887 (the 4:3 1K size) is just over 1 MP, but the model generates 1184x880 on its
    # 16-px grid, which is what fal bills: usage must say 1 MP, like the cost does.
    server = both()
    raw = gen(server, size="4:3", extra_body={"provider": "fal"})
    result = raw.parse()
    assert result.size == "1183x887"
    usage = result.usage.model_extra or {}  # type: ignore[union-attr]
    assert usage["output_megapixels"] == 1 and usage["cost_usd"] == pytest.approx(0.012)
    assert fal.ledger[-1].megapixels == 1
    dry = gen(server, size="4:3", extra_body={"provider": "fal", "dry_run": True}).parse()
    assert (dry.usage.model_extra or {})["output_megapixels"] == 1  # type: ignore[union-attr]
