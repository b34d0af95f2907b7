"""GET /v1/usage: the calling key's requests, images, megapixels and spend."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from fluxport.api.auth import calling_key
from fluxport.gateway.service import ImageService
from fluxport.keys import month_start, shown_prefix
from fluxport.storage.db import UsageTotals

router = APIRouter(tags=["usage"])


class UsagePeriod(BaseModel):
    since: datetime | None = Field(description="Start of the period (UTC); null for all time.")
    requests: int = Field(description="Recorded requests: succeeded, failed, rejected and dry runs.")
    succeeded: int
    images: int = Field(description="Images delivered.")
    megapixels: float = Field(description="Output megapixels delivered.")
    cost_usd: float = Field(description="What the providers billed for this key's requests.")


class KeyInfo(BaseModel):
    id: str
    name: str
    prefix: str
    rate_limit_per_minute: int | None
    monthly_budget_usd: float | None


class UsageObject(BaseModel):
    object: Literal["usage"] = "usage"
    api_key: KeyInfo | None = Field(description="The calling key; null when auth is off (keyless usage).")
    this_month: UsagePeriod
    all_time: UsagePeriod
    budget_remaining_usd: float | None = Field(description="This month; null without a budget.")


def _period(since: datetime | None, t: UsageTotals) -> UsagePeriod:
    return UsagePeriod(
        since=since,
        requests=t.requests,
        succeeded=t.succeeded,
        images=t.images,
        megapixels=t.megapixels,
        cost_usd=t.cost_usd,
    )


@router.get("/v1/usage", response_model=UsageObject)
async def usage(request: Request) -> UsageObject:
    """The calling key's usage this UTC month and all time (with auth none: keyless requests)."""
    service: ImageService = request.app.state.service
    key = calling_key(request)
    key_id = key.id if key is not None else None
    since = month_start()
    month = await service.db.key_usage(key_id, since=since)
    total = await service.db.key_usage(key_id)
    info = None
    remaining = None
    if key is not None:
        info = KeyInfo(
            id=key.id,
            name=key.name,
            prefix=shown_prefix(key),
            rate_limit_per_minute=key.rate_limit_per_minute,
            monthly_budget_usd=key.monthly_budget_usd,
        )
        if key.monthly_budget_usd is not None:
            remaining = round(max(0.0, key.monthly_budget_usd - month.cost_usd), 6)
    return UsageObject(
        api_key=info,
        this_month=_period(since, month),
        all_time=_period(None, total),
        budget_remaining_usd=remaining,
    )
