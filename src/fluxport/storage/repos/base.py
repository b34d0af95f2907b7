"""What every repository shares: read sessions, the one-at-a-time write session, group commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from fluxport.storage.writer import GroupCommit


class Repository:
    """Base of the repositories: each reads through `sessions` and writes through `_write()` or
    `_writer` (the writes every request makes, see storage/writer.py)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: GroupCommit,
        write_lock: asyncio.Lock | None,
    ) -> None:
        self.sessions = sessions
        self._writer = writer
        # SQLite's one writer, shared with the group commit; None on PostgreSQL.
        self._write_lock = write_lock

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        if self._write_lock is None:
            async with self.sessions.begin() as session:
                yield session
        else:
            async with self._write_lock, self.sessions.begin() as session:
                yield session
