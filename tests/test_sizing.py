"""Table tests of size / aspect_ratio / resolution -> delivered size (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxport.catalog import FLUX2_RATIOS, MODELS
from fluxport.domain.errors import InvalidRequest
from fluxport.domain.job import Size
from fluxport.domain.sizing import decide_size, fit_limits, generation_grid

SPEC = MODELS["flux.2-dev"]
LIMITS = SPEC.limits


def decide(
    size: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    reference: Size | None = None,
) -> Size:
    return decide_size(
        SPEC, size=size, aspect_ratio=aspect_ratio, resolution=resolution, reference=reference
    ).size


# The seeds' table: every supported ratio at 1K, exactly.
@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        ("1:1", Size(1024, 1024)),
        ("4:3", Size(1183, 887)),
        ("3:4", Size(887, 1182)),
        ("5:4", Size(1145, 916)),
        ("4:5", Size(916, 1145)),
        ("3:2", Size(1254, 836)),
        ("2:3", Size(836, 1254)),
        ("16:9", Size(1365, 768)),
        ("9:16", Size(768, 1365)),
    ],
)
def test_all_nine_1k_sizes(ratio: str, expected: Size) -> None:
    assert decide(aspect_ratio=ratio) == expected
    assert decide(size=ratio) == expected  # W:H in size is the same as aspect_ratio
    assert decide(aspect_ratio=ratio, resolution="1K") == expected


@pytest.mark.parametrize(
    ("ratio", "nearest"),
    [
        ("21:9", "16:9"),
        ("1.85:1", "16:9"),
        ("7:5", "4:3"),
        ("1.45:1", "3:2"),
        ("1:1.1", "1:1"),
        ("1:1.2", "4:5"),
        ("100:1", "16:9"),
        ("1:3", "9:16"),
        ("6:5", "5:4"),
    ],
)
def test_any_ratio_maps_to_the_nearest_supported(ratio: str, nearest: str) -> None:
    assert decide(aspect_ratio=ratio) == Size(*FLUX2_RATIOS[nearest])


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [
        ("0.5K", Size(512, 512)),
        ("1K", Size(1024, 1024)),
        ("2K", Size(2048, 2048)),
        ("4K", Size(2048, 2048)),  # FLUX.2 tops out at 2K
        ("0.25", Size(512, 512)),
        ("1", Size(1024, 1024)),
        ("4", Size(2048, 2048)),
        ("3MP", Size(2048, 2048)),
        ("0.3", Size(512, 512)),
        ("2", Size(1024, 1024)),  # equidistant in log scale: the smaller tier
        ("1k", Size(1024, 1024)),
    ],
)
def test_tier_without_ratio_is_square(resolution: str, expected: Size) -> None:
    assert decide(resolution=resolution) == expected


def test_other_tiers_scale_the_same_shapes_within_4mp() -> None:
    for ratio, (w, h) in FLUX2_RATIOS.items():
        half = decide(aspect_ratio=ratio, resolution="0.5K")
        double = decide(aspect_ratio=ratio, resolution="2K")
        assert abs(half.width - w / 2) <= 1 and abs(half.height - h / 2) <= 1, ratio
        assert abs(double.width - w * 2) <= 2 and abs(double.height - h * 2) <= 2, ratio
        assert double.pixels <= 4 * 1024 * 1024, ratio


def test_size_wins_over_aspect_ratio_and_resolution() -> None:
    assert decide(size="800x600", aspect_ratio="9:16", resolution="2K") == Size(800, 600)
    # W:H in size combines with resolution, but beats aspect_ratio.
    assert decide(size="16:9", aspect_ratio="1:1", resolution="2K") == Size(2730, 1536)


def test_defaults_and_auto() -> None:
    assert decide() == Size(1024, 1024)
    assert decide(size="auto") == Size(1024, 1024)
    # Edits: auto is the first reference's shape at 1K; a tier keeps the shape.
    ref = Size(3000, 2000)
    auto = decide(size="auto", reference=ref)
    assert abs(auto.width / auto.height - 1.5) < 0.01 and abs(auto.pixels - 1024 * 1024) < 4000
    big = decide(resolution="2K", reference=ref)
    assert abs(big.width / big.height - 1.5) < 0.01 and big.pixels <= 4 * 1024 * 1024
    # An explicit ratio still wins over the reference's shape.
    assert decide(aspect_ratio="9:16", reference=ref) == Size(768, 1365)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x768", Size(1024, 768)),
        ("1000x1000", Size(1000, 1000)),  # exact even off the 16-px grid
        ("1183X887", Size(1183, 887)),
        ("2048x2048", Size(2048, 2048)),  # exactly at the 4 MP limit
        ("4096x4096", Size(2048, 2048)),  # scaled into 4 MP
        ("14142x14142", Size(2048, 2048)),
        ("4000x3000", Size(2364, 1773)),
        ("100x100", Size(256, 256)),  # scaled up to the minimum side
        ("1x1", Size(256, 256)),
        ("300x200", Size(384, 256)),
        ("1x14142", Size(256, 2048)),  # the aspect ratio is capped at 8:1 first
    ],
)
def test_custom_sizes_exact_or_clamped(size: str, expected: Size) -> None:
    assert decide(size=size) == expected


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "0x100"}, "size"),
        ({"size": "14143x10"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "10x"}, "size"),
        ({"size": "-5x10"}, "size"),
        ({"aspect_ratio": "16/9"}, "aspect_ratio"),
        ({"aspect_ratio": "0:1"}, "aspect_ratio"),
        ({"size": "1:0"}, "size"),
        ({"resolution": "8KK"}, "resolution"),
        ({"resolution": "0"}, "resolution"),
        ({"resolution": "1024"}, "resolution"),
    ],
)
def test_bad_sizes_name_their_parameter(kwargs: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decide(**kwargs)
    assert info.value.param == param


@given(st.integers(1, 14142), st.integers(1, 14142))
def test_any_custom_size_is_delivered_within_limits(w: int, h: int) -> None:
    out = decide(size=f"{w}x{h}")
    assert out.pixels <= LIMITS.max_pixels
    assert min(out.width, out.height) >= LIMITS.min_side
    assert max(out.width / out.height, out.height / out.width) <= LIMITS.max_aspect + 0.05
    inside = (
        w * h <= LIMITS.max_pixels and min(w, h) >= LIMITS.min_side and max(w / h, h / w) <= LIMITS.max_aspect
    )
    if inside:
        assert out == Size(w, h)


@given(st.integers(LIMITS.min_side, 2048), st.integers(LIMITS.min_side, 2048))
def test_generation_grid_is_near_and_on_the_grid(w: int, h: int) -> None:
    size = fit_limits(Size(w, h), LIMITS)
    grid = generation_grid(size, LIMITS)
    assert grid.width % 16 == 0 and grid.height % 16 == 0
    assert abs(grid.width - size.width) <= 16 and abs(grid.height - size.height) <= 16
    assert grid.pixels <= LIMITS.max_pixels
