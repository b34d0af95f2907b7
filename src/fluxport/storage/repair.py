"""Crash repair at start-up and the expiry sweep of stored image files.

Start-up (before serving): requests a crash left queued/running become interrupted; temp files of
interrupted atomic writes are deleted; image files without a record are deleted (no client ever got
a link to one: the record is committed before the response is sent); records of unexpired images
whose file is missing, or shorter or longer than recorded (torn by a power cut before its fsync),
are removed, with such a file. Expired images keep their record (for accounting) but lose
their file: the sweep deletes it at start-up and then periodically.

In an S3-compatible bucket (storage/blobs/s3.py) only the expiry part applies: a PUT is atomic, so
nothing is torn or left half-written, and objects without a record are left alone, since another
replica sharing the bucket may be about to commit one (a bucket lifecycle rule removes strays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fluxport.storage.blobs import BlobStore, LocalBlobStore
from fluxport.storage.db import Database

__all__ = ["RepairReport", "expiry_cutoff", "repair_on_start", "sweep_expired", "sweep_forever"]

log = logging.getLogger("fluxport.repair")


@dataclass
class RepairReport:
    interrupted: int = 0
    temp_files: int = 0
    orphan_files: int = 0
    missing_files: int = 0  # records removed because their file was gone
    expired_files: int = 0  # files of expired images deleted
    # request id -> how many of its images had lost their file
    damaged_requests: dict[str, int] = field(default_factory=dict)
    # Images created before this had expired and were swept: where the periodic sweep goes on.
    cutoff: datetime = field(default_factory=lambda: datetime.now(UTC))


def expiry_cutoff(ttl_s: int, now: datetime | None = None) -> datetime:
    """Images created before this instant have expired."""
    return (now or datetime.now(UTC)) - timedelta(seconds=ttl_s)


def _unlink(paths: list[Path]) -> int:
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _in_flight_cutoff(in_flight_s: float | None) -> datetime | None:
    return None if in_flight_s is None else datetime.now(UTC) - timedelta(seconds=in_flight_s)


async def repair_on_start(
    db: Database, blobs: BlobStore, *, ttl_s: int, in_flight_s: float | None = None
) -> RepairReport:
    """Make the database and the blob store consistent again; run before serving. Logs what it
    repaired. `in_flight_s`: where replicas share the database, how long a live request can be in
    flight (only older ones are interrupted); None: this is the only server on it."""
    report = RepairReport()
    report.interrupted = await db.mark_interrupted(_in_flight_cutoff(in_flight_s))
    cutoff = report.cutoff = expiry_cutoff(ttl_s)
    if not isinstance(blobs, LocalBlobStore):
        await _repair_object_store(db, blobs, report)
        return report
    files, temps = await asyncio.to_thread(blobs.scan)
    report.temp_files = await asyncio.to_thread(_unlink, temps)

    missing: list[str] = []
    expired: list[Path] = []
    damaged: dict[str, int] = defaultdict(int)
    recorded: set[str] = set()
    torn: list[Path] = []
    for image_id, request_id, path, created_at, size in await db.image_paths():
        recorded.add(path)
        if created_at < cutoff:
            if path in files:
                expired.append(blobs.resolve(path))
        elif files.get(path) != size:
            missing.append(image_id)
            damaged[request_id] += 1
            if path in files:
                torn.append(blobs.resolve(path))
    orphans = [blobs.resolve(p) for p in sorted(files.keys() - recorded)]
    await asyncio.to_thread(_unlink, torn)
    report.orphan_files = await asyncio.to_thread(_unlink, orphans)
    report.expired_files = await asyncio.to_thread(_unlink, expired)
    if missing:
        report.missing_files = await db.delete_images(missing)
    report.damaged_requests = dict(damaged)

    if report.interrupted:
        log.warning("repair: marked %d requests left in flight as interrupted", report.interrupted)
    if report.temp_files:
        log.warning("repair: deleted %d temp files of interrupted writes", report.temp_files)
    if report.orphan_files:
        log.warning("repair: deleted %d image files that had no record", report.orphan_files)
    for request_id, lost in sorted(damaged.items()):
        request = await db.get_request(request_id)
        log.warning(
            "repair: request %s lost %d of its %s images (file missing or torn); their records were removed",
            request_id,
            lost,
            request.images if request is not None else "?",
        )
    if report.expired_files:
        log.info("repair: deleted %d expired image files", report.expired_files)
    return report


async def _repair_object_store(db: Database, blobs: BlobStore, report: RepairReport) -> None:
    """An object store's share of the repair: delete the expired images' objects still there
    (one listing of the prefix, which holds about one TTL's worth of images, then bulk deletes)."""
    stored = await blobs.inventory()
    expired = [path for _, _, path, created_at, _ in await db.image_paths() if created_at < report.cutoff]
    report.expired_files = await blobs.delete_many([path for path in expired if path in stored])
    if report.interrupted:
        log.warning("repair: marked %d requests left in flight as interrupted", report.interrupted)
    if report.expired_files:
        log.info("repair: deleted %d expired images from %s", report.expired_files, blobs.describe())


async def sweep_expired(
    db: Database, blobs: BlobStore, *, ttl_s: int, since: datetime | None
) -> tuple[int, datetime]:
    """Delete the files of images that expired since the last sweep (created in [since, cutoff));
    the records stay. Returns (files deleted, the new cutoff: the next sweep's `since`)."""
    cutoff = expiry_cutoff(ttl_s)
    rows = await db.image_paths(created_from=since, created_before=cutoff)
    deleted = await blobs.delete_many([path for _, _, path, _, _ in rows])
    if deleted:
        log.info("sweep: deleted %d expired image files", deleted)
    return deleted, cutoff


async def sweep_forever(
    db: Database,
    blobs: BlobStore,
    *,
    ttl_s: int,
    interval_s: float,
    since: datetime,
    in_flight_s: float | None = None,
) -> None:
    """The periodic sweep (a lifespan task); `since`: the start-up repair's cutoff. With replicas
    sharing the database (`in_flight_s` set), it also interrupts the requests a replica that died
    left in flight, once they are older than any live request can be."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if in_flight_s is not None and (
                stale := await db.mark_interrupted(_in_flight_cutoff(in_flight_s))
            ):
                log.warning("sweep: %d requests left in flight by a replica that is gone: interrupted", stale)
            _, since = await sweep_expired(db, blobs, ttl_s=ttl_s, since=since)
        except Exception:  # a failed sweep is retried next time; it must not end the task
            log.exception("sweep: failed; retrying in %g s", interval_s)
