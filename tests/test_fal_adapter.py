"""FalProvider against the fal queue emulator: mapping, edits, formats, cancellation, faults, retries."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from fluxport.domain.errors import ContentPolicyViolation, InvalidRequest, ProviderFailure, RateLimited
from fluxport.domain.job import ImageJob, Operation, ReferenceImage, Size
from fluxport.providers._hosted import HttpPolicy
from fluxport.providers.base import Behaviour, ProgressEvent, Provider
from fluxport.providers.fal import FalProvider, _lines
from fluxport.settings import Settings
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, seed_colour

POLICY = HttpPolicy(
    timeout_s=0.5,
    poll_interval_s=0.01,
    max_poll_interval_s=0.03,
    max_retry_after_s=1.0,
    cancel_timeout_s=1.0,
)


def config(**overrides: Any) -> EmulatorConfig:
    return EmulatorConfig(**{"queue": 0.01, "run": 0.03, "hang_s": 1.5, "seed": 1, **overrides})


@pytest.fixture(scope="module")
def server() -> Iterator[FalEmulator]:
    with FalEmulator(config(), key="k") as emulator:
        yield emulator


@pytest.fixture
def emu(server: FalEmulator) -> FalEmulator:
    server.reset(config())
    return server


@pytest.fixture
async def fal(emu: FalEmulator) -> AsyncIterator[FalProvider]:
    provider = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=POLICY)
    yield provider
    await provider.aclose()


def make_job(**kw: Any) -> ImageJob:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "model": "flux.2-dev",
        "operation": Operation.GENERATE,
        "prompt": "a lighthouse at dusk",
        "size": Size(1024, 768),
        "seed": 1234,
        "seed_given": True,
    }
    return ImageJob(**(fields | kw))


def reference(fmt: str, colour: tuple[int, int, int]) -> ReferenceImage:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(buf, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return ReferenceImage(data=buf.getvalue(), format=fmt, width=96, height=64)


def pixel(content: object) -> tuple[int, ...]:
    assert isinstance(content, bytes)
    with Image.open(io.BytesIO(content)) as im:
        return tuple(im.convert("RGB").getpixel((5, 5)))  # type: ignore[arg-type]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def submitted(emu: FalEmulator) -> dict[str, Any]:
    posts = emu.requests_to("POST")
    assert len(posts) == 1
    body = posts[0].body
    assert isinstance(body, dict)
    return body


# ---------------------------------------------------------------------------------------------


def test_is_a_provider_and_reports_configuration() -> None:
    provider = FalProvider(Settings(fal_key="k"))
    assert isinstance(provider, Provider)
    assert provider.state("flux.2-dev").configured
    assert provider.state("flux.2-dev-flash").configured
    assert not provider.state("flux.2-dummy").configured
    assert not FalProvider(Settings(fal_key=None)).state("flux.2-dev").configured
    caps = provider.capabilities("flux.2-dev")
    assert caps.max_images_per_call == 4
    assert caps.native_output_formats == {"png", "jpeg", "webp"}
    assert caps.supports_cfg_scale and caps.supports_prompt_enhancement
    assert "num_inference_steps" in caps.extras
    assert "num_inference_steps" not in provider.capabilities("flux.2-dev-flash").extras


async def test_maps_every_parameter_and_returns_downloaded_images(emu: FalEmulator, fal: FalProvider) -> None:
    events: list[ProgressEvent] = []
    job = make_job(
        n=2,
        cfg_scale=4.5,
        prompt_enhancement=True,
        output_format="webp",
        extras={
            "acceleration": "high",
            "num_inference_steps": 20,
            "enable_safety_checker": False,
            "brand_new_fal_field": {"x": 1},  # unknown: passed through
        },
    )
    result = await fal.generate(job, events.append)

    post = emu.requests_to("POST")[0]
    assert post.path == "/fal-ai/flux-2"
    assert post.headers["authorization"] == "Key k"
    body = submitted(emu)
    assert body == {
        "prompt": "a lighthouse at dusk",
        "image_size": {"width": 1024, "height": 768},
        "num_images": 2,
        "output_format": "webp",
        "seed": 1234,
        "guidance_scale": 4.5,
        "enable_prompt_expansion": True,
        "acceleration": "high",
        "num_inference_steps": 20,
        "enable_safety_checker": False,
        "brand_new_fal_field": {"x": 1},
    }
    rid = result.provider_request_id
    assert rid and rid in emu.jobs
    # Status and result live under owner/app only; every URL came from the submit answer.
    [stream] = emu.requests_to("GET", "/status/stream")
    assert stream.path == f"/fal-ai/flux-2/requests/{rid}/status/stream"
    assert stream.query.get("logs") == "1" and stream.headers["authorization"] == "Key k"
    assert emu.requests_to("GET", "/status") == []  # the stream said COMPLETED: no polling
    assert [r.path for r in emu.requests_to("GET", rid)] == [f"/fal-ai/flux-2/requests/{rid}"]

    assert [(i.width, i.height, i.format) for i in result.images] == [(1024, 768, "webp")] * 2
    assert close(pixel(result.images[0].content), seed_colour(1234))
    assert close(pixel(result.images[1].content), seed_colour(1235))
    assert result.images[0].seed == 1234
    assert result.revised_prompt is not None and result.revised_prompt.startswith("a lighthouse at dusk,")
    assert result.normalization == {
        "size": Behaviour.RENAMED,
        "n": Behaviour.RENAMED,
        "seed": Behaviour.PASSTHROUGH,
        "cfg_scale": Behaviour.RENAMED,
        "prompt_enhancement": Behaviour.RENAMED,
        "output_format": Behaviour.PASSTHROUGH,
        "extras": Behaviour.PASSTHROUGH,
    }
    t = result.timings
    assert t.submitted_s is not None and t.first_status_s is not None and t.first_byte_s is not None
    assert 0 < t.submitted_s <= t.first_status_s <= t.first_byte_s <= t.total_s
    assert t.generation_s == pytest.approx(0.03, abs=0.005)
    stages = [e.stage for e in events]
    assert stages[-2:] == ["decoding", "done"]
    # Billed: it completed; 2 images of 0.75 MP round up to 1 MP each.
    [entry] = emu.ledger
    assert (entry.request_id, entry.megapixels) == (rid, 2)
    assert entry.usd == pytest.approx(0.024)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (Size(1024, 1024), (1024, 1024)),
        (Size(256, 256), (512, 512)),  # below fal's minimum: scaled up
        (Size(4096, 2048), (2048, 1024)),  # above the maximum: scaled down, shape kept
        (Size(1000, 600), (1008, 608)),  # off the 16 px grid: snapped
        (Size(4000, 250), (2048, 512)),  # no fit for 16:1: the short side wins, the long one clamps
    ],
)
async def test_size_is_fitted_to_fal_limits(
    emu: FalEmulator, fal: FalProvider, size: Size, expected: tuple[int, int]
) -> None:
    result = await fal.generate(make_job(size=size), lambda e: None)
    image_size = submitted(emu)["image_size"]
    assert (image_size["width"], image_size["height"]) == expected
    assert (result.images[0].width, result.images[0].height) == expected
    exact = expected == (size.width, size.height)
    assert result.normalization["size"] == (Behaviour.RENAMED if exact else Behaviour.CONVERTED)


@pytest.mark.parametrize(
    ("model", "endpoint"), [("flux.2-dev", "fal-ai/flux-2"), ("flux.2-dev-flash", "fal-ai/flux-2/flash")]
)
async def test_edit_sends_four_references_as_data_uris(
    emu: FalEmulator, fal: FalProvider, model: str, endpoint: str
) -> None:
    refs = (
        reference("png", (255, 0, 0)),
        reference("jpeg", (0, 255, 0)),
        reference("webp", (0, 0, 255)),
        reference("png", (9, 9, 9)),
    )
    result = await fal.generate(
        make_job(model=model, operation=Operation.EDIT, references=refs), lambda e: None
    )
    post = emu.requests_to("POST")[0]
    assert post.path == f"/{endpoint}/edit"
    urls = submitted(emu)["image_urls"]
    assert len(urls) == 4
    for url, ref in zip(urls, refs, strict=True):
        head, data = url.split(",", 1)
        assert head == f"data:image/{ref.format};base64"
        assert base64.b64decode(data) == ref.data
    # Edit and flash requests share the flux-2 request namespace.
    rid = result.provider_request_id
    waits = emu.requests_to("GET", "/status") + emu.requests_to("GET", "/status/stream")
    assert waits and all(r.path.startswith(f"/fal-ai/flux-2/requests/{rid}/status") for r in waits)
    assert result.normalization["image"] == Behaviour.CONVERTED


async def test_flash_refuses_steps_instead_of_dropping_them(emu: FalEmulator, fal: FalProvider) -> None:
    job = make_job(model="flux.2-dev-flash", extras={"num_inference_steps": 8})
    with pytest.raises(InvalidRequest) as err:
        await fal.generate(job, lambda e: None)
    assert err.value.param == "num_inference_steps"
    assert emu.requests == []
    await fal.generate(
        make_job(model="flux.2-dev-flash", extras={"enable_safety_checker": True}), lambda e: None
    )
    assert emu.requests_to("POST")[0].path == "/fal-ai/flux-2/flash"


@pytest.mark.parametrize(
    ("wanted", "compression", "sent", "behaviour"),
    [
        ("png", None, "png", Behaviour.PASSTHROUGH),
        ("jpeg", None, "jpeg", Behaviour.PASSTHROUGH),
        ("webp", None, "webp", Behaviour.PASSTHROUGH),
        ("avif", None, "png", Behaviour.CONVERTED),
        ("gif", None, "png", Behaviour.CONVERTED),
        ("jpeg", 40, "png", Behaviour.CONVERTED),  # fal has no quality: lossless for the service
    ],
)
async def test_output_formats(
    emu: FalEmulator, fal: FalProvider, wanted: str, compression: int | None, sent: str, behaviour: Behaviour
) -> None:
    result = await fal.generate(
        make_job(output_format=wanted, output_compression=compression), lambda e: None
    )
    assert submitted(emu)["output_format"] == sent
    assert result.images[0].format == sent
    assert result.normalization["output_format"] == behaviour
    if compression is not None:
        assert result.normalization["output_compression"] == Behaviour.EMULATED


async def test_sync_mode_data_uris_are_decoded(emu: FalEmulator, fal: FalProvider) -> None:
    result = await fal.generate(make_job(extras={"sync_mode": True}), lambda e: None)
    assert submitted(emu)["sync_mode"] is True
    assert emu.requests_to("GET", ".png") == []  # nothing fetched from the CDN
    assert result.images[0].format == "png" and close(pixel(result.images[0].content), seed_colour(1234))


async def test_cancelling_the_call_cancels_the_request_and_it_is_not_billed(
    emu: FalEmulator, fal: FalProvider
) -> None:
    emu.config.run = 0.4
    task = asyncio.create_task(fal.generate(make_job(), lambda e: None))
    deadline = time.monotonic() + 2
    while not emu.requests_to("GET", "/status/stream"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [job] = emu.jobs.values()
    [cancel] = emu.requests_to("PUT")
    assert cancel.path == f"/fal-ai/flux-2/requests/{job.id}/cancel"
    assert cancel.headers["authorization"] == "Key k"
    assert job.cancelled
    await asyncio.sleep(max(0.0, job.done_at - time.monotonic()) + 0.05)
    assert emu.ledger == []


async def test_cancelling_during_the_submit_still_cancels_the_job(emu: FalEmulator, fal: FalProvider) -> None:
    """Cancelled before fal has answered the submit: the job is created all the same (the submit is
    on its way), so the adapter waits for its answer and cancels it, rather than leave it billed."""
    emu.config.run = 0.4
    task = asyncio.create_task(fal.generate(make_job(), lambda e: None))
    for _ in range(3):
        await asyncio.sleep(0)  # the submit has started; its answer has not come
    assert not emu.requests_to("GET")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [job] = emu.jobs.values()
    [cancel] = emu.requests_to("PUT")
    assert cancel.path == f"/fal-ai/flux-2/requests/{job.id}/cancel"
    assert job.cancelled
    await asyncio.sleep(max(0.0, job.done_at - time.monotonic()) + 0.05)
    assert emu.ledger == []


async def test_a_poll_failure_also_cancels_the_request(emu: FalEmulator, fal: FalProvider) -> None:
    emu.config.run = 1.0
    emu.script(Fault(FaultKind.UNAVAILABLE, at="status"))
    with pytest.raises(ProviderFailure):
        await fal.generate(make_job(), lambda e: None)
    assert len(emu.requests_to("GET", "/status")) == 1 + POLICY.transient_retries
    assert len(emu.requests_to("PUT", "/cancel")) == 1
    assert all(job.cancelled for job in emu.jobs.values())
    assert emu.ledger == []


@pytest.mark.parametrize(
    ("fault", "error", "param"),
    [
        (Fault(FaultKind.SERVER_ERROR), ProviderFailure, None),
        (Fault(FaultKind.UNAVAILABLE), ProviderFailure, None),
        (Fault(FaultKind.HANG), ProviderFailure, None),
        (Fault(FaultKind.HANG, at="status"), ProviderFailure, None),
        (Fault(FaultKind.RESET), ProviderFailure, None),
        (Fault(FaultKind.RESET, at="result"), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED, at="status"), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED, at="result"), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED, at="download"), ProviderFailure, None),
        (Fault(FaultKind.SERVER_ERROR, at="download"), ProviderFailure, None),
        (Fault(FaultKind.FAILED), ProviderFailure, None),
        (Fault(FaultKind.MISSING_IMAGES), ProviderFailure, None),
        (Fault(FaultKind.SAFETY), ContentPolicyViolation, "prompt"),
        (Fault(FaultKind.VALIDATION, field="image_size"), InvalidRequest, "size"),
        (Fault(FaultKind.VALIDATION, field="image_urls"), InvalidRequest, "image"),
        (Fault(FaultKind.VALIDATION, at="submit", field="guidance_scale"), InvalidRequest, "cfg_scale"),
    ],
    ids=lambda v: f"{v.kind}@{v.stage}-{v.field}" if isinstance(v, Fault) else None,
)
async def test_faults_map_to_typed_errors(
    emu: FalEmulator, fal: FalProvider, fault: Fault, error: type[Exception], param: str | None
) -> None:
    emu.script(fault)
    with pytest.raises(error) as raised:
        await fal.generate(make_job(), lambda e: None)
    assert type(raised.value) is error
    if param is not None:
        assert getattr(raised.value, "param", None) == param


async def test_fal_validation_of_a_real_value_names_the_fluxport_param(
    emu: FalEmulator, fal: FalProvider
) -> None:
    with pytest.raises(InvalidRequest) as err:
        await fal.generate(make_job(cfg_scale=25.0), lambda e: None)
    assert err.value.param == "cfg_scale"
    assert "between 0 and 20" in err.value.message
    assert emu.ledger == []


async def test_rate_limit_is_retried_after_retry_after(emu: FalEmulator, fal: FalProvider) -> None:
    emu.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.1)] * 2)
    t0 = time.monotonic()
    result = await fal.generate(make_job(), lambda e: None)
    assert len(result.images) == 1
    posts = emu.requests_to("POST")
    assert len(posts) == 3
    assert posts[1].at - posts[0].at >= 0.1 and posts[2].at - posts[1].at >= 0.1
    assert time.monotonic() - t0 >= 0.2


async def test_rate_limit_exhausted_raises_rate_limited(emu: FalEmulator, fal: FalProvider) -> None:
    emu.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.05)] * (POLICY.rate_limit_retries + 1))
    with pytest.raises(RateLimited) as err:
        await fal.generate(make_job(), lambda e: None)
    assert err.value.retry_after == pytest.approx(0.05)
    assert len(emu.requests_to("POST")) == POLICY.rate_limit_retries + 1


async def test_long_retry_after_is_passed_up_without_sleeping(emu: FalEmulator, fal: FalProvider) -> None:
    emu.script(Fault(FaultKind.RATE_LIMITED, retry_after=30))
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as err:
        await fal.generate(make_job(), lambda e: None)
    assert err.value.retry_after == 30 and err.value.headers["retry-after"] == "30"
    assert time.monotonic() - t0 < 0.5
    assert len(emu.requests_to("POST")) == 1


async def test_wrong_key_is_a_clear_configuration_error(emu: FalEmulator) -> None:
    provider = FalProvider(Settings(fal_key="wrong", fal_url=emu.base_url), policy=POLICY)
    try:
        with pytest.raises(ProviderFailure) as err:
            await provider.generate(make_job(), lambda e: None)
    finally:
        await provider.aclose()
    assert err.value.code == "provider_auth_failed"
    assert "401" in err.value.message and "key" in err.value.message.lower()
    assert emu.requests_to("POST")[0].headers["authorization"] == "Key wrong"


async def test_the_emulator_speaks_the_queue_protocol(emu: FalEmulator) -> None:
    """The emulator itself, raw: the facts the adapter relies on must hold for the tests to mean anything."""
    emu.config.queue, emu.config.run = 0.15, 0.15
    auth = {"Authorization": "Key k"}
    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        assert (await http.post("/fal-ai/flux-2/flash", json={"prompt": "x"})).status_code == 401
        sub = (await http.post("/fal-ai/flux-2/flash", json={"prompt": "x"}, headers=auth)).json()
        rid = sub["request_id"]
        assert sub["status_url"] == f"{emu.base_url}/fal-ai/flux-2/requests/{rid}/status"
        assert (
            await http.get(f"/fal-ai/flux-2/flash/requests/{rid}/status", headers=auth)
        ).status_code == 404
        queued = await http.get(
            f"/fal-ai/flux-2/requests/{rid}/status", params={"logs": "false"}, headers=auth
        )
        assert queued.status_code == 202 and queued.json()["status"] == "IN_QUEUE"
        assert "queue_position" in queued.json() and "logs" not in queued.json()
        await asyncio.sleep(0.18)
        running = await http.get(
            f"/fal-ai/flux-2/requests/{rid}/status", params={"logs": "true"}, headers=auth
        )
        assert running.status_code == 202 and running.json()["status"] == "IN_PROGRESS"
        assert "queue_position" not in running.json() and running.json()["logs"]
        await asyncio.sleep(0.15)
        done = await http.get(f"/fal-ai/flux-2/requests/{rid}/status", params={"logs": "0"}, headers=auth)
        assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
        assert done.json()["logs"] is None and done.json()["metrics"]["inference_time"] > 0
        late = await http.put(f"/fal-ai/flux-2/requests/{rid}/cancel", headers=auth)
        assert (late.status_code, late.json()["status"]) == (400, "ALREADY_COMPLETED")
        assert (await http.post(f"/fal-ai/flux-2/requests/{rid}/cancel", headers=auth)).status_code in (
            404,
            405,
        )
    assert len(emu.ledger) == 1


# -- the status stream -------------------------------------------------------------------------


_RANK = {"queued": 0, "step": 1, "decoding": 2, "done": 3}


def in_order(events: list[ProgressEvent]) -> bool:
    """Progress never repeats or goes back, however the statuses came (stream, then polls)."""
    keys = [(_RANK[e.stage], e.step) for e in events]
    return all(a < b for a, b in itertools.pairwise(keys))


async def test_completion_is_noticed_on_the_stream_not_by_polling(emu: FalEmulator) -> None:
    emu.config.run = 0.3
    slow_polls = HttpPolicy(timeout_s=1.0, poll_interval_s=2.0, max_poll_interval_s=2.0)
    provider = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=slow_polls)
    events: list[ProgressEvent] = []
    try:
        t0 = time.monotonic()
        result = await provider.generate(make_job(), events.append)
        elapsed = time.monotonic() - t0
    finally:
        await provider.aclose()
    # Polling every 2 s would notice after 2 s at best; the stream says COMPLETED as it happens.
    assert elapsed < 1.0  # 0.31 s of work (loaded CI machines add a little)
    [job] = emu.jobs.values()
    assert len(emu.requests_to("GET", "/status/stream")) == 1
    assert emu.requests_to("GET", "/status") == []
    result_get = emu.requests_to("GET", f"/requests/{job.id}")[0]
    assert result_get.at - job.done_at < 0.25
    stages = [e.stage for e in events]
    assert stages[0] in ("queued", "step") and "step" in stages and stages[-2:] == ["decoding", "done"]
    assert any(e.stage == "step" and e.step > 0 and e.total == 28 for e in events)  # logs streamed
    assert in_order(events)
    t = result.timings
    assert t.submitted_s is not None and t.first_status_s is not None
    assert 0 < t.submitted_s <= t.first_status_s <= t.queued_s
    assert t.generation_s == pytest.approx(0.3, abs=0.01)
    assert emu.open_streams == 0


async def test_no_stream_falls_back_to_polling(emu: FalEmulator, fal: FalProvider) -> None:
    emu.config.status_stream = False  # the endpoint answers 404
    emu.config.run = 0.1
    events: list[ProgressEvent] = []
    result = await fal.generate(make_job(), events.append)
    assert len(result.images) == 1
    [stream] = emu.requests_to("GET", "/status/stream")
    polls = emu.requests_to("GET", "/status")
    assert polls and polls[0].at >= stream.at
    assert result.timings.first_status_s is not None
    assert [e.stage for e in events][-2:] == ["decoding", "done"] and in_order(events)


async def test_polling_only_when_streaming_is_turned_off(emu: FalEmulator) -> None:
    provider = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=POLICY, status_stream=False)
    try:
        await provider.generate(make_job(), lambda e: None)
    finally:
        await provider.aclose()
    assert emu.requests_to("GET", "/status/stream") == [] and emu.requests_to("GET", "/status")


@pytest.mark.parametrize(
    "kind",
    [
        FaultKind.RESET,  # the connection drops after the first event
        FaultKind.MALFORMED,  # an event that is not JSON
        FaultKind.UNAVAILABLE,  # 503 when opening it
        FaultKind.HANG,  # no answer: the read timeout fires
    ],
)
async def test_a_broken_stream_falls_back_to_polling(
    emu: FalEmulator, fal: FalProvider, kind: FaultKind
) -> None:
    emu.config.run = 0.2
    emu.script(Fault(kind, at="stream"))
    events: list[ProgressEvent] = []
    result = await fal.generate(make_job(), events.append)
    assert close(pixel(result.images[0].content), seed_colour(1234))
    assert len(emu.requests_to("GET", "/status/stream")) == 1
    assert emu.requests_to("GET", "/status")  # polling took over and saw it complete
    assert emu.requests_to("PUT") == []
    stages = [e.stage for e in events]
    assert stages.count("queued") <= 1 and stages[-2:] == ["decoding", "done"]
    assert in_order(events)
    assert len(emu.ledger) == 1


async def test_cancelling_during_the_stream_cancels_promptly_and_is_not_billed(
    emu: FalEmulator, fal: FalProvider
) -> None:
    emu.config.run = 1.0
    streaming = asyncio.Event()
    task = asyncio.create_task(
        fal.generate(make_job(), lambda e: streaming.set() if e.stage == "step" else None)
    )
    await asyncio.wait_for(streaming.wait(), 2)  # IN_PROGRESS came on the stream
    t_cancel = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [job] = emu.jobs.values()
    [cancel] = emu.requests_to("PUT")
    assert cancel.path == f"/fal-ai/flux-2/requests/{job.id}/cancel"
    assert cancel.at - t_cancel < 0.2
    assert job.cancelled and emu.requests_to("GET", "/status") == []
    deadline = time.monotonic() + 1
    while emu.open_streams:  # the server saw the stream closed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(max(0.0, job.done_at - time.monotonic()) + 0.05)
    assert emu.ledger == []


async def test_the_overall_deadline_holds_while_streaming(emu: FalEmulator) -> None:
    emu.config.run = 2.0
    policy = HttpPolicy(timeout_s=5.0, max_wait_s=0.3, cancel_timeout_s=1.0)
    provider = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=policy)
    t0 = time.monotonic()
    try:
        with pytest.raises(ProviderFailure, match=r"no result within 0.3 s"):
            await provider.generate(make_job(), lambda e: None)
    finally:
        await provider.aclose()
    assert time.monotonic() - t0 < 1.0
    assert len(emu.requests_to("PUT", "/cancel")) == 1
    assert all(job.cancelled for job in emu.jobs.values())


async def test_sse_parsing() -> None:
    from fluxport.providers.fal import _sse_data

    async def lines() -> AsyncIterator[str]:
        for line in [
            ": keepalive",
            "",
            "event: status",
            "id: 7",
            'data: {"status":',
            'data:"IN_QUEUE"}',
            "",
            "retry: 100",
            "data",
            "",
            'data: {"status": "COMPLETED"}',  # unterminated: dropped
        ]:
            yield line

    assert [d async for d in _sse_data(lines())] == ['{"status":\n"IN_QUEUE"}', ""]


async def test_the_emulator_streams_status(emu: FalEmulator) -> None:
    """The status stream, raw: the same bodies as the status endpoint, one per change, then closed."""
    emu.config.queue, emu.config.run, emu.config.stream_keepalive_s = 0.1, 0.2, 0.04
    auth = {"Authorization": "Key k"}

    async def read(url: str, **params: str) -> tuple[httpx.Response, list[str]]:
        async with http.stream("GET", url, params=params, headers=auth) as response:
            return response, [line async for line in response.aiter_lines()]

    def data(lines: list[str]) -> list[dict[str, Any]]:
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]

    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        sub = (await http.post("/fal-ai/flux-2/flash", json={"prompt": "x"}, headers=auth)).json()
        stream_url = sub["status_url"] + "/stream"
        assert (await http.get(stream_url)).status_code == 401
        response, lines = await read(stream_url, logs="0")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = data(lines)
        assert [e["status"] for e in events] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
        assert events[0]["queue_position"] == 0 and "logs" not in events[0]
        assert events[1]["logs"] is None and events[2]["metrics"]["inference_time"] > 0
        assert 2 <= lines.count(": keepalive") <= 10  # quiet phases: comments, not a busy loop
        # Completed: the same body as the status endpoint, at once.
        status = (await http.get(sub["status_url"], params={"logs": "1"}, headers=auth)).json()
        _, lines = await read(stream_url, logs="1")
        [done] = data(lines)
        assert done.keys() == status.keys() and done["status"] == "COMPLETED" and done["logs"]

        # A cancelled request completes at once, with the status endpoint's error fields.
        emu.config.queue = 5.0
        sub = (await http.post("/fal-ai/flux-2", json={"prompt": "x"}, headers=auth)).json()
        stream_url = sub["status_url"] + "/stream"

        async def cancel_soon() -> None:
            await asyncio.sleep(0.1)
            await http.put(sub["cancel_url"], headers=auth)

        t0 = time.monotonic()
        _, (_, lines) = await asyncio.gather(cancel_soon(), read(stream_url, logs="1"))
        assert time.monotonic() - t0 < 0.5
        events = data(lines)
        status = (await http.get(sub["status_url"], headers=auth)).json()
        assert [e["status"] for e in events] == ["IN_QUEUE", "COMPLETED"]
        assert events[-1]["error_type"] == status["error_type"] == "client_cancelled"
        assert events[-1]["error"] == status["error"]

        # Faults at "status" strike when the stream is opened; turned off, it is not found.
        emu.script(Fault(FaultKind.UNAVAILABLE, at="status"))
        sub = (await http.post("/fal-ai/flux-2", json={"prompt": "x"}, headers=auth)).json()
        assert (await http.get(sub["status_url"] + "/stream", headers=auth)).status_code == 503
        emu.config.status_stream = False
        assert (await http.get(stream_url, headers=auth)).status_code == 404
    assert emu.open_streams == 0


async def test_waits_beyond_max_streams_poll(emu: FalEmulator) -> None:
    emu.config.run = 0.2
    provider = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=POLICY, max_streams=2)
    try:
        results = await asyncio.gather(*(provider.generate(make_job(), lambda e: None) for _ in range(4)))
    finally:
        await provider.aclose()
    assert len(results) == 4
    assert len(emu.requests_to("GET", "/status/stream")) == 2
    polled = {r.path.split("/")[-2] for r in emu.requests_to("GET", "/status")}
    assert len(polled) == 2
    assert provider._streams == 0


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"data: a\n\n"], ["data: a", ""]),
        ([b"data: a\r", b"\n\r\n"], ["data: a", ""]),  # a CRLF split across chunks is one line end
        ([b"data: a\rdata: b\r\r"], ["data: a", "data: b", ""]),  # CR alone ends a line too
        ([b"da", b"ta: x\n", b"\n"], ["data: x", ""]),
        ([b"tail"], ["tail"]),  # an unterminated last line still comes out
        ([b"\xc3", b"\xa9\n"], ["\u00e9"]),  # a UTF-8 character split across chunks
    ],
)
async def test_status_stream_lines_split_on_every_sse_line_end(chunks: list[bytes], lines: list[str]) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    assert [line async for line in _lines(stream())] == lines


@pytest.mark.parametrize("via_stream", [True, False])
async def test_no_progress_logs_are_asked_for_when_nobody_follows_the_steps(
    emu: FalEmulator, via_stream: bool
) -> None:
    """A plain API call (report_steps=False) needs fal's state changes, not its step logs: fewer
    and smaller status events. The call completes the same."""
    emu.config.run = 0.3
    emu.config.status_stream = via_stream
    fal = FalProvider(Settings(fal_key="k", fal_url=emu.base_url), policy=POLICY)
    events: list[ProgressEvent] = []
    try:
        result = await fal.generate(make_job(report_steps=False), events.append)
    finally:
        await fal.aclose()
    status = emu.requests_to("GET", "/status/stream" if via_stream else "/status")
    assert status and all(r.query.get("logs") == "0" for r in status)
    assert len(result.images) == 1 and close(pixel(result.images[0].content), seed_colour(1234))
    assert not any(e.stage == "step" and e.step > 0 for e in events)
