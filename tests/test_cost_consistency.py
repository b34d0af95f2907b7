"""One owner for the size and the price: for every provider and tier, the dry run's estimate is the
cost the request is billed, and the provider (its emulator) bills the same for what it generated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import LiveServer, start_server
from tests.emulators import EmulatorConfig, FalEmulator, ReplicateEmulator

FAST = EmulatorConfig(queue=0.01, run=0.05)


@pytest.fixture(scope="module")
def hosted(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, FalEmulator, ReplicateEmulator]]:
    with FalEmulator(FAST, key="k") as fal, ReplicateEmulator(FAST, token="t") as rep:
        live = start_server(
            tmp_path_factory.mktemp("cost"),
            fal_key="k",
            fal_url=fal.base_url,
            replicate_api_token="t",
            replicate_url=rep.base_url,
            prices={"local/flux.2-dummy": 0.01},  # a price, so local's sizes are checked too
        )
        yield live, fal, rep
        live.stop()


CASES = [
    ("fal", "flux.2-dev"),
    ("fal", "flux.2-dev-flash"),
    ("replicate", "flux.2-dev"),
    ("local", "flux.2-dummy"),
]
SHAPES: list[dict[str, Any]] = [
    {"resolution": "0.5K"},
    {"resolution": "1K"},
    {"resolution": "2K"},  # Replicate makes at most 1440 px a side: 2 MP billed, not 4
    {"resolution": "2K", "aspect_ratio": "16:9"},
    {"size": "1920x1080"},
    {"size": "3:4", "n": 2},
]


@pytest.mark.parametrize(("provider", "model"), CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_dry_run_cost_is_the_billed_cost(
    hosted: tuple[LiveServer, FalEmulator, ReplicateEmulator],
    provider: str,
    model: str,
    shape: dict[str, Any],
) -> None:
    server, fal, rep = hosted
    client = server.client()
    body = {"provider": provider, **{k: v for k, v in shape.items() if k != "size" and k != "n"}}
    size = shape.get("size")
    n = shape.get("n", 1)
    if provider == "local":
        body.pop("provider")  # the dummy has one provider
    dry = client.images.with_raw_response.generate(
        model=model,
        prompt="a barn",
        n=n,
        size=size,
        extra_body={**body, "dry_run": True},  # type: ignore[arg-type]
    )
    estimate = float(dry.headers["x-fluxport-cost-usd"])
    fal.reset()
    rep.reset()
    raw = client.images.with_raw_response.generate(
        model=model,
        prompt="a barn",
        n=n,
        size=size,
        response_format="b64_json",
        extra_body=body,  # type: ignore[arg-type]
    )
    assert raw.headers["x-fluxport-provider"] == provider
    billed = float(raw.headers["x-fluxport-cost-usd"])
    result = raw.parse()
    assert result.usage is not None
    assert estimate == billed == pytest.approx(result.usage.model_extra["cost_usd"])  # type: ignore[index]
    assert estimate > 0
    if provider != "local":
        # What the provider itself charged for the images it made, by its own rules.
        charged = sum(entry.usd for entry in (fal if provider == "fal" else rep).ledger)
        assert charged == pytest.approx(billed, abs=1e-9)


def test_each_provider_receives_its_own_fields_and_unknown_ones(
    hosted: tuple[LiveServer, FalEmulator, ReplicateEmulator],
) -> None:
    """Provider-specific fields go to the provider that declares them (its Capabilities), never to
    another; fields no provider declares pass through to whichever serves the request."""
    server, fal, rep = hosted
    extras = {"go_fast": False, "acceleration": "high", "brand_new_field": 1}
    for provider in ("fal", "replicate"):
        fal.reset()
        rep.reset()
        server.client().images.generate(
            model="flux.2-dev",
            prompt="a barn",
            response_format="b64_json",
            extra_body={"provider": provider, **extras},
        )
        if provider == "fal":
            [post] = fal.requests_to("POST")
            sent = post.body
        else:
            [post] = rep.requests_to("POST", "/predictions")
            sent = post.body["input"]  # type: ignore[index]
        assert isinstance(sent, dict)
        assert sent["brand_new_field"] == 1
        assert ("acceleration" in sent) == (provider == "fal")
        assert ("go_fast" in sent) == (provider == "replicate")
