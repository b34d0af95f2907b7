"""Builds the providers from settings (the only place that knows them all)."""

from __future__ import annotations

from collections.abc import Mapping

from fluxport.catalog import MODELS, ModelSpec
from fluxport.domain.pricing import Rate, rate_for
from fluxport.providers import fal, replicate
from fluxport.providers._hosted import HttpPolicy
from fluxport.providers.base import Provider
from fluxport.providers.fal import FalProvider
from fluxport.providers.local import LocalProvider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.providers.upstream import UpstreamProvider
from fluxport.settings import Settings


def build_providers(settings: Settings) -> dict[str, Provider]:
    """Every provider, configured or not: each says for itself whether it can serve a model."""
    policy = HttpPolicy(
        poll_interval_s=settings.hosted_poll_interval_s,
        max_poll_interval_s=max(settings.hosted_max_poll_interval_s, settings.hosted_poll_interval_s),
        max_connections=settings.hosted_max_connections,
    )
    providers: list[Provider] = [
        LocalProvider(settings),
        FalProvider(settings, policy=policy),
        ReplicateProvider(settings, policy=policy),
    ]
    providers += [
        UpstreamProvider(u, settings, policy=HttpPolicy(max_connections=max(8, 2 * u.max_concurrency)))
        for u in settings.upstreams
    ]
    return {p.name: p for p in providers}


def model_providers(spec: ModelSpec, providers: Mapping[str, Provider]) -> tuple[str, ...]:
    """The providers of `spec`: the catalog's (configured or not), then any other built provider
    that serves it (the upstreams of FLUXPORT_UPSTREAMS that list the model)."""
    extra = (n for n, p in providers.items() if n not in spec.providers and p.state(spec.id).configured)
    return spec.providers + tuple(extra)


def listed_providers(spec: ModelSpec, settings: Settings) -> tuple[str, ...]:
    """The same without running providers (the stats CLI): the catalog's, then the upstreams."""
    return spec.providers + tuple(u.name for u in settings.upstreams if spec.id in u.models)


def default_model(settings: Settings, providers: Mapping[str, Provider]) -> str:
    """The model of a request that names none: FLUXPORT_DEFAULT_MODEL, else the first catalog model
    with a configured provider (the offline dummy when nothing else is), else the first model."""
    if settings.default_model:
        return settings.default_model
    for spec in MODELS.values():
        names = model_providers(spec, providers)
        if any(name in providers and providers[name].state(spec.id).configured for name in names):
            return spec.id
    return next(iter(MODELS))


def listed_rate(settings: Settings, provider: str, model: str) -> Rate:
    """The rate of `model` on `provider` without running providers (the stats CLI): FLUXPORT_PRICES,
    else the provider's list price."""
    listed = {"fal": fal.PRICES, "replicate": replicate.PRICES}.get(provider, {}).get(model, Rate.free())
    for upstream in settings.upstreams:
        if upstream.name == provider:
            listed = Rate(upstream.price_per_mp, upstream.price_per_mp)
    return rate_for(provider, model, settings, listed)
