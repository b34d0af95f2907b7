"""The catalog (every model, its providers and prices) and one page per model (sizes, stats, examples)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from fluxport.catalog import MODELS, TIER_MEGAPIXELS, ModelSpec, find_model
from fluxport.domain.job import Size
from fluxport.domain.sizing import tier_size
from fluxport.gateway.service import ImageService
from fluxport.gateway.stats import DEFAULT_WINDOW, provider_stats
from fluxport.providers.registry import model_providers
from fluxport.web.render import image_service, render_page

log = logging.getLogger("fluxport.web")

router = APIRouter(include_in_schema=False)

# -- page data (one place; the templates only lay it out) ------------------------------------------

# Parameter reference: name, accepted values, in text-to-image, in edits, notes.
PARAMETERS: tuple[tuple[str, str, bool, bool, str], ...] = (
    ("prompt", "1-32000 characters", True, True, "Required."),
    ("model", "model id or alias", True, True, "Defaults to the server's default model."),
    ("image", "1-4 files: PNG, JPEG, WebP", False, True, "Reference images; makes the request an edit."),
    ("n", "1-10", True, True, "Batched where the provider can, else parallel calls."),
    ("size", "WxH, W:H or auto", True, True, "Wins over aspect_ratio and resolution."),
    ("aspect_ratio", "any W:H", True, True, "Mapped to the nearest supported ratio."),
    ("resolution", "0.5K, 1K, 2K, 4K or megapixels", True, True, "Mapped to the nearest supported tier."),
    ("seed", "0 ... 2^63-1", True, True, "Image i uses seed + i; each image's seed comes back."),
    ("cfg_scale", "0-20", True, True, "Guidance scale."),
    ("prompt_enhancement", "off, on", True, True, "The rewritten prompt comes back as revised_prompt."),
    ("response_format", "url, b64_json", True, True, ""),
    ("output_format", "png, jpeg, gif, webp, avif", True, True, "Converted when a provider cannot."),
    ("output_compression", "0-100", True, True, "Quality for jpeg, webp, avif."),
)

PRICING_NOTES: tuple[str, ...] = (
    "FLUX.2 is billed per megapixel (1 MP = 1024 × 1024 px); each image is rounded up to the next "
    "whole megapixel, so 1920 × 1080 counts as 2 MP.",
    "Each reference image of an edit is billed separately, as input, at 1 MP or more.",
    "Images over 4 MP are resized to 4 MP before billing, so they count as 4 MP.",
    "Your own GPU (local) costs nothing here unless configured. Any price can be set with "
    "FLUXPORT_PRICES, e.g. '{\"replicate/flux.2-dev\": 0.012}'; Replicate's flux-2-dev price is unconfirmed.",
)


@dataclass
class ProviderRow:
    """One provider of a model, with its state, live stats and price (None: no data yet)."""

    name: str
    configured: bool
    detail: str
    requests: int = 0
    success_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    ttfb_p50_ms: float | None = None
    price_per_mp_usd: float | None = None
    input_price_per_mp_usd: float | None = None


def _base_url(request: Request, service: ImageService) -> str:
    return (service.settings.public_url or str(request.base_url)).rstrip("/")


async def provider_rows(service: ImageService, spec: ModelSpec) -> list[ProviderRow]:
    """State, live stats and price of each provider of `spec`; a failing source leaves its columns empty."""
    rows = [
        ProviderRow(name, state.configured, state.detail) for name, state in service.provider_states(spec)
    ]
    by_name = {r.name: r for r in rows}
    for row in rows:
        try:
            rate = service.rate(row.name, spec.id)
        except Exception:  # a page must render even when pricing is misconfigured
            log.exception("no price for %s/%s", row.name, spec.id)
            continue
        row.price_per_mp_usd, row.input_price_per_mp_usd = rate.output_per_mp, rate.input_per_mp
    try:
        stats = await provider_stats(service.db, spec.id, providers=list(by_name))
    except Exception:
        log.exception("no stats for %s", spec.id)
        return rows
    for s in stats:
        found = by_name.get(s.provider)
        if found is None:  # a provider with history that no longer serves the model
            continue
        row = found
        row.requests, row.success_rate = s.requests, s.success_rate
        row.p50_ms, row.p95_ms, row.ttfb_p50_ms = s.p50_ms, s.p95_ms, s.ttfb_p50_ms
    return rows


def _price_from(rows: list[ProviderRow]) -> dict[str, Any]:
    paid = [r for r in rows if r.price_per_mp_usd]
    cheapest = min(paid, key=lambda r: r.price_per_mp_usd or 0.0) if paid else None
    return {
        "paid": cheapest.price_per_mp_usd if cheapest else None,
        "paid_provider": cheapest.name if cheapest else None,
        "free": [r.name for r in rows if r.price_per_mp_usd == 0],
    }


def _size_table(spec: ModelSpec) -> list[tuple[str, list[Size]]]:
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t])
    return [(ratio, [tier_size(ratio, t, spec) for t in tiers]) for ratio in spec.ratios]


def _examples(base: str, model: str, noise: bool) -> dict[str, str]:
    prompt = "a lighthouse at dusk, 35mm photo"
    size = "512x512" if noise else "1365x768"
    python = f'''from openai import OpenAI

client = OpenAI(base_url="{base}/v1", api_key="YOUR_KEY")
result = client.images.generate(
    model="{model}",
    prompt="{prompt}",
    size="{size}",
    extra_body={{"seed": 42}},
)
print(result.data[0].url)

edited = client.images.edit(
    model="{model}",
    image=[open("reference.png", "rb")],
    prompt="make it winter",
)'''
    javascript = f'''import OpenAI from "openai";
import fs from "node:fs";

const client = new OpenAI({{ baseURL: "{base}/v1", apiKey: "YOUR_KEY" }});
const result = await client.images.generate({{
  model: "{model}",
  prompt: "{prompt}",
  size: "{size}",
  seed: 42, // a fluxport extra: sent as is
}});
console.log(result.data[0].url);

const edited = await client.images.edit({{
  model: "{model}",
  image: [fs.createReadStream("reference.png")],
  prompt: "make it winter",
}});'''
    curl = f"""curl {base}/v1/images/generations \\
  -H 'content-type: application/json' \\
  -H 'authorization: Bearer YOUR_KEY' \\
  -d '{{"model": "{model}", "prompt": "{prompt}", "aspect_ratio": "4:3", "seed": 42}}'

