"""size / aspect_ratio / resolution -> the exact size delivered (pure functions, table-tested).

Rules (issue #2): `size` wins over both others; `W:H` in `size` is an aspect ratio; any ratio maps to
the nearest supported ratio and any tier to the nearest supported tier (by log distance, ties to the
smaller); a ratio without a tier means 1K; a tier without a ratio means 1:1, or for edits the first
reference's shape; custom `WxH` is delivered exactly when within the model's limits, else scaled
into them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fluxport.catalog import TIER_MEGAPIXELS, ModelSpec, SizeLimits
from fluxport.domain.errors import InvalidRequest
from fluxport.domain.job import Size

MAX_CUSTOM_SIDE = 14142
_MP = 1024 * 1024
# re.ASCII: \d would otherwise match any Unicode digit ("١٠٢٤"), which int() and float() accept.
_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$", re.ASCII)
_RATIO = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,12})?)\s*:\s*(\d{1,12}(?:\.\d{1,12})?)\s*$", re.ASCII)
_TIER = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,12})?)\s*([kK]|[mM][pP])?\s*$", re.ASCII)


@dataclass(frozen=True)
class SizeDecision:
    size: Size  # what the client receives
    source: str  # "size", "aspect_ratio", "resolution", "default", "reference"
    ratio: str | None = None  # the supported ratio used, if any
    tier: str | None = None  # the supported tier used, if any
    requested: Size | None = None  # a custom WxH as asked, before fitting
    adjusted: bool = False  # the request was snapped to a supported ratio/tier or scaled into limits


def parse_custom_size(text: str) -> Size | None:
    """`WxH` -> Size (1..14142 per side); None when `text` is not of that form."""
    m = _WXH.match(text)
    if not m:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    for side in (w, h):
        if not 1 <= side <= MAX_CUSTOM_SIDE:
            raise InvalidRequest(
                f"Invalid size '{text}': each side must be between 1 and {MAX_CUSTOM_SIDE} px.", param="size"
            )
    return Size(w, h)


def parse_ratio(text: str, param: str) -> float:
    """`W:H` -> W / H."""
    m = _RATIO.match(text)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise InvalidRequest(
            f"Invalid {param} '{text}': expected W:H with positive numbers, e.g. 16:9.", param=param
        )
    ratio = float(m.group(1)) / float(m.group(2))
    if not 1 / 100 <= ratio <= 100:
        raise InvalidRequest(
            f"Invalid {param} '{text}': the ratio must be within 1:100 and 100:1.", param=param
        )
    return ratio


def parse_tier(text: str) -> float:
    """`0.5K`/`1K`/`2K`/`4K` or a megapixel count (`0.25`, `1`, `4MP`) -> megapixels."""
    m = _TIER.match(text)
    if m:
        value, unit = float(m.group(1)), (m.group(2) or "").upper()
        megapixels = value * value if unit == "K" else value
        if 0 < megapixels <= 64:
            return megapixels
    raise InvalidRequest(
        f"Invalid resolution '{text}': use 0.5K, 1K, 2K or 4K, or megapixels such as 0.25 or 1.",
        param="resolution",
    )


def nearest_ratio(ratio: float, spec: ModelSpec) -> str:
    def distance(key: str) -> float:
        w, h = spec.ratios[key]
        return abs(math.log(ratio) - math.log(w / h))

    return min(spec.ratios, key=distance)


def nearest_tier(megapixels: float, spec: ModelSpec) -> str:
    # Sorted smallest first so that ties go to the smaller (cheaper) tier.
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t])
    return min(tiers, key=lambda t: abs(math.log(megapixels) - math.log(TIER_MEGAPIXELS[t])))


def tier_size(ratio_key: str, tier: str, spec: ModelSpec) -> Size:
    """A supported ratio at a supported tier: the 1K table shape scaled to the tier's megapixels."""
    w, h = spec.ratios[ratio_key]
    scale = math.sqrt(TIER_MEGAPIXELS[tier])
    return fit_limits(Size(round(w * scale), round(h * scale)), spec.limits)


def shape_at_tier(aspect: float, tier: str, spec: ModelSpec) -> Size:
    """An arbitrary aspect ratio (e.g. a reference image's) at a tier's megapixels."""
    pixels = TIER_MEGAPIXELS[tier] * _MP
    w = math.sqrt(pixels * aspect)
    return fit_limits(Size(max(1, round(w)), max(1, round(w / aspect))), spec.limits)


def fit_limits(size: Size, limits: SizeLimits) -> Size:
    """Scale `size` into the model's limits: aspect ratio, then pixel count, then minimum side."""
    w, h = float(size.width), float(size.height)
    if w / h > limits.max_aspect:
        w = h * limits.max_aspect
    elif h / w > limits.max_aspect:
        h = w * limits.max_aspect
    if w * h > limits.max_pixels:
        scale = math.sqrt(limits.max_pixels / (w * h))
        w, h = w * scale, h * scale
    if min(w, h) < limits.min_side:
        scale = limits.min_side / min(w, h)
        w, h = w * scale, h * scale
    # Floor keeps us under the pixel cap; the max() makes the minimum side exact despite float error.
    return Size(max(limits.min_side, math.floor(w + 1e-6)), max(limits.min_side, math.floor(h + 1e-6)))


