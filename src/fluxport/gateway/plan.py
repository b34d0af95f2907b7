"""What a request costs on each provider, which fields each receives, and the ranked plan.

The one place a price is computed: the size each provider generates (its SizePolicy) at its rate,
per call of the fan-out. Ranking, dry runs, billing and the response's usage all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from fluxport.domain.job import ImageJob
from fluxport.domain.pricing import Rate, Usage, price, rate_for
from fluxport.gateway.router import Router, Strategy
from fluxport.gateway.types import PreparedRequest
from fluxport.providers.base import Provider
from fluxport.settings import Settings


class Planner:
    """Prices jobs per provider and ranks the providers of a prepared request."""

    def __init__(self, settings: Settings, providers: Mapping[str, Provider], router: Router) -> None:
        self.settings = settings
        self.providers = providers
        self.router = router
        # (provider, model) -> the extras other providers claim: fixed, as their capabilities are.
        self._claimed: dict[tuple[str, str], frozenset[str]] = {}

    def claimed(self, provider: Provider, model: str) -> frozenset[str]:
        """The extra fields of `model` that another provider than `provider` names as its own."""
        key = (provider.name, model)
        found = self._claimed.get(key)
        if found is None:
            found = self._claimed[key] = frozenset(
                name
                for other in self.providers.values()
                if other is not provider
                for name in other.capabilities(model).extras
            )
        return found

    def rate(self, provider: Provider, model: str) -> Rate:
        return rate_for(provider.name, model, self.settings, provider.capabilities(model).rate)

    def slices(self, provider: Provider, job: ImageJob) -> list[ImageJob]:
        """`job` as the calls `provider` makes: n split by what one call can make, each with the
        fields meant for it (its own and unknown ones, never another provider's)."""
        caps = provider.capabilities(job.model)
        extras = job.extras
        if extras:
            claimed = self.claimed(provider, job.model)
            extras = {k: v for k, v in extras.items() if k in caps.extras or k not in claimed}
        per_call = max(1, caps.max_images_per_call)
        if job.n <= per_call and extras is job.extras:
            return [job]  # one call with every field: the job itself
        return [
            replace(job, n=min(per_call, job.n - start), seed=job.seed + start, extras=extras)
            for start in range(0, job.n, per_call)
        ]

    def call_cost(self, provider: Provider, call: ImageJob) -> Usage:
        """One call's cost: the images at the size the provider generates, plus its references."""
        generated = provider.capabilities(call.model).size.generated(call.size)
        refs = [r.size for r in call.references]
        return price(self.rate(provider, call.model), [generated] * call.n, refs)

    def estimate(self, provider: Provider, job: ImageJob) -> Usage:
        """The cost of `job` on `provider`: the sum of its calls (each bills its own references)."""
        return sum_usage([self.call_cost(provider, call) for call in self.slices(provider, job)])

    def ranked(self, p: PreparedRequest) -> list[tuple[Provider, float]]:
        """The able providers best first, each with this request's estimated cost there."""
        by_name = {prov.name: prov for prov in p.providers}
        prices = {name: self.estimate(prov, p.job).cost_usd for name, prov in by_name.items()}
        strategy = Strategy(p.request.strategy or self.settings.router_strategy)
        capacities = {name: prov.capabilities(p.job.model).capacity for name, prov in by_name.items()}
        ranked = self.router.rank(p.job.model, prices, strategy, p.explicit, capacities)
        return [(by_name[c.name], c.price_usd) for c in ranked]


def sum_usage(parts: list[Usage]) -> Usage:
    return Usage(
        images=sum(u.images for u in parts),
        input_megapixels=sum(u.input_megapixels for u in parts),
        output_megapixels=sum(u.output_megapixels for u in parts),
        cost_usd=round(sum(u.cost_usd for u in parts), 6),
    )
