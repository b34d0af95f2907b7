"""Models, their providers, size tables and limits: data, not logic. The seeds' numbers live here."""

from __future__ import annotations

from dataclasses import dataclass, field

# The 1K size of each supported aspect ratio (the seeds' table); other tiers scale these shapes.
FLUX2_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1183, 887),
    "3:4": (887, 1182),
    "5:4": (1145, 916),
    "4:5": (916, 1145),
    "3:2": (1254, 836),
    "2:3": (836, 1254),
    "16:9": (1365, 768),
    "9:16": (768, 1365),
}

# Resolution tiers by name -> megapixels (1 MP = 1024 x 1024 px).
TIER_MEGAPIXELS: dict[str, float] = {"0.5K": 0.25, "1K": 1.0, "2K": 4.0, "4K": 16.0}


@dataclass(frozen=True)
class SizeLimits:
    """What the model can generate; anything beyond is scaled into these limits."""

    max_pixels: int = 2048 * 2048  # 4 MP
    min_side: int = 256
    max_aspect: float = 8.0
    multiple: int = 16  # the latent grid: the model generates at multiples of this


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    summary: str
    providers: tuple[str, ...]
    ratios: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(FLUX2_RATIOS))
    tiers: tuple[str, ...] = ("0.5K", "1K", "2K")
    limits: SizeLimits = field(default_factory=SizeLimits)
    max_references: int = 4
    noise: bool = False  # output is random noise (the offline test model)
    owned_by: str = "black-forest-labs"
    created: int = 1764028800  # 2025-11-25, FLUX.2 release
    strengths: tuple[str, ...] = ()
    limitations: tuple[str, ...] = ()
    best_for: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other names clients use, e.g. the Hub repo id


NOISE_NOTE = (
    "flux.2-dummy has random weights: its output is noise. It exists to try and test fluxport offline."
)

MODELS: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec(
            id="flux.2-dev",
            name="FLUX.2 [dev]",
            summary="Black Forest Labs' 32B open-weight text-to-image and multi-reference editing model.",
            providers=("local", "fal", "replicate"),
            strengths=(
                "Photorealism and fine detail",
                "Accurate text rendering",
                "Editing with up to four reference images",
            ),
            limitations=("Slow: about 28-50 denoising steps", "Non-commercial FLUX [dev] licence"),
            best_for=("High-quality images", "Multi-reference edits and product shots"),
            aliases=("black-forest-labs/FLUX.2-dev", "fal-ai/flux-2", "black-forest-labs/flux-2-dev"),
        ),
        ModelSpec(
            id="flux.2-dev-flash",
            name="FLUX.2 [dev] Flash",
            summary="fal's distilled FLUX.2 [dev]: a few steps, much faster and cheaper.",
            providers=("local", "fal"),
            owned_by="fal",
            created=1765152000,
            strengths=("Fast: a few denoising steps", "Lowest price per megapixel"),
            limitations=("Slightly less detail than the full schedule", "No step or acceleration control"),
            best_for=("Interactive use and drafts", "High-volume generation"),
            aliases=("fal-ai/flux-2/flash", "fal/flux.2-dev-flash"),
        ),
        ModelSpec(
            id="flux.2-dummy",
            name="FLUX.2 dummy (noise)",
            summary="The FLUX.2 architecture at tiny size with random weights, built in code: its output "
            "is noise. It exists to try and test fluxport offline.",
            providers=("local",),
            noise=True,
            owned_by="fluxport",
            strengths=("Runs anywhere in seconds, no GPU, no download",),
            limitations=("Output is noise",),
            best_for=("Trying fluxport offline", "Tests and CI"),
            aliases=("fluxport/flux.2-dummy",),
        ),
    )
}


_LOOKUP = {name.lower(): spec for spec in MODELS.values() for name in (spec.id, *spec.aliases)}


def find_model(model_id: str) -> ModelSpec | None:
    """A model by id or alias, case-insensitively."""
    return _LOOKUP.get(model_id.strip().lower())
