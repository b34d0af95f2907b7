"""/v1/models: each model with its providers and whether each is configured."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from fluxport.api.protocol import ErrorResponse, ModelList, ModelObject, ProviderInfo
from fluxport.catalog import MODELS, ModelSpec
from fluxport.gateway.service import ImageService
from fluxport.gateway.stats import DEFAULT_WINDOW, provider_stats

router = APIRouter(tags=["models"])


def _model(service: ImageService, spec: ModelSpec) -> ModelObject:
    providers = [
        ProviderInfo(name=name, configured=state.configured, detail=state.detail)
        for name, state in service.provider_states(spec)
    ]
    return ModelObject(
        id=spec.id,
        created=spec.created,
        owned_by=spec.owned_by,
        name=spec.name,
        description=spec.summary,
        noise=spec.noise,
        available=any(p.configured for p in providers),
        providers=providers,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every model fluxport knows, with its providers and their state."""
    service: ImageService = request.app.state.service
    return ModelList(data=[_model(service, spec) for spec in MODELS.values()])


class ProviderStatsObject(BaseModel):
    provider: str
    configured: bool
    detail: str
    requests: int = Field(description="Finished attempts (succeeded or failed) in the window.")
    success_rate: float | None = Field(description="Succeeded / requests; null without requests.")
    p50_ms: float | None = Field(description="Median generation time of succeeded attempts (nearest rank).")
    p95_ms: float | None = Field(description="95th percentile generation time (nearest rank).")
    ttfb_p50_ms: float | None = Field(description="Median time to first byte of succeeded attempts.")
    price_per_mp_usd: float = Field(description="US dollars per output megapixel.")
    input_price_per_mp_usd: float = Field(description="US dollars per reference-image megapixel.")


class ProviderStatsList(BaseModel):
    object: Literal["list"] = "list"
    model: str
    window_days: int
    data: list[ProviderStatsObject]


# Registered before the catch-all below, which would otherwise take ".../providers" as a model id.
@router.get(
    "/v1/models/{model_id:path}/providers",
    response_model=ProviderStatsList,
    responses={404: {"model": ErrorResponse}},
)
async def model_providers(model_id: str, request: Request) -> ProviderStatsList:
    """Every provider of a model, configured or not, with its price and its last 30 days' figures."""
    service: ImageService = request.app.state.service
    spec = service.spec(model_id)
    states = service.provider_states(spec)
    stats = {
        s.provider: s
        for s in await provider_stats(service.db, spec.id, providers=[name for name, _ in states])
    }
    rows = []
    for name, state in states:
        s = stats[name]
        rate = service.rate(name, spec.id)
        rows.append(
            ProviderStatsObject(
                provider=name,
                configured=state.configured,
                detail=state.detail,
                requests=s.requests,
                success_rate=s.success_rate,
                p50_ms=s.p50_ms,
                p95_ms=s.p95_ms,
                ttfb_p50_ms=s.ttfb_p50_ms,
                price_per_mp_usd=rate.output_per_mp,
                input_price_per_mp_usd=rate.input_per_mp,
            )
        )
    return ProviderStatsList(model=spec.id, window_days=DEFAULT_WINDOW.days, data=rows)


@router.get(
    "/v1/models/{model_id:path}", response_model=ModelObject, responses={404: {"model": ErrorResponse}}
)
async def retrieve_model(model_id: str, request: Request) -> ModelObject:
    """One model; ids may arrive %2F-encoded."""
    service: ImageService = request.app.state.service
    return _model(service, service.spec(model_id))