curl {base}/v1/images/edits \\
  -H 'authorization: Bearer YOUR_KEY' \\
  -F model={model} -F prompt='make it winter' -F image=@reference.png"""
    return {"curl": curl, "python": python, "javascript": javascript}


# -- pages -------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def catalog(request: Request) -> HTMLResponse:
    service = image_service(request)
    cards = []
    for spec in MODELS.values():
        rows = await provider_rows(service, spec)
        cards.append({"spec": spec, "rows": rows, "price": _price_from(rows)})
    return render_page(request, "catalog.html", cards=cards, title="Models")


@router.get("/models/{model_id:path}", response_class=HTMLResponse)
async def model_page(model_id: str, request: Request) -> Response:
    service = image_service(request)
    spec = find_model(model_id)
    if spec is None:
        return render_page(
            request,
            "error.html",
            status=404,
            title="No such model",
            message=f"The model '{model_id}' does not exist. Available models: {', '.join(MODELS)}.",
        )
    rows = await provider_rows(service, spec)
    base = _base_url(request, service)
    # How each parameter reaches each provider, as the providers declare it (their Capabilities).
    providers = service.providers
    normalization = [
        (name, providers[name].capabilities(spec.id).normalization if name in providers else {})
        for name in model_providers(spec, providers)
    ]
    tiers = sorted(spec.tiers, key=lambda t: TIER_MEGAPIXELS[t])
    return render_page(
        request,
        "model.html",
        title=spec.name,
        spec=spec,
        rows=rows,
        ranked=sorted((r for r in rows if r.requests), key=lambda r: r.p50_ms or math.inf),
        window_days=round(DEFAULT_WINDOW.total_seconds() / 86400),
        price=_price_from(rows),
        pricing_notes=PRICING_NOTES,
        parameters=PARAMETERS,
        max_references=spec.max_references,
        tiers=tiers,
        tier_mp=TIER_MEGAPIXELS,
        sizes=_size_table(spec),
        normalization=normalization,
        norm_params=list(dict.fromkeys(param for _, table in normalization for param in table)),
        examples=_examples(base, spec.id, spec.noise),
        base_url=base,
    )
