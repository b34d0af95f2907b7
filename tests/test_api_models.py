"""GET /v1/models and /v1/models/{id} with the SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import LiveServer


def test_list_models_with_provider_states(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"flux.2-dev", "flux.2-dev-flash", "flux.2-dummy"}
    dummy = models["flux.2-dummy"].model_extra or {}
    assert dummy["noise"] is True and dummy["available"] is True
    assert "noise" in dummy["description"]
    dev = models["flux.2-dev"].model_extra or {}
    assert dev["available"] is False
    providers = {p["name"]: p for p in dev["providers"]}
    assert set(providers) == {"local", "fal", "replicate"}
    assert all(p["configured"] is False for p in providers.values())
    assert "FLUXPORT_LOCAL_WEIGHTS" in providers["local"]["detail"]


def test_retrieve_model_and_percent_encoded_alias(client: openai.OpenAI, server: LiveServer) -> None:
    model = client.models.retrieve("flux.2-dummy")
    assert model.id == "flux.2-dummy" and model.object == "model" and model.owned_by
    # The SDK encodes "/" as %2F; aliases such as the Hub repo id resolve to the canonical model.
    alias = client.models.retrieve("black-forest-labs/FLUX.2-dev")
    assert alias.id == "flux.2-dev"
    r = httpx.get(f"{server.api}/models/black-forest-labs%2FFLUX.2-dev")
    assert r.status_code == 200 and r.json()["id"] == "flux.2-dev"


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope/nothing")
    assert info.value.param == "model"
