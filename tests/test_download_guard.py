"""The download guard: result image URLs are untrusted input from the provider's answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from fluxport.domain.errors import ProviderFailure
from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers import fal as fal_module
from fluxport.providers import replicate as replicate_module
from fluxport.providers._hosted import HttpPolicy
from fluxport.providers.download_guard import DownloadGuard, RefusedURL
from fluxport.providers.fal import FalProvider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.settings import Settings
from tests.emulators import EmulatorConfig, FalEmulator, Fault, FaultKind, ReplicateEmulator

POLICY = HttpPolicy(timeout_s=2.0, poll_interval_s=0.01, max_poll_interval_s=0.03, transient_retries=0)


def fake_dns(table: dict[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        host = host.rstrip(".")
        if host not in table:
            raise OSError("name or service not known")
        return table[host]

    return resolve


PUBLIC = {"cdn.fal.media": ["151.101.1.1"], "replicate.delivery": ["34.120.1.2", "2600:1901::1"]}


def guard(dns: dict[str, list[str]] | None = None, **kw: Any) -> DownloadGuard:
    return DownloadGuard.of(
        ["fal.media", "replicate.delivery"],
        ["http://127.0.0.1:8123", "https://api.replicate.com"],
        resolver=fake_dns(PUBLIC if dns is None else dns),
        **kw,
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.fal.media/files/x.png",
        "https://replicate.delivery/pbxt/abc/out.webp",
        "https://CDN.FAL.MEDIA./files/x.png",  # case and a trailing dot do not matter
        "http://127.0.0.1:8123/cdn/1.png",  # the configured provider URL's own origin
        "https://api.replicate.com/files/1",
    ],
)
async def test_allowed_urls(url: str) -> None:
    await guard().check(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://cdn.fal.media/x.png", "only https"),
        ("ftp://cdn.fal.media/x.png", "not https"),
        ("file:///etc/passwd", "not https"),
        ("https://evil.example.com/x.png", "not an allowed download host"),
        ("https://fal.media.evil.com/x.png", "not an allowed download host"),
        ("https://notfal.media/x.png", "not an allowed download host"),
        ("https://10.0.0.1/x.png", "not an allowed download host"),
        ("https://169.254.169.254/latest/meta-data", "not an allowed download host"),
        ("https://[::1]/x.png", "not an allowed download host"),
        ("http://127.0.0.1:8124/cdn/1.png", "only https"),  # another port than the configured one
        ("https://127.0.0.1:8123/cdn/1.png", "not an allowed download host"),  # another scheme
        ("https://user:pw@cdn.fal.media/x.png", "credentials"),
        ("https://unknown.fal.media/x.png", "does not resolve"),
        ("https://", "not https"),
    ],
)
async def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(RefusedURL, match=reason):
        await guard().check(url)


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.251",  # multicast
        "240.0.0.1",  # reserved
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::",
    ],
)
async def test_an_allowed_host_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    # One bad address among good ones is enough: the connection could use any of them.
    dns = {"cdn.fal.media": ["151.101.1.1", address]}
    with pytest.raises(RefusedURL, match="non-public address"):
        await guard(dns).check("https://cdn.fal.media/x.png")


async def test_configured_domain_list_comes_from_settings() -> None:
    settings = Settings(download_hosts=["images.example.org"], fal_url="http://127.0.0.1:9999")
    g = DownloadGuard.for_provider(settings, ("fal.media",), settings.fal_url)
    assert g.allowed_host("a.images.example.org") and not g.allowed_host("fal.media")
    assert g.trusted == {("http", "127.0.0.1", 9999)}  # its own base URL only, not another's


async def test_each_provider_allows_its_own_image_hosts_by_default() -> None:
    settings = Settings()
    fal_guard = DownloadGuard.for_provider(settings, fal_module.DOWNLOAD_HOSTS, settings.fal_url)
    rep_guard = DownloadGuard.for_provider(settings, replicate_module.DOWNLOAD_HOSTS, settings.replicate_url)
    assert fal_guard.allowed_host("v3.fal.media") and not fal_guard.allowed_host("replicate.delivery")
    assert rep_guard.allowed_host("replicate.delivery") and not rep_guard.allowed_host("fal.media")
    assert ("https", "api.replicate.com", 443) in rep_guard.trusted


# --------------------------------------------------------------------------------------------
# Through the adapters, against the emulators


def job(**kw: Any) -> ImageJob:
    fields: dict[str, Any] = {
        "request_id": "req-guard",
        "model": "flux.2-dev",
        "operation": Operation.GENERATE,
        "prompt": "a lighthouse",
        "size": Size(512, 512),
        "seed": 7,
        "seed_given": True,
    }
    return ImageJob(**(fields | kw))


def emu_config(**kw: Any) -> EmulatorConfig:
    return EmulatorConfig(**{"queue": 0.0, "run": 0.01, "seed": 1, **kw})


@pytest.fixture(scope="module")
def fal_emu() -> Iterator[FalEmulator]:
    with FalEmulator(emu_config(), key="k") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def rep_emu() -> Iterator[ReplicateEmulator]:
    with ReplicateEmulator(emu_config(), token="t") as emulator:
        yield emulator


@pytest.fixture
async def fal(fal_emu: FalEmulator) -> AsyncIterator[FalProvider]:
    fal_emu.reset(emu_config())
    provider = FalProvider(Settings(fal_key="k", fal_url=fal_emu.base_url), policy=POLICY)
    yield provider
    await provider.aclose()


@pytest.fixture
async def rep(rep_emu: ReplicateEmulator) -> AsyncIterator[ReplicateProvider]:
    rep_emu.reset(emu_config())
    provider = ReplicateProvider(
        Settings(replicate_api_token="t", replicate_url=rep_emu.base_url), policy=POLICY, wait_s=1
    )
    yield provider
    await provider.aclose()


BAD_ORIGINS = [
    ("http://fal.media", "only https"),
    ("https://evil.example.com", "not an allowed download host"),
    ("https://10.0.0.1", "not an allowed download host"),
    ("https://169.254.169.254", "not an allowed download host"),
    ("http://127.0.0.2:80", "only https"),
]


@pytest.mark.parametrize(("origin", "reason"), BAD_ORIGINS)
async def test_fal_result_urls_outside_the_policy_are_refused(
    fal_emu: FalEmulator, fal: FalProvider, origin: str, reason: str
) -> None:
    fal_emu.config.cdn_base = origin
    with pytest.raises(ProviderFailure, match=f"refused to download.*{reason}"):
        await fal.generate(job(), lambda e: None)
    assert not fal_emu.requests_to("GET", ".png"), "nothing may be fetched from a refused URL"


@pytest.mark.parametrize(("origin", "reason"), BAD_ORIGINS)
async def test_replicate_result_urls_outside_the_policy_are_refused(
    rep_emu: ReplicateEmulator, rep: ReplicateProvider, origin: str, reason: str
) -> None:
    rep_emu.config.cdn_base = origin
    with pytest.raises(ProviderFailure, match=f"refused to download.*{reason}"):
        await rep.generate(job(), lambda e: None)


async def test_an_allowed_name_on_a_private_address_is_refused(rep_emu: ReplicateEmulator) -> None:
    # The operator allows 10.0.0.1 as a download host by name; its address is still private.
    rep_emu.reset(emu_config(cdn_base="https://10.0.0.1"))
    settings = Settings(
        replicate_api_token="t", replicate_url=rep_emu.base_url, download_hosts=["10.0.0.1", "localhost"]
    )
    provider = ReplicateProvider(settings, policy=POLICY, wait_s=1)
    try:
        with pytest.raises(ProviderFailure, match=r"non-public address 10\.0\.0\.1"):
            await provider.generate(job(), lambda e: None)
        rep_emu.config.cdn_base = "https://localhost:1"
        with pytest.raises(ProviderFailure, match="non-public address"):
            await provider.generate(job(), lambda e: None)
    finally:
        await provider.aclose()


async def test_a_redirect_within_the_policy_is_followed(fal_emu: FalEmulator, fal: FalProvider) -> None:
    fal_emu.config.cdn_redirect = "{self}"
    result = await fal.generate(job(), lambda e: None)
    assert len(result.images) == 1
    assert len(fal_emu.requests_to("GET", ".png")) == 2  # the redirect, then the image


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:1/secret",
        "https://evil.example.com/x.png",
        "file:///etc/passwd",
    ],
)
async def test_a_redirect_outside_the_policy_is_refused(
    fal_emu: FalEmulator, fal: FalProvider, target: str
) -> None:
    fal_emu.config.cdn_redirect = target
    with pytest.raises(ProviderFailure, match="refused to download"):
        await fal.generate(job(), lambda e: None)


async def test_redirect_loops_end(fal_emu: FalEmulator, fal: FalProvider) -> None:
    fal_emu.config.cdn_redirect = "/cdn/loop.png"  # relative, same origin, never served
    with pytest.raises(ProviderFailure):
        await fal.generate(job(), lambda e: None)


async def test_sync_mode_data_uris_stay_allowed(fal_emu: FalEmulator, fal: FalProvider) -> None:
    fal_emu.config.cdn_base = "https://evil.example.com"  # not used: the image comes inline
    result = await fal.generate(job(extras={"sync_mode": True}), lambda e: None)
    assert len(result.images) == 1


async def test_downloads_are_size_capped(fal_emu: FalEmulator) -> None:
    fal_emu.reset(emu_config())
    small = HttpPolicy(timeout_s=2.0, poll_interval_s=0.01, max_image_bytes=100, transient_retries=0)
    provider = FalProvider(Settings(fal_key="k", fal_url=fal_emu.base_url), policy=small)
    try:
        with pytest.raises(ProviderFailure, match="exceeds"):
            await provider.generate(job(), lambda e: None)
    finally:
        await provider.aclose()


async def test_downloads_are_timed_out_as_a_whole(fal_emu: FalEmulator) -> None:
    fal_emu.reset(emu_config(hang_s=3.0))
    fal_emu.script(Fault(FaultKind.HANG, at="download"))
    slow = HttpPolicy(timeout_s=5.0, poll_interval_s=0.01, download_timeout_s=0.3, cancel_timeout_s=0.5)
    provider = FalProvider(Settings(fal_key="k", fal_url=fal_emu.base_url), policy=slow)
    try:
        with pytest.raises(ProviderFailure, match=r"download took over 0\.3 s"):
            await provider.generate(job(), lambda e: None)
    finally:
        await provider.aclose()
