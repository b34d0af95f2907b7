"""The values that travel down the request path: a prepared request, its ledger, its outcome."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fluxport import media
from fluxport.catalog import ModelSpec
from fluxport.domain.job import ImageJob, Size
from fluxport.domain.pricing import Usage
from fluxport.domain.request import ImageParams
from fluxport.domain.sizing import SizeDecision
from fluxport.providers.base import Provider

log = logging.getLogger("fluxport.service")


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


@dataclass
class PreparedRequest:
    """A validated request, ready to run: the job and the providers that can serve it, in order."""

    job: ImageJob
    spec: ModelSpec
    providers: list[Provider]
    size: SizeDecision
    request: ImageParams
    record: dict[str, Any]
    explicit: list[str] | None = None  # the client's own provider order, if it gave one
    api_key_id: str | None = None  # the API key the request is recorded (and billed) against


@dataclass
class StoredImage:
    id: str
    path: str  # URL path, e.g. /images/<id>.png
    image: media.EncodedImage
    seed: int | None


@dataclass
class Completed:
    request_id: str
    model: str
    provider: str
    images: list[StoredImage]
    size: Size
    output_format: str
    response_format: str
    revised_prompt: str | None
    normalization: dict[str, str]
    usage: Usage  # what the request cost: every attempt the providers billed
    attempts: list[str] = field(default_factory=list)
    created: int = 0

    def normalization_text(self) -> str:
        """The report as x-fluxport-normalization says it: "param=behaviour, ..." by name."""
        return ", ".join(f"{k}={v}" for k, v in sorted(self.normalization.items()))


@dataclass(frozen=True)
class DryRun:
    provider: str  # the provider that would serve the request now
    providers: list[tuple[str, float]]  # the ranked plan with each provider's estimated cost
    usage: Usage  # the estimate on the chosen provider
    size: Size


@dataclass
class Ledger:
    """What the providers billed for one request so far, across every attempt, and the attempt
    records still to write (with the request's outcome, in one transaction)."""

    total: float = 0.0
    deferred: list[Callable[[], asyncio.Future[None]]] = field(default_factory=list)

    def charge(self, usd: float) -> None:
        self.total = round(self.total + usd, 6)

    def queue_deferred(self) -> list[asyncio.Future[None]]:
        """Queue the deferred attempt records now; their futures."""
        deferred, self.deferred = self.deferred, []
        return [write() for write in deferred]

    async def settle(self) -> None:
        """Write the attempt records not yet queued (a failure is logged, not raised: the
        request's own outcome is recorded next all the same)."""
        for outcome in await asyncio.gather(*self.queue_deferred(), return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.error("an attempt record could not be written: %r", outcome)


def log_failed_write(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a record could not be written: %r", future.exception())


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they have finished cancelling (their providers cancel upstream)."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None
