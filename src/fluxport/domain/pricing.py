"""Megapixel billing rules → cost (pure functions; each provider lists its rates in its Capabilities).

The rules, as fal and Lumenfall bill FLUX.2: 1 MP = 1024 × 1024 px; each image is rounded up to
the next whole megapixel; each reference image is billed separately at 1 MP or more; images over
4 MP are resized to 4 MP first, so they count as 4.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fluxport.domain.job import Size

if TYPE_CHECKING:
    from fluxport.settings import Settings

MEGAPIXEL = 1024 * 1024
MAX_BILLED_MEGAPIXELS = 4  # larger images are resized to 4 MP before they are billed
COST_DECIMALS = 6


def billable_megapixels(size: Size, *, minimum: int = 0) -> int:
    """Whole megapixels billed for one image: rounded up, at least `minimum`, at most 4."""
    whole = -(-size.pixels // MEGAPIXEL)  # ceil in integers: no float error at exact multiples
    return min(max(whole, minimum), MAX_BILLED_MEGAPIXELS)


@dataclass(frozen=True)
class Rate:
    """US dollars per billed megapixel, for generated images and for reference images."""

    output_per_mp: float
    input_per_mp: float

    @classmethod
    def free(cls) -> Rate:
        return cls(0.0, 0.0)


@dataclass(frozen=True)
class Usage:
    """What one request cost; `to_wire` is the `usage` object of the response."""

    images: int
    input_megapixels: int
    output_megapixels: int
    cost_usd: float

    def to_wire(self) -> dict[str, Any]:
        # OpenAI's Usage requires the token fields (the SDK parses `usage` strictly when asked to);
        # FLUX is billed by the megapixel, so they are zero and the megapixel fields ride along.
        return {
            "images": self.images,
            "input_megapixels": self.input_megapixels,
            "output_megapixels": self.output_megapixels,
            "cost_usd": self.cost_usd,
            "input_tokens": 0,
            "output_tokens": 0,
            "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        }


def price(rate: Rate, outputs: Sequence[Size], references: Sequence[Size] = ()) -> Usage:
    """The cost of generating `outputs` from `references` at `rate`, rounded to 6 decimals."""
    out_mp = sum(billable_megapixels(s) for s in outputs)
    in_mp = sum(billable_megapixels(s, minimum=1) for s in references)
    # Decimal from the rate's shortest repr: 3 × 0.005 is 0.015, not 0.015000000000000001.
    cost = Decimal(repr(rate.output_per_mp)) * out_mp + Decimal(repr(rate.input_per_mp)) * in_mp
    return Usage(
        images=len(outputs),
        input_megapixels=in_mp,
        output_megapixels=out_mp,
        cost_usd=float(round(cost, COST_DECIMALS)),
    )


def price_key(provider: str, model: str) -> str:
    """The key of a rate in `Settings.prices`, e.g. "fal/flux.2-dev"."""
    return f"{provider}/{model}".lower()


@functools.cache
def _lowered(prices: tuple[tuple[str, float], ...]) -> dict[str, float]:
    return {key.lower(): value for key, value in prices}


def rate_for(provider: str, model: str, settings: Settings, listed: Rate) -> Rate:
    """The rate for `model` on `provider`: configuration (FLUXPORT_PRICES) first, else the
    provider's `listed` rate (its Capabilities)."""
    override = _lowered(tuple(settings.prices.items())).get(price_key(provider, model))
    if override is not None:
        return Rate(output_per_mp=override, input_per_mp=override)
    return listed
