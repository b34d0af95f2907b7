"""ReplicateProvider against the Replicate emulator: mapping, formats, waiting, cancellation, faults."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from fluxport.domain.errors import ContentPolicyViolation, InvalidRequest, ProviderFailure, RateLimited
from fluxport.domain.job import ImageJob, Operation, ReferenceImage, Size
from fluxport.providers._hosted import HttpPolicy
from fluxport.providers.base import Behaviour, Provider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.settings import Settings
from tests.emulators import EmulatorConfig, Fault, FaultKind, ReplicateEmulator, seed_colour

POLICY = HttpPolicy(
    timeout_s=0.5,
    poll_interval_s=0.01,
    max_poll_interval_s=0.03,
    max_retry_after_s=1.0,
    cancel_timeout_s=1.0,
)
CREATE = "/v1/models/black-forest-labs/flux-2-dev/predictions"


def config(**overrides: Any) -> EmulatorConfig:
    return EmulatorConfig(**{"queue": 0.01, "run": 0.03, "hang_s": 2.0, "seed": 1, **overrides})


@pytest.fixture(scope="module")
def server() -> Iterator[ReplicateEmulator]:
    with ReplicateEmulator(config(), token="t") as emulator:
        yield emulator


@pytest.fixture
def emu(server: ReplicateEmulator) -> ReplicateEmulator:
    server.reset(config())
    return server


@pytest.fixture
async def rep(emu: ReplicateEmulator) -> AsyncIterator[ReplicateProvider]:
    provider = ReplicateProvider(
        Settings(replicate_api_token="t", replicate_url=emu.base_url), policy=POLICY, wait_s=1
    )
    yield provider
    await provider.aclose()


def make_job(**kw: Any) -> ImageJob:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "model": "flux.2-dev",
        "operation": Operation.GENERATE,
        "prompt": "a lighthouse at dusk",
        "size": Size(1024, 1024),
        "seed": 77,
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


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def created_input(emu: ReplicateEmulator) -> dict[str, Any]:
    posts = emu.requests_to("POST", "/predictions")
    assert len(posts) == 1
    body = posts[0].body
    assert isinstance(body, dict) and set(body) == {"input"}
    return dict(body["input"])


# ---------------------------------------------------------------------------------------------


def test_is_a_provider_and_declares_what_it_cannot_do() -> None:
    provider = ReplicateProvider(Settings(replicate_api_token="t"))
    assert isinstance(provider, Provider)
    assert provider.state("flux.2-dev").configured
    assert not provider.state("flux.2-dev-flash").configured
    assert not ReplicateProvider(Settings(replicate_api_token=None)).state("flux.2-dev").configured
    caps = provider.capabilities("flux.2-dev")
    assert caps.max_images_per_call == 1 and caps.max_references == 4
    assert not caps.supports_cfg_scale and not caps.supports_prompt_enhancement
    assert caps.native_output_formats == {"png", "jpeg", "webp"}
    assert {"go_fast", "disable_safety_checker", "output_quality"} <= caps.extras


async def test_maps_every_parameter_and_returns_the_downloaded_image(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    job = make_job(
        output_format="jpeg",
        output_compression=70,
        extras={
            "go_fast": False,
            "disable_safety_checker": True,
            "brand_new_input": "x",  # unknown: passed through
        },
    )
    result = await rep.generate(job, lambda e: None)

    post = emu.requests_to("POST", "/predictions")[0]
    assert post.path == CREATE
    assert post.headers["authorization"] == "Bearer t"
    assert post.headers["prefer"] == "wait=1"
    assert post.headers["cancel-after"].endswith("s")
    assert created_input(emu) == {
        "prompt": "a lighthouse at dusk",
        "seed": 77,
        "aspect_ratio": "1:1",
        "output_format": "jpg",
        "output_quality": 70,
        "go_fast": False,
        "disable_safety_checker": True,
        "brand_new_input": "x",
    }
    [image] = result.images
    assert (image.width, image.height, image.format, image.seed) == (1024, 1024, "jpeg", 77)
    assert close(pixel(image.content), seed_colour(77))
    assert result.provider_request_id in emu.predictions
    assert result.normalization == {
        "seed": Behaviour.PASSTHROUGH,
        "n": Behaviour.PASSTHROUGH,
        "size": Behaviour.CONVERTED,
        "output_format": Behaviour.RENAMED,
        "output_compression": Behaviour.RENAMED,
        "extras": Behaviour.PASSTHROUGH,
    }
    # Finished inside the Prefer: wait window: no polling was needed.
    assert emu.requests_to("GET", f"/v1/predictions/{result.provider_request_id}") == []
    t = result.timings
    assert t.submitted_s is not None and t.first_byte_s is not None
    assert 0 < t.submitted_s <= t.first_byte_s <= t.total_s
    assert t.generation_s == pytest.approx(0.03, abs=0.005)
    [entry] = emu.ledger
    assert entry.request_id == result.provider_request_id and entry.megapixels == 1


@pytest.mark.parametrize(
    ("size", "sent", "produced"),
    [
        (Size(1024, 1024), {"aspect_ratio": "1:1"}, (1024, 1024)),
        (Size(1365, 768), {"aspect_ratio": "16:9"}, (1376, 768)),  # the catalog's 16:9 ~1 MP
        (Size(887, 1182), {"aspect_ratio": "3:4"}, (896, 1184)),
        (Size(512, 512), {"aspect_ratio": "custom", "width": 512, "height": 512}, (512, 512)),
        (Size(2048, 2048), {"aspect_ratio": "custom", "width": 1440, "height": 1440}, (1440, 1440)),
        (Size(1536, 640), {"aspect_ratio": "custom", "width": 1440, "height": 608}, (1440, 608)),
        (Size(2000, 100), {"aspect_ratio": "custom", "width": 1440, "height": 256}, (1440, 256)),
    ],
)
async def test_size_maps_to_the_enum_or_custom(
    emu: ReplicateEmulator,
    rep: ReplicateProvider,
    size: Size,
    sent: dict[str, Any],
    produced: tuple[int, int],
) -> None:
    result = await rep.generate(make_job(size=size), lambda e: None)
    inp = created_input(emu)
    assert {k: inp[k] for k in ("aspect_ratio", "width", "height") if k in inp} == sent
    assert (result.images[0].width, result.images[0].height) == produced


async def test_edit_sends_four_references_as_data_uris(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    refs = (
        reference("png", (255, 0, 0)),
        reference("jpeg", (0, 255, 0)),
        reference("webp", (0, 0, 255)),
        reference("png", (9, 9, 9)),
    )
    result = await rep.generate(make_job(operation=Operation.EDIT, references=refs), lambda e: None)
    assert emu.requests_to("POST", "/predictions")[0].path == CREATE  # same model, no edit route
    images = created_input(emu)["input_images"]
    assert len(images) == 4
    for uri, ref in zip(images, refs, strict=True):
        head, data = uri.split(",", 1)
        assert head == f"data:image/{ref.format};base64" and base64.b64decode(data) == ref.data
    assert result.normalization["image"] == Behaviour.CONVERTED


@pytest.mark.parametrize(
    ("wanted", "sent", "fmt", "behaviour"),
    [
        ("png", "png", "png", Behaviour.PASSTHROUGH),
        ("webp", "webp", "webp", Behaviour.PASSTHROUGH),
        ("jpeg", "jpg", "jpeg", Behaviour.RENAMED),
        ("avif", "png", "png", Behaviour.CONVERTED),
        ("gif", "png", "png", Behaviour.CONVERTED),
    ],
)
async def test_output_formats(
    emu: ReplicateEmulator, rep: ReplicateProvider, wanted: str, sent: str, fmt: str, behaviour: Behaviour
) -> None:
    result = await rep.generate(make_job(output_format=wanted), lambda e: None)
    inp = created_input(emu)
    assert inp["output_format"] == sent and "output_quality" not in inp
    assert result.images[0].format == fmt
    assert result.normalization["output_format"] == behaviour


@pytest.mark.parametrize(
    ("job", "param"),
    [
        (make_job(cfg_scale=3.0), "cfg_scale"),
        (make_job(prompt_enhancement=True), "prompt_enhancement"),
        (make_job(n=2), "n"),
    ],
)
async def test_what_replicate_cannot_honour_is_refused_not_dropped(
    emu: ReplicateEmulator, rep: ReplicateProvider, job: ImageJob, param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        await rep.generate(job, lambda e: None)
    assert err.value.param == param
    assert emu.requests == []


async def test_polls_urls_get_when_the_wait_window_ends(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    emu.config.queue = 1.1  # still "starting" when Prefer: wait=1 runs out
    result = await rep.generate(make_job(), lambda e: None)
    assert len(emu.requests_to("POST", "/predictions")) == 1
    gets = emu.requests_to("GET", f"/v1/predictions/{result.provider_request_id}")
    assert gets and all(g.headers["authorization"] == "Bearer t" for g in gets)
    assert result.timings.queued_s >= 1.0


async def test_cancelling_the_call_cancels_the_prediction_and_it_is_not_billed(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    emu.config.run = 1.4
    task = asyncio.create_task(rep.generate(make_job(), lambda e: None))
    deadline = time.monotonic() + 3
    while not emu.requests_to("GET", ""):  # the wait window ended; now polling
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [prediction] = emu.predictions.values()
    [cancel] = emu.requests_to("POST", "/cancel")
    assert cancel.path == f"/v1/predictions/{prediction.id}/cancel"
    assert cancel.headers["authorization"] == "Bearer t"
    assert prediction.status(time.monotonic()) == "canceled"
    await asyncio.sleep(max(0.0, prediction.done_at - time.monotonic()) + 0.05)
    assert emu.ledger == []


@pytest.mark.parametrize(
    ("fault", "error", "param"),
    [
        (Fault(FaultKind.SERVER_ERROR), ProviderFailure, None),
        (Fault(FaultKind.UNAVAILABLE), ProviderFailure, None),
        (Fault(FaultKind.HANG), ProviderFailure, None),
        (Fault(FaultKind.RESET), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED), ProviderFailure, None),
        (Fault(FaultKind.MALFORMED, at="download"), ProviderFailure, None),
        (Fault(FaultKind.SERVER_ERROR, at="download"), ProviderFailure, None),
        (Fault(FaultKind.RESET, at="download"), ProviderFailure, None),
        (Fault(FaultKind.MISSING_IMAGES), ProviderFailure, None),
        (Fault(FaultKind.FAILED), ProviderFailure, None),
        (Fault(FaultKind.ABORTED), ProviderFailure, None),
        (Fault(FaultKind.SAFETY), ContentPolicyViolation, "prompt"),
        (Fault(FaultKind.VALIDATION, field="width"), InvalidRequest, "size"),
        (Fault(FaultKind.VALIDATION, field="input_images"), InvalidRequest, "image"),
    ],
    ids=lambda v: f"{v.kind}@{v.stage}-{v.field}" if isinstance(v, Fault) else None,
)
async def test_faults_map_to_typed_errors(
    emu: ReplicateEmulator, rep: ReplicateProvider, fault: Fault, error: type[Exception], param: str | None
) -> None:
    emu.script(fault)
    with pytest.raises(error) as raised:
        await rep.generate(make_job(), lambda e: None)
    assert type(raised.value) is error
    if param is not None:
        assert getattr(raised.value, "param", None) == param


async def test_a_failing_poll_is_a_provider_failure_and_cancels(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    emu.config.queue = 1.6  # the create answers "starting"; the polls then fail
    emu.script(Fault(FaultKind.UNAVAILABLE, at="status"))
    with pytest.raises(ProviderFailure):
        await rep.generate(make_job(), lambda e: None)
    assert len(emu.requests_to("POST", "/cancel")) == 1
    [prediction] = emu.predictions.values()
    assert prediction.status(time.monotonic()) == "aborted"  # cancelled before it started


async def test_replicate_validation_names_the_field_the_client_sent(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    # The client sent Replicate's own width: the error names width, not fluxport's size.
    with pytest.raises(InvalidRequest) as err:
        await rep.generate(make_job(extras={"width": 2000, "height": 1024}), lambda e: None)
    assert err.value.param == "width"
    assert created_input(emu)["aspect_ratio"] == "custom"
    # Replicate's output_quality sent as is is reported as output_quality ...
    with pytest.raises(InvalidRequest) as err:
        await rep.generate(make_job(output_format="webp", extras={"output_quality": 150}), lambda e: None)
    assert err.value.param == "output_quality"
    # ... while fluxport's output_compression, renamed output_quality on the wire, keeps its name.
    emu.script(Fault(FaultKind.VALIDATION, field="output_quality"))
    with pytest.raises(InvalidRequest) as err:
        await rep.generate(make_job(output_format="webp", output_compression=90), lambda e: None)
    assert err.value.param == "output_compression"


async def test_rate_limit_is_retried_after_retry_after(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    emu.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.1)] * 2)
    result = await rep.generate(make_job(), lambda e: None)
    assert len(result.images) == 1
    posts = emu.requests_to("POST", "/predictions")
    assert len(posts) == 3
    assert posts[1].at - posts[0].at >= 0.1 and posts[2].at - posts[1].at >= 0.1


async def test_rate_limit_exhausted_raises_rate_limited(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    emu.script(*[Fault(FaultKind.RATE_LIMITED, retry_after=0.05)] * (POLICY.rate_limit_retries + 1))
    with pytest.raises(RateLimited) as err:
        await rep.generate(make_job(), lambda e: None)
    assert err.value.retry_after == pytest.approx(0.05)
    assert len(emu.requests_to("POST", "/predictions")) == POLICY.rate_limit_retries + 1


async def test_rate_limit_without_header_reads_resets_in(
    emu: ReplicateEmulator, rep: ReplicateProvider
) -> None:
    # No Retry-After: the body says "Your rate limit resets in ~30s.", too long to sleep here.
    emu.script(Fault(FaultKind.RATE_LIMITED, retry_after=None))
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as err:
        await rep.generate(make_job(), lambda e: None)
    assert err.value.retry_after == 30
    assert time.monotonic() - t0 < 0.5


async def test_wrong_token_is_a_clear_configuration_error(emu: ReplicateEmulator) -> None:
    provider = ReplicateProvider(
        Settings(replicate_api_token="nope", replicate_url=emu.base_url), policy=POLICY, wait_s=1
    )
    try:
        with pytest.raises(ProviderFailure) as err:
            await provider.generate(make_job(), lambda e: None)
    finally:
        await provider.aclose()
    assert err.value.code == "provider_auth_failed"
    assert "401" in err.value.message and "key" in err.value.message.lower()


async def test_the_emulator_speaks_the_predictions_protocol(emu: ReplicateEmulator) -> None:
    """The emulator itself, raw: 201 on create, Prefer: wait honoured, statuses, cancel by POST."""
    emu.config.queue, emu.config.run = 0.0, 0.1
    auth = {"Authorization": "Bearer t"}
    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        assert (await http.post(CREATE, json={"input": {"prompt": "x"}})).status_code == 401
        waited = await http.post(CREATE, json={"input": {"prompt": "x"}}, headers=auth | {"Prefer": "wait=1"})
        assert waited.status_code == 201 and waited.headers["preference-applied"] == "wait=1"
        assert waited.json()["status"] == "succeeded" and waited.json()["output"].startswith(emu.base_url)
        created = await http.post(CREATE, json={"input": {"prompt": "x"}}, headers=auth)
        body = created.json()
        assert created.status_code == 201 and body["status"] == "processing" and body["output"] is None
        assert created.headers["location"] == body["urls"]["get"]
        assert (await http.put(body["urls"]["cancel"], headers=auth)).status_code == 405
        cancelled = await http.post(body["urls"]["cancel"], headers=auth)
        assert cancelled.json()["status"] == "canceled"
        bad = await http.post(CREATE, json={"input": {"prompt": "x", "aspect_ratio": "7:3"}}, headers=auth)
        assert bad.status_code == 422 and bad.json()["invalid_fields"][0]["field"] == "input.aspect_ratio"
    await asyncio.sleep(0.15)
    assert [e.request_id for e in emu.ledger] == [waited.json()["id"]]
