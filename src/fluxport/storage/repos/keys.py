"""API keys and what each key has used: the `api_keys` table, and usage totals over `requests`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func, insert, select, update

from fluxport.storage.records import ApiKeyRow, UsageTotals, utcnow
from fluxport.storage.repos.base import Repository
from fluxport.storage.schema import api_keys, requests

__all__ = ["KeyRepository"]


class KeyRepository(Repository):
    """Keys are created and revoked rarely (the CLI, an admin): plain transactions, no group commit."""

    async def create_api_key(
        self,
        *,
        id: str,
        name: str,
        prefix: str,
        hash: str,
        rate_limit_per_minute: int | None = None,
        monthly_budget_usd: float | None = None,
    ) -> ApiKeyRow:
        row = ApiKeyRow(
            id=id,
            name=name,
            prefix=prefix,
            hash=hash,
            rate_limit_per_minute=rate_limit_per_minute,
            monthly_budget_usd=monthly_budget_usd,
            created_at=utcnow(),
            revoked_at=None,
        )
        async with self._write() as session:
            await session.execute(insert(api_keys).values(**row.columns()))
        return row

    async def list_api_keys(self) -> list[ApiKeyRow]:
        """Every key, revoked ones included, oldest first."""
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        async with self.sessions() as session:
            return [ApiKeyRow.of(k) for k in (await session.execute(stmt)).mappings()]

    async def count_api_keys(self) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(api_keys)) or 0)

    async def api_keys_version(self) -> tuple[int, int, datetime | None]:
        """What changes when a key is created or revoked: (keys, revoked keys, latest revocation)."""
        k = api_keys.c
        stmt = select(func.count(), func.count(k.revoked_at), func.max(k.revoked_at))
        async with self.sessions() as session:
            count, revoked, latest = (await session.execute(stmt)).one()
            return int(count), int(revoked), latest

    async def api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        stmt = select(api_keys).where(api_keys.c.hash == key_hash)
        async with self.sessions() as session:
            row = (await session.execute(stmt)).mappings().one_or_none()
            return ApiKeyRow.of(row) if row is not None else None

    async def revoke_api_key(self, key_id: str) -> ApiKeyRow | None:
        """Stamp revoked_at (kept if already revoked); None when there is no such key."""
        k = api_keys.c
        async with self._write() as session:
            await session.execute(
                update(api_keys).where(k.id == key_id, k.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
            row = (await session.execute(select(api_keys).where(k.id == key_id))).mappings().one_or_none()
            return ApiKeyRow.of(row) if row is not None else None

    async def key_usage(self, api_key_id: str | None, *, since: datetime | None = None) -> UsageTotals:
        """A key's requests since `since` (all time when None); api_key_id None: keyless requests."""
        r = requests.c
        owner = r.api_key_id.is_(None) if api_key_id is None else r.api_key_id == api_key_id
        stmt = select(
            func.count(),
            func.sum(case((r.status == "succeeded", 1), else_=0)),
            func.sum(r.images),
            func.sum(r.width * r.height * r.images),
            func.sum(r.cost_usd),
        ).where(owner)
        if since is not None:
            stmt = stmt.where(r.created_at >= since)
        async with self.sessions() as session:
            count, succeeded, images, pixels, cost = (await session.execute(stmt)).one()
        return UsageTotals(
            requests=int(count or 0),
            succeeded=int(succeeded or 0),
            images=int(images or 0),
            megapixels=round(float(pixels or 0) / 1e6, 6),
            cost_usd=round(float(cost or 0.0), 6),
        )

    async def key_spend(self, api_key_id: str, *, since: datetime) -> float:
        """What a key's requests since `since` cost (dry runs record 0)."""
        r = requests.c
        stmt = select(func.sum(r.cost_usd)).where(r.api_key_id == api_key_id, r.created_at >= since)
        async with self.sessions() as session:
            return float(await session.scalar(stmt) or 0.0)
