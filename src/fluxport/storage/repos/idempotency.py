"""Idempotency-Key answers: claimed while a request runs, stored when it finishes, purged on expiry."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError

from fluxport.storage.records import IdempotencyRow, utcnow
from fluxport.storage.repos.base import Repository
from fluxport.storage.schema import idempotency

__all__ = ["IdempotencyRepository"]


class IdempotencyRepository(Repository):
    """The `idempotency` table. The primary key (api_key_id, key) is what makes a claim exclusive,
    across processes and replicas that share the database."""

    async def claim_idempotency(
        self,
        *,
        api_key_id: str,
        key: str,
        body_hash: str,
        request_id: str,
        expires_at: datetime,
        stale_before: datetime,
    ) -> IdempotencyRow | None:
        """Claim (api_key_id, key) for a new request: None when claimed, else the row that holds it.

        Expired rows, and in-progress rows older than `stale_before` (their process died), give way.
        """
        t = idempotency.c
        for _ in range(5):
            now = utcnow()
            async with self._write() as session:
                await session.execute(
                    delete(idempotency).where(
                        t.api_key_id == api_key_id,
                        t.key == key,
                        (t.expires_at <= now) | ((t.state == "in_progress") & (t.created_at < stale_before)),
                    )
                )
            try:
                async with self._write() as session:
                    await session.execute(
                        insert(idempotency).values(
                            api_key_id=api_key_id,
                            key=key,
                            body_hash=body_hash,
                            request_id=request_id,
                            state="in_progress",
                            created_at=now,
                            expires_at=expires_at,
                        )
                    )
                return None
            except IntegrityError:
                existing = await self.get_idempotency(api_key_id, key)
                if existing is not None:
                    return existing
        raise RuntimeError(f"could not claim idempotency key {key!r}")

    async def get_idempotency(self, api_key_id: str, key: str) -> IdempotencyRow | None:
        t = idempotency.c
        stmt = select(idempotency).where(t.api_key_id == api_key_id, t.key == key)
        async with self.sessions() as session:
            row = (await session.execute(stmt)).mappings().one_or_none()
            return IdempotencyRow.of(row) if row is not None else None

    async def finish_idempotency(
        self, api_key_id: str, key: str, *, status_code: int, headers: dict[str, str], body: str
    ) -> None:
        t = idempotency.c
        async with self._write() as session:
            await session.execute(
                update(idempotency)
                .where(t.api_key_id == api_key_id, t.key == key)
                .values(state="done", status_code=status_code, headers=headers, body=body)
            )

    async def release_idempotency(self, api_key_id: str, key: str) -> None:
        """Forget an in-progress claim (the answer is not to be kept, e.g. a 5xx): a retry runs again."""
        t = idempotency.c
        async with self._write() as session:
            await session.execute(delete(idempotency).where(t.api_key_id == api_key_id, t.key == key))

    async def purge_idempotency(self) -> int:
        """Delete expired answers; returns how many."""
        async with self._write() as session:
            result = cast(
                CursorResult[Any],
                await session.execute(delete(idempotency).where(idempotency.c.expires_at <= utcnow())),
            )
            return result.rowcount