def decide_size(
    spec: ModelSpec,
    *,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    reference: Size | None = None,
) -> SizeDecision:
    """Decide the delivered size; `reference` is the first reference image's size for edits.

    Every field that was sent is validated first, then the precedence applies: an invalid
    aspect_ratio is a 400 even when size wins over it, and an empty string is no value."""
    for param, value in (("size", size), ("aspect_ratio", aspect_ratio), ("resolution", resolution)):
        if value is not None and not value.strip():
            raise InvalidRequest(f"Invalid {param} '': leave it out, or give a value.", param=param)
    if aspect_ratio is not None:
        parse_ratio(aspect_ratio, "aspect_ratio")
    if resolution is not None:
        parse_tier(resolution)
    text = (size or "").strip()
    if text.lower() == "auto":
        text = ""
    if text and (custom := parse_custom_size(text)) is not None:
        fitted = fit_limits(custom, spec.limits)
        return SizeDecision(fitted, "size", requested=custom, adjusted=fitted != custom)
    ratio_text, ratio_param = (text, "size") if text else (aspect_ratio, "aspect_ratio")
    if text and not _RATIO.match(text):
        raise InvalidRequest(
            f"Invalid size '{size}': expected WxH (e.g. 1024x768), W:H (e.g. 16:9) or auto.", param="size"
        )
    tier = None
    tier_adjusted = False
    if resolution is not None:
        megapixels = parse_tier(resolution)
        tier = nearest_tier(megapixels, spec)
        tier_adjusted = not math.isclose(TIER_MEGAPIXELS[tier], megapixels)
    if ratio_text:
        ratio = parse_ratio(ratio_text, ratio_param)
        key = nearest_ratio(ratio, spec)
        w, h = spec.ratios[key]
        adjusted = tier_adjusted or not math.isclose(ratio, w / h, rel_tol=0.01)
        return SizeDecision(
            tier_size(key, tier or "1K", spec), ratio_param, ratio=key, tier=tier or "1K", adjusted=adjusted
        )
    if reference is not None:
        chosen = tier or "1K"
        return SizeDecision(
            shape_at_tier(reference.width / reference.height, chosen, spec),
            "reference",
            tier=chosen,
            adjusted=tier_adjusted,
        )
    if tier is not None:
        return SizeDecision(
            tier_size("1:1", tier, spec), "resolution", ratio="1:1", tier=tier, adjusted=tier_adjusted
        )
    return SizeDecision(tier_size("1:1", "1K", spec), "default", ratio="1:1", tier="1K")


@dataclass(frozen=True)
class Preset:
    """A named size a provider offers, e.g. Replicate's aspect_ratio "16:9" (about 1 MP)."""

    name: str
    ratio: float  # width / height
    size: Size  # what the provider generates for it


@dataclass(frozen=True)
class SizePolicy:
    """The size a provider generates for a delivered size: each side within [min_side, max_side]
    on a `multiple` grid and under `max_pixels`, or one of its presets. Each provider declares one
    (its Capabilities); the gateway prices, ranks and bills that size, and the adapter sends it."""

    multiple: int = 16
    min_side: int = 16
    max_side: int | None = None
    max_pixels: int | None = None
    presets: tuple[Preset, ...] = ()
    preset_pixels: tuple[int, int] = (0, 0)  # a preset serves only sizes with this many pixels

    @classmethod
    def grid(cls, limits: SizeLimits) -> SizePolicy:
        """A model's own latent grid within its pixel cap (an in-process pipeline)."""
        return cls(multiple=limits.multiple, min_side=limits.multiple, max_pixels=limits.max_pixels)

    def preset_for(self, size: Size) -> Preset | None:
        """The preset that makes about `size`, if any."""
        low, high = self.preset_pixels
        if low <= size.pixels <= high:
            for preset in self.presets:
                if math.isclose(size.width / size.height, preset.ratio, rel_tol=0.01):
                    return preset
        return None

    def generated(self, size: Size) -> Size:
        """The size this provider generates for `size` (the service resamples it to `size`)."""
        preset = self.preset_for(size)
        if preset is not None:
            return preset.size
        return self.fit(size)

    def fit(self, size: Size) -> Size:
        """`size` scaled into the side bounds keeping its shape, snapped to the grid, under the cap."""
        m, low = self.multiple, self.min_side
        high = self.max_side
        w, h = size.width, size.height
        scale = 1.0
        if high is not None and max(w, h) > high:
            scale = high / max(w, h)
        if min(w, h) * scale < low:
            # Extreme ratios cannot fit both bounds; the short side wins and the long side is clamped.
            scale = low / min(w, h)

        def snap(v: int) -> int:
            # Half up, not Python's half-to-even: 1000 px on a 16 px grid is 1008, not 992.
            snapped = max(low, math.floor(v * scale / m + 0.5) * m)
            return min(high, snapped) if high is not None else snapped

        gw, gh = snap(w), snap(h)
        if self.max_pixels is not None and gw * gh > self.max_pixels:
            # Rounding both sides up can overshoot the cap by a row.
            if gw >= gh:
                gw = max(low, gw - m)
            else:
                gh = max(low, gh - m)
        return Size(gw, gh)


def generation_grid(size: Size, limits: SizeLimits) -> Size:
    """The nearest size on the model's latent grid within its pixel cap (the service resamples the rest)."""
    return SizePolicy.grid(limits).generated(size)
