"""Deliver the winning attempt: convert to the exact size and format, store, record, respond."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fluxport import media
from fluxport.domain.errors import ProviderFailure
from fluxport.domain.job import GeneratedImage, ImageJob, file_extension
from fluxport.domain.pricing import Usage
from fluxport.gateway.dispatch import Routed
from fluxport.gateway.types import Completed, Ledger, PreparedRequest, StoredImage
from fluxport.metrics import Metrics
from fluxport.providers.base import Behaviour, Capabilities, ProviderResult
from fluxport.storage.blobs import BlobStore, new_image_id
from fluxport.storage.db import Database, ImageRow


class Deliverer:
    """Turns a provider's images into the client's: the last stage before the response."""

    def __init__(self, db: Database, blobs: BlobStore, metrics: Metrics) -> None:
        self.db = db
        self.blobs = blobs
        self.metrics = metrics

    async def deliver(self, p: PreparedRequest, routed: Routed, t0: float, ledger: Ledger) -> Completed:
        """Convert to the exact size and format, save every image, then record success."""
        job = p.job
        provider, result = routed.provider, routed.attempt.result
        caps = provider.capabilities(job.model)
        ids = [new_image_id() for _ in result.images]
        ext = file_extension(job.output_format)
        encoded: list[media.EncodedImage | None] = [None] * len(result.images)

        def encoder(index: int, img: GeneratedImage) -> Callable[[], bytes]:
            def encode() -> bytes:
                enc = media.finalize_image(img, job.size, job.output_format, job.output_compression)
                encoded[index] = enc
                return enc.data

            return encode

        # Checked or converted, then written, in one hop to the blob store's writer threads.
        saved = await asyncio.gather(
            *(self.blobs.save(ids[i], encoder(i, img), ext) for i, img in enumerate(result.images)),
            return_exceptions=True,
        )
        failed = next((out for out in saved if isinstance(out, BaseException)), None)
        if failed is not None:
            for out in saved:
                if isinstance(out, str):
                    await self.blobs.delete(out)
            if isinstance(failed, ValueError):  # the provider's bytes are not a usable image
                raise ProviderFailure(f"{provider.name} returned an unusable image: {failed}") from failed
            raise failed
        paths = [out for out in saved if isinstance(out, str)]
        stored: list[StoredImage] = []
        rows: list[ImageRow] = []
        # One whole-second timestamp for `created` and the records: links expire at created + ttl.
        created = int(time.time())
        for index, (img, enc) in enumerate(zip(result.images, encoded, strict=True)):
            assert enc is not None  # saved: encoded first
            image_id = ids[index]
            rows.append(
                ImageRow(
                    id=image_id,
                    request_id=job.request_id,
                    index=index,
                    path=paths[index],
                    format=enc.format,
                    mime=enc.mime,
                    width=enc.width,
                    height=enc.height,
                    bytes=len(enc.data),
                    created_at=datetime.fromtimestamp(created, UTC),
                )
            )
            stored.append(StoredImage(image_id, f"/images/{image_id}.{ext}", enc, _seed_of(img, job, index)))
        # Megapixels as the winning provider bills them; the cost is every attempt's (a failed
        # attempt the provider billed counts too).
        billed = routed.attempt.usage
        usage = Usage(
            images=len(stored),
            input_megapixels=billed.input_megapixels,
            output_megapixels=billed.output_megapixels,
            cost_usd=ledger.total,
        )
        attempts = ledger.queue_deferred()
        images_added = self.db.add_images(rows)
        finished = self.db.finish_request(
            job.request_id,
            status="succeeded",
            provider=provider.name,
            error=None,
            queued_ms=routed.attempt.queued_ms,
            generation_ms=routed.attempt.generation_ms,
            ttfb_ms=routed.attempt.ttfb_ms,
            total_ms=(time.monotonic() - t0) * 1000,
            width=job.size.width,
            height=job.size.height,
            images=len(stored),
            revised_prompt=result.revised_prompt,
            cost_usd=ledger.total,
        )
        # The attempts, the images and the outcome: queued together, one transaction. The images'
        # fsync (FLUXPORT_IMAGE_FSYNC=after_answer) waits for it: both would hit the disk at once.
        try:
            await asyncio.gather(*attempts, images_added, finished)
        finally:
            self.blobs.sync_soon()
        self.metrics.observe_request(
            job.model, job.operation.value, "succeeded", time.monotonic() - t0, ledger.total
        )
        return Completed(
            request_id=job.request_id,
            model=job.model,
            provider=provider.name,
            images=stored,
            size=job.size,
            output_format=job.output_format,
            response_format=job.response_format,
            revised_prompt=result.revised_prompt,
            normalization=_report(p, caps, result),
            attempts=routed.tried,
            usage=usage,
            created=created,
        )


def _report(p: PreparedRequest, caps: Capabilities, result: ProviderResult) -> dict[str, str]:
    """param -> passthrough / renamed / converted / emulated (or ignored): x-fluxport-normalization."""
    job, req = p.job, p.request
    report: dict[str, str] = {k: v.value for k, v in result.normalization.items()}
    if p.size.adjusted or any(img.size != job.size for img in result.images):
        report["size"] = Behaviour.CONVERTED.value
    report.setdefault("size", Behaviour.PASSTHROUGH.value)
    size_given = bool(req.size and req.size.strip().lower() != "auto")
    for name in ("aspect_ratio", "resolution"):
        if getattr(req, name):
            report[name] = "ignored" if size_given and p.size.source == "size" else Behaviour.CONVERTED.value
    native = job.output_format in caps.native_output_formats
    report["output_format"] = (
        report.get("output_format", Behaviour.PASSTHROUGH.value) if native else Behaviour.CONVERTED.value
    )
    if job.output_compression is not None:
        report.setdefault(
            "output_compression", Behaviour.PASSTHROUGH.value if native else Behaviour.CONVERTED.value
        )
    report["response_format"] = Behaviour.EMULATED.value
    if job.partial_images:
        report["partial_images"] = partial_images_behaviour(caps)
    report.setdefault("n", Behaviour.PASSTHROUGH.value)
    for name in req.ignored:
        report[name] = "ignored"
    return report


def _seed_of(img: GeneratedImage, job: ImageJob, index: int) -> int | None:
    return img.seed if img.seed is not None else job.image_seed(index)


def partial_images_behaviour(caps: Capabilities) -> str:
    """How a streamed request's partial_images reach a provider: passthrough where it sends real
    partial images, emulated (as 0: only the completed images) where it cannot."""
    return Behaviour.PASSTHROUGH.value if caps.partial_images else Behaviour.EMULATED.value
