"""Protocol emulators for the hosted providers: real HTTP servers on loopback.

    from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, Latency

    with FalEmulator(EmulatorConfig(queue=Latency(0.5, 2.0), run=Latency(3.0, 6.0), time_scale=0.01),
                     key="k") as fal:
        settings = Settings(fal_key="k", fal_url=fal.base_url)
        fal.script(Fault(FaultKind.RATE_LIMITED, retry_after=0.1))   # the next submission gets a 429
        fal.config.failure_rate = 0.05                                # then 5 % random faults
        ...
        fal.requests   # every request received (method, path, query, headers, body)
        fal.ledger     # what fal would bill: completed and not cancelled before completing

Configuration (`EmulatorConfig`, mutable at any time through `emulator.config`):
    queue, run       phase durations: seconds, `Latency(p50, p95)` (lognormal) or `f(rng) -> seconds`
    time_scale       multiplies every drawn duration (e.g. 0.01 runs a 5 s generation in 50 ms)
    failure_rate     probability that a submission gets a random fault from `failure_kinds`
    failure_kinds    the `Fault`s to draw from
    hang_s           how long a HANG fault holds the connection
    seed             RNG seed (latencies, failure draws, random seeds)
    price_per_mp     USD per megapixel by endpoint / model, for the ledger
    status_stream    fal: serve GET .../status/stream (SSE) (default True; False answers 404)
    stream_keepalive_s  fal: seconds between keepalive comments on a quiet stream

Faults (`Fault(kind, at=stage, retry_after=, field=, message=)`): `emulator.script(*faults)` queues
them for the next submissions, one each. Kinds: server_error (500), unavailable (503), rate_limited
(429 + Retry-After), hang, reset, malformed, validation (422), missing_images, safety, failed,
aborted (Replicate). HTTP-level kinds strike at `at` = "submit" (default), "status" (every poll,
and the opening of fal's status stream), "stream" (fal's status stream only: reset after the first
event, malformed event, or an error status when opening), "result" or "download"; the others shape
the outcome.

Images are solid colours: `seed_colour(seed + i)` for image i (black for a safety block), so a test
can read the seed back from the pixels.
"""

from tests.emulators.fal import FalEmulator
from tests.emulators.openai_images import OpenAIImagesEmulator
from tests.emulators.replicate import ReplicateEmulator
from tests.emulators.server import (
    BillingEntry,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    Fault,
    FaultKind,
    Latency,
    RecordedRequest,
    seed_colour,
)

__all__ = [
    "BillingEntry",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "FalEmulator",
    "Fault",
    "FaultKind",
    "Latency",
    "OpenAIImagesEmulator",
    "RecordedRequest",
    "ReplicateEmulator",
    "seed_colour",
]
