"""Request → job: validate everything that can be validated before any provider is called."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from fluxport import media
from fluxport.catalog import MODELS, NOISE_NOTE, ModelSpec, find_model
from fluxport.domain.errors import InvalidRequest, NotFound, ServiceUnavailable
from fluxport.domain.job import ImageJob, Operation, ReferenceImage
from fluxport.domain.request import ImageParams
from fluxport.domain.sizing import decide_size
from fluxport.gateway.types import PreparedRequest
from fluxport.providers.base import Provider, ProviderState
from fluxport.providers.registry import model_providers
from fluxport.settings import Settings

MAX_REFERENCES = 4


class Preparer:
    """Turns a client's parameters into an ImageJob and the providers able to serve it."""

    def __init__(self, settings: Settings, providers: Mapping[str, Provider], default_model: str) -> None:
        self.settings = settings
        self.providers = providers
        self.default_model = default_model
        # Decoding a 50 MP reference takes ~200 MB: two at a time keeps memory bounded.
        self._decode_slots = asyncio.Semaphore(2)

    def spec(self, model: str | None) -> ModelSpec:
        model_id = model or self.default_model
        spec = find_model(model_id)
        if spec is None:
            known = ", ".join(MODELS)
            raise NotFound(
                f"The model '{model_id}' does not exist. Available models: {known}.", param="model"
            )
        return spec

    def provider_states(self, spec: ModelSpec) -> list[tuple[str, ProviderState]]:
        states = []
        for name in model_providers(spec, self.providers):
            provider = self.providers.get(name)
            if provider is None:
                states.append((name, ProviderState(False, f"the {name} provider is not installed")))
            else:
                states.append((name, provider.state(spec.id)))
        return states

    def configured_providers(self, spec: ModelSpec) -> list[Provider]:
        return [
            self.providers[name]
            for name, state in self.provider_states(spec)
            if state.configured and name in self.providers
        ]

    async def prepare(
        self,
        request_id: str,
        operation: Operation,
        req: ImageParams,
        uploads: Sequence[bytes] = (),
        *,
        api_key_id: str | None = None,
    ) -> PreparedRequest:
        """Validate everything that can be validated before any provider is called."""
        spec = self.spec(req.model)
        prompt = req.prompt
        if not prompt.strip():
            raise InvalidRequest("'prompt' must not be empty.", param="prompt")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"'prompt' is {len(prompt)} characters; the maximum is {self.settings.max_prompt_chars}.",
                param="prompt",
            )
        if req.stream and req.dry_run:
            raise InvalidRequest(
                "A dry run is answered at once, not streamed; omit 'stream'.", param="stream"
            )
        if req.background == "transparent":
            raise InvalidRequest("FLUX.2 cannot make transparent backgrounds.", param="background")
        self._check_extras(req.extras)
        if operation is Operation.EDIT and not uploads:
            raise InvalidRequest("An edit needs at least one reference image.", param="image")
        limit = min(MAX_REFERENCES, spec.max_references)
        if len(uploads) > limit:
            raise InvalidRequest(
                f"{spec.id} takes at most {limit} reference images; got {len(uploads)}.", param="image"
            )
        candidates = self.configured_providers(spec)
        if not candidates:
            raise ServiceUnavailable(self.how_to_configure(spec))

        references = await self._load_references(uploads)
        decision = decide_size(
            spec,
            size=req.size,
            aspect_ratio=req.aspect_ratio,
            resolution=req.resolution,
            reference=references[0].size if references else None,
        )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        job = ImageJob(
            request_id=request_id,
            model=spec.id,
            operation=operation,
            prompt=prompt,
            size=decision.size,
            n=req.n or 1,
            seed=seed,
            seed_given=req.seed is not None,
            cfg_scale=req.cfg_scale,
            prompt_enhancement=req.prompt_enhancement,
            output_format=req.output_format or "png",
            output_compression=req.output_compression,
            response_format=req.response_format or "url",
            references=tuple(references),
            extras=req.extras,
            partial_images=(req.partial_images or 0) if req.stream else 0,
        )
        explicit = self._explicit(spec, req.provider, candidates)
        if explicit is not None:
            candidates = [prov for name in explicit for prov in candidates if prov.name == name]
        providers = self._able(spec, job, candidates)
        record = {
            "size": str(decision.size),
            "size_source": decision.source,
            "requested": {"size": req.size, "aspect_ratio": req.aspect_ratio, "resolution": req.resolution},
            "n": job.n,
            "seed": job.seed,
            "seed_given": job.seed_given,
            "cfg_scale": job.cfg_scale,
            "prompt_enhancement": job.prompt_enhancement,
            "output_format": job.output_format,
            "output_compression": job.output_compression,
            "response_format": job.response_format,
            "references": [{"format": r.format, "width": r.width, "height": r.height} for r in references],
            "extras": dict(job.extras),
            "provider": explicit,
            "strategy": req.strategy,
            "hedge": req.hedge,
            "ignored": list(req.ignored),
        }
        if req.stream:
            record["stream"] = {"partial_images": job.partial_images}
        return PreparedRequest(job, spec, providers, decision, req, record, explicit, api_key_id)

    def _explicit(
        self, spec: ModelSpec, given: str | list[str] | None, configured: list[Provider]
    ) -> list[str] | None:
        """Validate a client's explicit provider order: known to the model, configured, no repeats."""
        if given is None:
            return None
        names = [given] if isinstance(given, str) else list(given)
        names = [n.strip().lower() for n in names]
        if not names or len(set(names)) != len(names):
            raise InvalidRequest("'provider' must name one or more different providers.", param="provider")
        ready = {prov.name for prov in configured}
        for name in names:
            known = model_providers(spec, self.providers)
            if name not in known:
                raise InvalidRequest(
                    f"{spec.id} has no provider '{name}'; its providers are {', '.join(known)}.",
                    param="provider",
                )
            if name not in ready:
                raise InvalidRequest(
                    f"The provider '{name}' is not configured for {spec.id}.",
                    param="provider",
                    code="provider_not_configured",
                )
        return names

    async def _load_references(self, uploads: Sequence[bytes]) -> list[ReferenceImage]:
        if not uploads:
            return []
        s = self.settings

        async def load(index: int, data: bytes) -> ReferenceImage:
            # Decoding a 50 MP reference takes ~200 MB: two at a time keeps memory bounded.
            async with self._decode_slots:
                return await asyncio.to_thread(
                    media.load_reference,
                    data,
                    index=index,
                    max_bytes=s.max_image_bytes,
                    max_pixels=s.max_input_pixels,
                )

        return list(await asyncio.gather(*(load(i, data) for i, data in enumerate(uploads))))

    def _able(self, spec: ModelSpec, job: ImageJob, candidates: list[Provider]) -> list[Provider]:
        """Drop providers that cannot honour the request; a parameter is never silently dropped."""
        able = candidates
        checks: list[tuple[str, bool, Any]] = [
            ("cfg_scale", job.cfg_scale is not None, lambda c: c.supports_cfg_scale),
            ("prompt_enhancement", job.prompt_enhancement, lambda c: c.supports_prompt_enhancement),
            ("image", len(job.references) > 0, lambda c: c.max_references >= len(job.references)),
        ]
        for param, wanted, ok in checks:
            if not wanted:
                continue
            remaining = [p for p in able if ok(p.capabilities(spec.id))]
            if not remaining:
                names = ", ".join(p.name for p in able)
                raise InvalidRequest(
                    f"No configured provider of {spec.id} ({names}) supports '{param}' as requested.",
                    param=param,
                    code="unsupported_parameter",
                )
            able = remaining
        return able

    def _check_extras(self, extras: Mapping[str, Any]) -> None:
        """Fields handed on to a provider untouched are bounded: a 400 naming the field beyond
        FLUXPORT_MAX_EXTRA_FIELD_BYTES (as JSON) or FLUXPORT_MAX_EXTRA_FIELD_DEPTH levels."""
        max_bytes, max_depth = self.settings.max_extra_field_bytes, self.settings.max_extra_field_depth
        for name, value in extras.items():
            if len(name) > 100:
                raise InvalidRequest(f"The field name '{name[:40]}...' is too long.", param=name[:100])
            # Size first (in C): it bounds the walk below.
            size = len(json.dumps(value, ensure_ascii=False).encode())
            if size > max_bytes:
                raise InvalidRequest(
                    f"Invalid value for '{name}': {size} bytes as JSON; a provider field takes at most "
                    f"{max_bytes} (FLUXPORT_MAX_EXTRA_FIELD_BYTES).",
                    param=name,
                )
            stack: list[tuple[Any, int]] = [(value, 1)]
            while stack:
                item, depth = stack.pop()
                if isinstance(item, dict | list):
                    if depth > max_depth:
                        raise InvalidRequest(
                            f"Invalid value for '{name}': nested deeper than {max_depth} levels.", param=name
                        )
                    children = item.values() if isinstance(item, dict) else item
                    stack.extend((child, depth + 1) for child in children)

    def how_to_configure(self, spec: ModelSpec) -> str:
        """What to set to serve `spec`, in each of its providers' own words."""
        ways = "; or ".join(state.detail for _, state in self.provider_states(spec) if not state.configured)
        return (
            f"No provider is configured for {spec.id}. To serve it, {ways}, then restart fluxport. "
            f"To try fluxport without any provider, use model flux.2-dummy ({NOISE_NOTE})"
        )
