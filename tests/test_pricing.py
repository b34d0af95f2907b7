"""Pricing: the megapixel rules as tables, their invariants as properties, and the wire shape."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import ImagesResponse
from pydantic import ValidationError

from fluxport.catalog import MODELS
from fluxport.domain.job import Size
from fluxport.domain.pricing import Rate, Usage, billable_megapixels, price, rate_for
from fluxport.providers.registry import build_providers, listed_rate
from fluxport.settings import Settings

PROVIDERS = build_providers(Settings(data_dir="unused"))
FAL_DEV = PROVIDERS["fal"].capabilities("flux.2-dev").rate
FAL_FLASH = PROVIDERS["fal"].capabilities("flux.2-dev-flash").rate
LOCAL_DEV = PROVIDERS["local"].capabilities("flux.2-dev").rate
REPLICATE_DEV = PROVIDERS["replicate"].capabilities("flux.2-dev").rate


@pytest.mark.parametrize(
    ("width", "height", "minimum", "expected"),
    [
        (1920, 1080, 0, 2),  # the seeds' example: 1.98 MP rounds up to 2
        (1024, 1024, 0, 1),  # exactly 1 MP
        (1025, 1024, 0, 2),  # one column over
        (1024, 1023, 0, 1),
        (2048, 2048, 0, 4),  # exactly 4 MP
        (2049, 2048, 0, 4),  # over 4 MP: resized to 4
        (4096, 4096, 0, 4),
        (512, 512, 0, 1),
        (512, 512, 1, 1),  # a small reference: at least 1
        (256, 256, 3, 3),
        (4096, 4096, 1, 4),
        (1, 1, 0, 1),
        (0, 0, 0, 0),
    ],
)
def test_billable_megapixels(width: int, height: int, minimum: int, expected: int) -> None:
    assert billable_megapixels(Size(width, height), minimum=minimum) == expected


@pytest.mark.parametrize(
    ("rate", "outputs", "references", "expected"),
    [
        # fal flux.2-dev, one 1 MP image: $0.012
        (FAL_DEV, [Size(1024, 1024)], [], Usage(1, 0, 1, 0.012)),
        # 1920x1080 bills as 2 MP
        (FAL_DEV, [Size(1920, 1080)], [], Usage(1, 0, 2, 0.024)),
        # flash edit: two 1 MP references and a 1 MP output = 3 x $0.005
        (FAL_FLASH, [Size(1024, 1024)], [Size(1024, 1024), Size(1024, 1024)], Usage(1, 2, 1, 0.015)),
        # four small references cost 4 MP
        (FAL_FLASH, [Size(512, 512)], [Size(64, 64)] * 4, Usage(1, 4, 1, 0.025)),
        # a 16 MP reference is resized to 4 MP first
        (FAL_DEV, [Size(1024, 1024)], [Size(4096, 4096)], Usage(1, 4, 1, 0.06)),
        # n=4 at 2K: 4 images of 4 MP
        (FAL_DEV, [Size(2048, 2048)] * 4, [], Usage(4, 0, 16, 0.192)),
        # Replicate: output only (its input price is an assumption of 0)
        (REPLICATE_DEV, [Size(1024, 1024)], [Size(1024, 1024)], Usage(1, 1, 1, 0.012)),
        # local is free; the megapixels are still counted
        (LOCAL_DEV, [Size(1920, 1080)], [Size(100, 100)], Usage(1, 1, 2, 0.0)),
        # no noise from binary floats: 7 x 0.1 is 0.7
        (Rate(0.1, 0.1), [Size(1024, 1024)] * 7, [], Usage(7, 0, 7, 0.7)),
        # rounded to 6 decimals
        (Rate(0.0000001, 0.0), [Size(1024, 1024)] * 6, [], Usage(6, 0, 6, 0.000001)),
    ],
)
def test_price(rate: Rate, outputs: list[Size], references: list[Size], expected: Usage) -> None:
    assert price(rate, outputs, references) == expected


def test_every_hosted_provider_lists_a_price_and_local_is_free() -> None:
    for spec in MODELS.values():
        for name in spec.providers:
            rate = PROVIDERS[name].capabilities(spec.id).rate
            if name == "local":
                assert rate == Rate(0.0, 0.0)
            else:
                assert rate.output_per_mp > 0, (name, spec.id)
            # The stats CLI reads the same list price without running the providers.
            assert listed_rate(Settings(data_dir="unused"), name, spec.id) == rate


def test_configuration_wins_over_the_list_price() -> None:
    default = Settings(data_dir="unused")
    assert rate_for("fal", "flux.2-dev", default, FAL_DEV) == Rate(0.012, 0.012)
    assert rate_for("fal", "flux.2-dev-flash", default, FAL_FLASH) == Rate(0.005, 0.005)
    assert rate_for("local", "flux.2-dev", default, LOCAL_DEV) == Rate(0.0, 0.0)

    configured = Settings(data_dir="unused", prices={"local/flux.2-dev": 0.002, "FAL/flux.2-dev": 0.02})
    assert rate_for("local", "flux.2-dev", configured, LOCAL_DEV) == Rate(0.002, 0.002)
    assert rate_for("fal", "flux.2-dev", configured, FAL_DEV) == Rate(0.02, 0.02)
    assert rate_for("fal", "flux.2-dev-flash", configured, FAL_FLASH) == Rate(0.005, 0.005)
    local = rate_for("local", "flux.2-dev", configured, LOCAL_DEV)
    assert price(local, [Size(1920, 1080)], []).cost_usd == 0.004


def test_prices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXPORT_PRICES", '{"local/flux.2-dev": 0.002}')
    assert Settings().prices == {"local/flux.2-dev": 0.002}
    for bad in ('{"local": 0.002}', '{"local/flux.2-dev": -1}', '{"local/flux.2-dev": "free"}'):
        monkeypatch.setenv("FLUXPORT_PRICES", bad)
        with pytest.raises(ValidationError):
            Settings()


def test_usage_parses_with_the_strict_openai_sdk_model() -> None:
    wire = price(FAL_FLASH, [Size(1024, 1024)], [Size(1024, 1024)] * 2).to_wire()
    # model_validate is what the SDK runs with _strict_response_validation=True.
    response = ImagesResponse.model_validate({"created": 1, "data": [], "usage": wire})
    assert response.usage is not None and response.usage.total_tokens == 0
    assert response.usage.input_tokens_details.image_tokens == 0
    extra = response.usage.model_extra or {}
    assert extra == {"images": 1, "input_megapixels": 2, "output_megapixels": 1, "cost_usd": 0.015}


sizes = st.builds(Size, st.integers(0, 8192), st.integers(0, 8192))
rates = st.builds(
    Rate,
    st.floats(0, 1, allow_nan=False, allow_infinity=False),
    st.floats(0, 1, allow_nan=False, allow_infinity=False),
)


@given(rates, sizes, sizes, st.lists(sizes, max_size=4))
def test_cost_is_monotone_in_output_size(rate: Rate, a: Size, b: Size, refs: list[Size]) -> None:
    small, big = (
        Size(min(a.width, b.width), min(a.height, b.height)),
        Size(max(a.width, b.width), max(a.height, b.height)),
    )
    assert price(rate, [small], refs).cost_usd <= price(rate, [big], refs).cost_usd


@given(rates, sizes, sizes, st.lists(sizes, max_size=4))
def test_cost_is_monotone_in_reference_size(rate: Rate, a: Size, b: Size, outputs: list[Size]) -> None:
    small, big = sorted([a, b], key=lambda s: s.pixels)
    assert price(rate, outputs, [small]).cost_usd <= price(rate, outputs, [big]).cost_usd


@given(rates, st.lists(sizes, max_size=10), st.lists(sizes, max_size=4))
def test_never_negative_and_bounded(rate: Rate, outputs: list[Size], refs: list[Size]) -> None:
    usage = price(rate, outputs, refs)
    assert usage.cost_usd >= 0
    assert 0 <= usage.output_megapixels <= 4 * len(outputs)
    assert len(refs) <= usage.input_megapixels <= 4 * len(refs)
    exact = rate.output_per_mp * usage.output_megapixels + rate.input_per_mp * usage.input_megapixels
    assert usage.cost_usd == pytest.approx(exact, abs=1e-6)


@given(rates, st.lists(sizes, max_size=4), st.lists(sizes, max_size=3), sizes)
def test_each_reference_adds_at_least_one_megapixel(
    rate: Rate, outputs: list[Size], refs: list[Size], extra: Size
) -> None:
    before = price(rate, outputs, refs)
    after = price(rate, outputs, [*refs, extra])
    assert after.input_megapixels - before.input_megapixels >= 1
    assert after.cost_usd - before.cost_usd >= rate.input_per_mp - 1e-6
