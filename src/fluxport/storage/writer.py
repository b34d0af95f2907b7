"""Group commit: the record writes of many concurrent requests, committed in one transaction.

Every request writes its records a few times (created, attempt started, attempt finished, images,
finished). One transaction per write made the database the bottleneck under load: each commit is a
round trip to SQLite's thread (several, through aiosqlite) or to PostgreSQL, and SQLite takes one
writer at a time. Here writes queue while a transaction is in progress and the next transaction
commits all of them: unloaded, a write costs one commit as before; under load, dozens share one.

A write's awaitable completes only once its transaction has committed, so each write is as durable
as it was alone. One failing write does not sink the others: a batch that fails is rolled back and
its writes retried one per transaction. A caller that is cancelled while it waits does not take its
write back; it is committed all the same (a record is never lost to a client going away).

SQLite batches run on one dedicated thread with the synchronous driver: one thread hop per batch
instead of one per statement. Other databases run them on the async engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from sqlalchemy import Engine, Executable, Insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# One transaction holds at most this many writes: a burst commits in a few, not in one huge one.
MAX_BATCH = 256


@dataclass(frozen=True)
class Op:
    """One statement of a write and its values (a list: one execution per row). `one_row` demands
    that an UPDATE matched a row, else the write fails with LookupError naming `what`."""

    statement: Executable
    values: dict[str, Any] | list[dict[str, Any]] | None = None
    one_row: bool = False
    what: str = "row"


@dataclass
class _Queued:
    ops: Sequence[Op]
    future: asyncio.Future[Any]
    then: Callable[[list[Any]], Any]


T = TypeVar("T")


def _nothing(outcome: list[Any]) -> None:
    return None


# A batch's outcome: per write, per op the inserted primary key (INSERT) or the rows matched, or
# the exception that failed the write.
Outcomes = list[list[Any] | Exception]


def _execute(conn: Connection, ops: Sequence[Op]) -> list[Any]:
    out: list[Any] = []
    for op in ops:
        result = conn.execute(op.statement, op.values)
        if isinstance(op.values, list):
            out.append(result.rowcount)
        elif isinstance(op.statement, Insert):
            pk = result.inserted_primary_key
            out.append(pk[0] if pk else None)
        else:
            if op.one_row and result.rowcount == 0:
                raise LookupError(f"no such {op.what}")
            out.append(result.rowcount)
    return out


def _batch(conn: Connection, writes: list[Sequence[Op]]) -> Outcomes:
    """All writes in one transaction on `conn`; if that fails, each in its own."""

    def transaction(batch: Sequence[Sequence[Op]]) -> list[list[Any]]:
        with conn.begin():
            return [_execute(conn, ops) for ops in batch]

    try:
        return list(transaction(writes))
    except Exception as exc:
        if len(writes) == 1:
            return [exc]
    outcomes: Outcomes = []
    for write in writes:
        try:
            outcomes.extend(transaction([write]))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


class _SyncRunner:
    """SQLite: the batch on one dedicated thread, through the synchronous driver, on one connection
    that thread keeps open (no pool checkout and reset-on-return rollback per batch); a connection
    that broke is replaced at the next batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxport-db-writer")
        self._conn: Connection | None = None  # used on the executor's thread only

    def _run(self, writes: list[Sequence[Op]]) -> Outcomes:
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            conn = self._conn = self.engine.connect()
        return _batch(conn, writes)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def run(self, writes: list[Sequence[Op]]) -> Outcomes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run, writes)

    async def aclose(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._close)
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        self.engine.dispose()


class _AsyncRunner:
    """PostgreSQL (and other async drivers): the same batch on the async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def run(self, writes: list[Sequence[Op]]) -> Outcomes:
        async with self.engine.connect() as conn:
            return await conn.run_sync(_batch, writes)

    async def aclose(self) -> None:
        return None


@dataclass
class GroupCommit:
    """The queue of writes and the one task that commits them, batch after batch."""

    runner: _SyncRunner | _AsyncRunner
    # SQLite's one writer: held around each batch, shared with the other (ORM) writes.
    lock: asyncio.Lock | None = None
    _pending: list[_Queued] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _closed: bool = False

    @classmethod
    def for_engine(
        cls, engine: AsyncEngine, sync_engine: Callable[[], Engine] | None, lock: asyncio.Lock | None
    ) -> GroupCommit:
        runner: _SyncRunner | _AsyncRunner = (
            _SyncRunner(sync_engine()) if sync_engine is not None else _AsyncRunner(engine)
        )
        return cls(runner, lock)

    @overload
    def write(self, *ops: Op) -> asyncio.Future[None]: ...
    @overload
    def write(self, *ops: Op, then: Callable[[list[Any]], T]) -> asyncio.Future[T]: ...
    def write(self, *ops: Op, then: Callable[[list[Any]], Any] = _nothing) -> asyncio.Future[Any]:
        """Queue a write now (not when awaited); the future completes once it is committed, with
        `then` of the ops' outcomes, or fails. Writes queued in one go share a transaction."""
        if self._closed:
            raise RuntimeError("the database is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Queued(ops, future, then))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="fluxport-group-commit")
        return future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            try:
                if self.lock is None:
                    outcomes = await self.runner.run([q.ops for q in batch])
                else:
                    async with self.lock:
                        outcomes = await self.runner.run([q.ops for q in batch])
            except BaseException as exc:  # the runner itself broke (its thread gone, cancelled)
                log.exception("group commit failed")
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("the write was not made")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for q, outcome in zip(batch, outcomes, strict=True):
                if q.future.done():  # its caller was cancelled; the write was made all the same
                    if isinstance(outcome, Exception):
                        log.error("a write whose caller was gone failed: %r", outcome)
                    continue
                if isinstance(outcome, Exception):
                    q.future.set_exception(outcome)
                else:
                    q.future.set_result(q.then(outcome))

    async def aclose(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._task is not None:
            await asyncio.shield(self._task)
        await self.runner.aclose()
