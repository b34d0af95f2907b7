"""Requests, their provider attempts and their saved images: the records every request writes."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, bindparam, delete, insert, select, update
from sqlalchemy.engine import CursorResult

from fluxport.storage.records import (
    ATTEMPT_FINAL,
    INTERRUPTED_ERROR,
    OPERATIONS,
    REQUEST_FINAL,
    REQUEST_IN_FLIGHT,
    REQUEST_STATUSES,
    AttemptRow,
    ImageRow,
    RequestRow,
    check,
    utcnow,
)
from fluxport.storage.repos.base import Repository
from fluxport.storage.schema import attempts, images, requests
from fluxport.storage.writer import Op

__all__ = ["RequestRepository"]

# The writes every request makes, as Core statements built once: the values come with each
# execution, so the compiled SQL is cached and nothing is rebuilt per request.
_INSERT_REQUEST: Final = insert(requests)
_UPDATE_REQUEST: Final = update(requests).where(requests.c.id == bindparam("request_id_"))
_INSERT_ATTEMPT: Final = insert(attempts)
_UPDATE_ATTEMPT: Final = update(attempts).where(attempts.c.id == bindparam("attempt_id_"))
_INSERT_IMAGE: Final = insert(images)


class RequestRepository(Repository):
    """The `requests`, `attempts` and `images` tables; the per-request writes go through group commit."""

    # Requests

    def create_request(
        self,
        *,
        id: str,
        model: str,
        operation: str,
        prompt: str,
        params: dict[str, Any],
        n: int,
        status: str = "queued",
        api_key_id: str | None = None,
    ) -> asyncio.Future[None]:
        """Record a new request (queued, or already running when it starts at once)."""
        check(operation, OPERATIONS, "operation")
        check(status, frozenset(REQUEST_IN_FLIGHT), "initial request status")
        values = dict(
            id=id,
            created_at=utcnow(),
            model=model,
            operation=operation,
            prompt=prompt,
            params=params,
            status=status,
            n=n,
            images=0,
            client_disconnected=False,
            api_key_id=api_key_id,
        )
        return self._writer.write(Op(_INSERT_REQUEST, values))

    def set_request_status(self, request_id: str, status: str) -> asyncio.Future[None]:
        check(status, REQUEST_STATUSES, "request status")
        return self._update_request(request_id, status=status)

    def finish_request(
        self,
        request_id: str,
        *,
        status: str,
        provider: str | None,
        error: dict[str, Any] | None,
        queued_ms: float | None,
        generation_ms: float | None,
        ttfb_ms: float | None,
        total_ms: float | None,
        width: int | None,
        height: int | None,
        images: int,
        revised_prompt: str | None,
        cost_usd: float | None = None,
    ) -> asyncio.Future[None]:
        """Record the outcome (succeeded / failed / rejected / interrupted) and stamp finished_at."""
        check(status, REQUEST_FINAL, "final request status")
        return self._update_request(
            request_id,
            status=status,
            provider=provider,
            error=error,
            queued_ms=queued_ms,
            generation_ms=generation_ms,
            ttfb_ms=ttfb_ms,
            total_ms=total_ms,
            width=width,
            height=height,
            images=images,
            revised_prompt=revised_prompt,
            cost_usd=cost_usd,
            finished_at=utcnow(),
        )

    def mark_client_disconnected(self, request_id: str) -> asyncio.Future[None]:
        return self._update_request(request_id, client_disconnected=True)

    def _update_request(self, request_id: str, **values: Any) -> asyncio.Future[None]:
        values["request_id_"] = request_id
        return self._writer.write(Op(_UPDATE_REQUEST, values, one_row=True, what=f"request {request_id!r}"))

    async def get_request(self, request_id: str) -> RequestRow | None:
        async with self.sessions() as session:
            row = (
                (await session.execute(select(requests).where(requests.c.id == request_id)))
                .mappings()
                .one_or_none()
            )
            return RequestRow.of(row) if row is not None else None

    async def find_requests(
        self,
        *,
        prompt: str | None = None,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[RequestRow]:
        """Requests matching every given field exactly, newest first."""
        r = requests.c
        stmt = select(requests).order_by(r.created_at.desc(), r.id.desc())
        if prompt is not None:
            stmt = stmt.where(r.prompt == prompt)
        if model is not None:
            stmt = stmt.where(r.model == model)
        if status is not None:
            stmt = stmt.where(r.status == status)
        async with self.sessions() as session:
            return [RequestRow.of(row) for row in (await session.execute(stmt.limit(limit))).mappings()]

    # Attempts

    def start_attempt(
        self, *, request_id: str, provider: str, model: str, started_at: datetime | None = None
    ) -> asyncio.Future[int]:
        """Record a running attempt; returns its id. `started_at` (default now) is for imports and tests."""
        values = dict(
            request_id=request_id,
            provider=provider,
            model=model,
            status="running",
            started_at=started_at or utcnow(),
        )
        return self._writer.write(Op(_INSERT_ATTEMPT, values), then=lambda out: int(out[0]))

    def finish_attempt(
        self,
        attempt_id: int,
        *,
        status: str,
        error: dict[str, Any] | None,
        queued_ms: float | None,
        ttfb_ms: float | None,
        generation_ms: float | None,
        total_ms: float | None,
        provider_request_id: str | None,
        normalization: dict[str, str] | None,
        billed_usd: float | None,
        submitted_ms: float | None = None,
        first_status_ms: float | None = None,
    ) -> asyncio.Future[None]:
        """Record an attempt's outcome (succeeded / failed / cancelled) and stamp finished_at."""
        check(status, ATTEMPT_FINAL, "final attempt status")
        values = dict(
            status=status,
            error=error,
            queued_ms=queued_ms,
            submitted_ms=submitted_ms,
            first_status_ms=first_status_ms,
            ttfb_ms=ttfb_ms,
            generation_ms=generation_ms,
            total_ms=total_ms,
            provider_request_id=provider_request_id,
            normalization=normalization,
            billed_usd=billed_usd,
            finished_at=utcnow(),
            attempt_id_=attempt_id,
        )
        return self._writer.write(Op(_UPDATE_ATTEMPT, values, one_row=True, what=f"attempt {attempt_id}"))

    async def list_attempts(self, request_id: str) -> list[AttemptRow]:
        """A request's attempts in the order they started."""
        stmt = select(attempts).where(attempts.c.request_id == request_id).order_by(attempts.c.id)
        async with self.sessions() as session:
            return [AttemptRow.of(a) for a in (await session.execute(stmt)).mappings()]

    # Images

    def add_images(self, images: list[ImageRow]) -> asyncio.Future[None]:
        """Record saved images, all or none."""
        if not images:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        now = utcnow()
        rows = [
            dict(
                id=i.id,
                request_id=i.request_id,
                index=i.index,
                path=i.path,
                format=i.format,
                mime=i.mime,
                width=i.width,
                height=i.height,
                bytes=i.bytes,
                created_at=i.created_at or now,
            )
            for i in images
        ]
        return self._writer.write(Op(_INSERT_IMAGE, rows))

    async def get_image(self, image_id: str) -> ImageRow | None:
        async with self.sessions() as session:
            result = await session.execute(select(images).where(images.c.id == image_id))
            row = result.mappings().one_or_none()
            return ImageRow.of(row) if row is not None else None

    async def list_images(self, request_id: str) -> list[ImageRow]:
        """A request's images in output order."""
        stmt = select(images).where(images.c.request_id == request_id).order_by(images.c.index)
        async with self.sessions() as session:
            return [ImageRow.of(i) for i in (await session.execute(stmt)).mappings()]

    # Crash repair

    async def mark_interrupted(self, started_before: datetime | None = None) -> int:
        """Requests left queued/running become interrupted, their running attempts failed.

        At start-up of the only server on a database, everything in flight belonged to a process
        that is gone. Where replicas share the database, another replica's requests are in flight
        meanwhile: `started_before` then limits this to requests older than any live one can be
        (the request deadline), which a crashed replica's requests soon are.
        Returns how many requests were interrupted.
        """
        attempt_filter: ColumnElement[bool] = attempts.c.status == "running"
        request_filter: ColumnElement[bool] = requests.c.status.in_(REQUEST_IN_FLIGHT)
        if started_before is not None:
            attempt_filter = attempt_filter & (attempts.c.started_at < started_before)
            request_filter = request_filter & (requests.c.created_at < started_before)
        async with self._write() as session:
            await session.execute(
                update(attempts).where(attempt_filter).values(status="failed", error=INTERRUPTED_ERROR)
            )
            result = cast(
                CursorResult[Any],
                await session.execute(
                    update(requests)
                    .where(request_filter)
                    .values(status="interrupted", error=INTERRUPTED_ERROR)
                ),
            )
            return result.rowcount

    # Link expiry and blob-store repair (see storage/repair.py)

    async def image_paths(
        self, *, created_from: datetime | None = None, created_before: datetime | None = None
    ) -> list[tuple[str, str, str, datetime, int]]:
        """(id, request_id, path, created_at, bytes) of the images created in [created_from,
        created_before)."""
        i = images.c
        stmt = select(i.id, i.request_id, i.path, i.created_at, i.bytes)
        if created_from is not None:
            stmt = stmt.where(i.created_at >= created_from)
        if created_before is not None:
            stmt = stmt.where(i.created_at < created_before)
        async with self.sessions() as session:
            rows = await session.execute(stmt)
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def delete_images(self, image_ids: list[str]) -> int:
        """Remove image records (their files are gone); returns how many were removed."""
        removed = 0
        for start in range(0, len(image_ids), 500):  # stays under SQLite's bound-parameter limit
            chunk = image_ids[start : start + 500]
            async with self._write() as session:
                result = cast(
                    CursorResult[Any], await session.execute(delete(images).where(images.c.id.in_(chunk)))
                )
                removed += result.rowcount
        return removed
