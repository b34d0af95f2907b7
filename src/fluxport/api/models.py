"""/v1/models: each model with its providers and whether each is configured."""

from __future__ import annotations

from fastapi import APIRouter, Request

from fluxport.api.protocol import ErrorResponse, ModelList, ModelObject, ProviderInfo
from fluxport.catalog import MODELS, ModelSpec
from fluxport.gateway.service import ImageService

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


@router.get(
    "/v1/models/{model_id:path}", response_model=ModelObject, responses={404: {"model": ErrorResponse}}
)
async def retrieve_model(model_id: str, request: Request) -> ModelObject:
    """One model; ids may arrive %2F-encoded."""
    service: ImageService = request.app.state.service
    return _model(service, service.spec(model_id))
