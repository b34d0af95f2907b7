"""Builds the providers from settings (the only place that knows them all)."""

from __future__ import annotations

from fluxport.providers.base import Provider
from fluxport.providers.fal import FalProvider
from fluxport.providers.local import LocalProvider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.settings import Settings


def build_providers(settings: Settings) -> dict[str, Provider]:
    """Every provider, configured or not: each says for itself whether it can serve a model."""
    providers: list[Provider] = [LocalProvider(settings), FalProvider(settings), ReplicateProvider(settings)]
    return {p.name: p for p in providers}
