"""The web pages and the playground: plain HTTP first, then a real browser (Debian's chromium, Playwright).

Screenshots go to test-artifacts/web/ (git-ignored); look at them after a change to the pages.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from fluxport.domain.errors import RateLimited
from fluxport.domain.job import ImageJob, Operation, ReferenceImage, Size
from fluxport.live import LocalWindows
from fluxport.providers.fal import FalProvider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.settings import Settings
from fluxport.web.ratelimit import RateLimiter
from tests.conftest import LiveServer, start_server
from tests.imagefactory import png_bytes

CHROMIUM = os.environ.get("FLUXPORT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
SMALL = {"model": "flux.2-dummy", "size": "256x256"}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with nothing configured (only flux.2-dummy) and a generous playground limit."""
    live = start_server(tmp_path_factory.mktemp("web"), playground_rate_per_minute=1000)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose playground allows two submissions per minute per client."""
    live = start_server(tmp_path_factory.mktemp("web-limited"), playground_rate_per_minute=2)
    yield live
    live.stop()


def _form(**fields: Any) -> dict[str, tuple[None, str]]:
    return {k: (None, str(v)) for k, v in fields.items()}


def _events(server: LiveServer, url: str) -> list[tuple[str, dict[str, Any]]]:
    """Read a job's Server-Sent Events to the end: (event, data) pairs."""
    out: list[tuple[str, dict[str, Any]]] = []
    kind = "message"
    with httpx.stream("GET", server.url + url, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


# -- pages over plain HTTP (what a client without JavaScript gets) -------------------------------------


def test_catalog_lists_every_model_with_providers_state_and_price(web: LiveServer) -> None:
    r = httpx.get(web.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    for model in ("flux.2-dev", "flux.2-dev-flash", "flux.2-dummy"):
        assert f'href="/models/{model}"' in html
    assert "Output is noise." in html
    assert "Best for:" in html
    assert "not configured" in html and "configured</span>" in html
    assert "set FAL_KEY" in html  # how to configure a provider that is not
    assert "from $0.012/MP" in html  # fal's flux.2-dev price, from the catalog
    assert "from $0.005/MP" in html  # fal's flash price
    assert 'class="skip" href="#main"' in html and 'id="main"' in html
    assert 'name="viewport"' in html


def test_model_page_has_every_section(web: LiveServer) -> None:
    html = httpx.get(web.url + "/models/flux.2-dev").text
    for heading in (
        "Overview",
        "Strengths",
        "Limitations",
        "Best for",
        "Provider rankings",
        "Providers and pricing",
        "Pricing notes",
        "Parameters",
        "Sizes by resolution tier",
        "Normalisation per provider",
        "Code",
    ):
        assert f">{heading}</h" in html, heading
    assert "Accurate text rendering" in html  # a strength from the catalog
    # Nothing recorded for flux.2-dev: the rankings table is still there, columns and all, with
    # one row saying so.
    rankings = html.split('id="rankings"', 1)[1].split("</section>", 1)[0]
    for column in ("p50", "p95", "Success rate", "TTFB p50"):
        assert f'<th scope="col">{column}</th>' in rankings, column
    assert "No requests in the last 30 days" in rankings
    assert "rounded up to the next whole megapixel" in html
    # The size table: the seeds' 1K shapes, and 0.5K / 2K scaled from them.
    for size in ("1365×768", "887×1182", "682×384", "2730×1536"):
        assert size in html, size
    # The normalisation table, per provider.
    for provider in ("local", "fal", "replicate"):
        assert f'<th scope="col">{provider}</th>' in html
    assert "enable_prompt_expansion" in html and "input_images" in html
    # Code examples point at this server and this model.
    assert f"{web.url}/v1/images/generations" in html
    code = unescape(html.split('id="code"', 1)[1])
    assert f'base_url="{web.url}/v1"' in code and f'baseURL: "{web.url}/v1"' in code
    assert code.count('model="flux.2-dev"') == 2 and code.count('model: "flux.2-dev"') == 2


def test_model_page_by_alias_and_unknown_model(web: LiveServer) -> None:
    r = httpx.get(web.url + "/models/black-forest-labs%2FFLUX.2-dev")
    assert r.status_code == 200 and "<h1>FLUX.2 [dev]</h1>" in r.text
    r = httpx.get(web.url + "/models/flux.9")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert "The model &#39;flux.9&#39; does not exist" in r.text


def test_model_page_rankings_fill_in_from_recorded_requests(web: LiveServer) -> None:
    r = httpx.post(
        web.api + "/images/generations",
        json={**SMALL, "prompt": "for the stats", "response_format": "b64_json"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    html = httpx.get(web.url + "/models/flux.2-dummy").text
    rankings = html.split('id="rankings"', 1)[1].split("</section>", 1)[0]
    assert "No requests in the last" not in rankings
    assert re.search(r'<th scope="row">local</th><td>[\d.]+ m?s</td>', rankings), rankings
    assert "100.0 %" in rankings


def test_playground_offers_only_the_dummy_when_nothing_is_configured(web: LiveServer) -> None:
    html = httpx.get(web.url + "/playground").text
    assert re.findall(r'<option value="([^"]+)"', html) == ["flux.2-dummy"]
    noise = re.search(r'<p id="noise"[^>]*>', html)
    assert noise and "hidden" not in noise.group(0)
    assert "Output is noise." in html
    # The no-JavaScript path: a real form that posts to the server, every input labelled.
    assert 'method="post" action="/playground" enctype="multipart/form-data"' in html
    for name in (
        "prompt",
        "model",
        "aspect_ratio",
        "resolution",
        "size",
        "seed",
        "n",
        "output_format",
        "image",
    ):
        assert f'<label for="{name}">' in html and f'name="{name}"' in html, name


def test_playground_form_without_javascript_renders_the_result(web: LiveServer) -> None:
    r = httpx.post(web.url + "/playground", files=_form(prompt="a red fox", seed=7, **SMALL), timeout=120)
    assert r.status_code == 200, r.text
    srcs = re.findall(r'<img src="(/images/[^"]+\.png)"', r.text)
    assert len(srcs) == 1
    assert "seed 7" in r.text and 'download="fluxport-' in r.text
    image = httpx.get(web.url + srcs[0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # Bad input comes back on the page with the API's message, naming the field.
    r = httpx.post(web.url + "/playground", files=_form(prompt="x", model="flux.2-dummy", size="banana"))
    assert r.status_code == 400
    assert "Invalid size &#39;banana&#39;" in r.text and "<code>size</code>" in r.text


def test_playground_job_streams_progress_then_the_result(web: LiveServer) -> None:
    r = httpx.post(
        web.url + "/playground/api/jobs",
        files=_form(prompt="a red fox", n=2, seed=11, output_format="webp", **SMALL),
        timeout=120,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["operation"] == "generate"
    events = _events(web, job["events"])
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and "error" not in kinds
    steps = [d for k, d in events if k == "progress" and d["stage"] == "step"]
    assert steps and all(1 <= d["step"] <= d["total"] for d in steps)  # bursts may be coalesced
    # Real partial images, as the streamed API makes them (the latest one if several came at once).
    partials = [d for k, d in events if k == "partial"]
    assert partials and all(0 <= d["index"] < d["of"] == 3 for d in partials)
    head, data = partials[-1]["image"].split(",", 1)
    assert head == "data:image/webp;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (256, 256)
    result = events[-1][1]
    assert result["provider"] == "local" and result["size"] == "256x256"
    assert result["cost_usd"] == 0.0 and result["latency_ms"] > 0
    assert [img["seed"] for img in result["images"]] == [11, 12]
    for img in result["images"]:
        got = httpx.get(web.url + img["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    # The finished job can still be read back, for a page that reconnects.
    again = httpx.get(web.url + f"/playground/api/jobs/{job['id']}").json()
    assert again["status"] == "succeeded" and again["result"] == result
    assert httpx.get(web.url + "/playground/api/jobs/job_nope/events").status_code == 404


def test_playground_edit_with_a_reference_image(web: LiveServer) -> None:
    files = [
        ("image", ("ref.png", png_bytes(320, 240), "image/png")),
        *_form(prompt="make it blue", **SMALL).items(),
    ]
    r = httpx.post(web.url + "/playground/api/jobs", files=files, timeout=120)
    assert r.status_code == 202, r.text
    assert r.json()["operation"] == "edit"
    kind, result = _events(web, r.json()["events"])[-1]
    assert kind == "result" and result["operation"] == "edit" and len(result["images"]) == 1


def test_playground_bad_input_names_the_field(web: LiveServer) -> None:
    r = httpx.post(web.url + "/playground/api/jobs", files=_form(prompt="x", model="flux.2-dummy", n=99))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(web.url + "/playground/api/jobs", files=_form(prompt="x", model="flux.2-dev"))
    assert r.status_code == 503 and "flux.2-dummy" in r.json()["error"]["message"]
    r = httpx.post(web.url + "/playground/api/jobs", files=_form(model="flux.2-dummy"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_playground_rate_limit_answers_429_with_retry_after(limited: LiveServer) -> None:
    statuses = []
    for _ in range(4):
        r = httpx.post(
            limited.url + "/playground/api/jobs", files=_form(prompt="x", **{**SMALL, "size": "bad"})
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429 and len(statuses) <= 3
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "Playground rate limit reached: 2 generations per minute" in r.json()["error"]["message"]
    # The no-JavaScript form says so on the page too.
    page = httpx.post(limited.url + "/playground", files=_form(prompt="x", **SMALL))
    assert page.status_code == 429 and "Playground rate limit reached" in page.text


async def test_rate_limiter_window_and_off_switch() -> None:
    now = [0.0]
    windows = LocalWindows(clock=lambda: now[0])
    limiter = RateLimiter(2, windows)
    await limiter.hit("a")
    now[0] = 1
    await limiter.hit("a")
    await limiter.hit("b")
    now[0] = 30
    with pytest.raises(RateLimited) as err:
        await limiter.hit("a")
    assert err.value.headers["retry-after"] == "30"
    now[0] = 60.5
    await limiter.hit("a")  # the first hit has left the window
    unlimited = RateLimiter(0, windows)
    for _ in range(100):
        await unlimited.hit("a")
    small_windows = LocalWindows(max_keys=2, clock=lambda: 0.0)
    small = RateLimiter(1, small_windows)
    for client in "abc":
        await small.hit(client)
    assert len(small_windows._hits) == 2


def test_static_assets_are_served(web: LiveServer) -> None:
    for path, kind in (("/static/app.css", "text/css"), ("/static/app.js", "javascript")):
        r = httpx.get(web.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"]


@pytest.mark.parametrize(
    ("provider", "build"),
    [("fal", FalProvider), ("replicate", ReplicateProvider)],
)
def test_normalization_table_matches_what_the_adapters_report(provider: str, build: Any) -> None:
    """The page's table (the providers' declared normalisation) and the adapters' own reports
    agree for a plain and an edit request."""
    adapter = build(Settings(fal_key=None, replicate_api_token=None))
    ref = ReferenceImage(data=png_bytes(64, 64), format="png", width=64, height=64)
    plain = ImageJob(
        request_id="r", model="flux.2-dev", operation=Operation.GENERATE, prompt="p", size=Size(1024, 1024)
    )
    cases = [
        (plain, None),
        (replace(plain, operation=Operation.EDIT, references=(ref,)), None),
        (replace(plain, output_format="webp"), None),
        (replace(plain, output_format="webp", output_compression=80), {"output_compression"}),
    ]
    if provider == "fal":
        cases.append((replace(plain, cfg_scale=3.0, prompt_enhancement=True), None))
    table = adapter.capabilities("flux.2-dev").normalization
    for job, only in cases:
        _, _, report = adapter.build_input(job)
        for param, behaviour in report.items():
            # n's report depends on the count (the service splits big n into calls: emulated).
            if param == "n" or (only is not None and param not in only):
                continue
            assert table[param][0] == behaviour.value, (provider, param, job)


# -- in a real browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])"
    )
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)) or shutil.which(CHROMIUM) is None:
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    page = context.new_page()
    yield page
    context.close()


def _shot(page: Any, name: str, full: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)


def _no_horizontal_scroll(page: Any) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"


def test_browser_catalog_and_model_page(web: LiveServer, page: Any, phone: Any) -> None:
    page.goto(web.url + "/")
    assert page.title() == "Models · fluxport"
    assert page.locator(".card").count() == 3
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    _shot(page, "catalog")
    page.get_by_role("link", name="FLUX.2 [dev]", exact=True).click()
    page.wait_for_url("**/models/flux.2-dev")
    assert page.get_by_role("heading", name="Provider rankings").is_visible()
    assert page.locator("#sizes td", has_text="1365×768").count() == 1
    _shot(page, "model-flux.2-dev")
    for url, name in (
        ("/", "phone-catalog"),
        ("/models/flux.2-dev", "phone-model"),
        ("/playground", "phone-playground"),
    ):
        phone.goto(web.url + url)
        _no_horizontal_scroll(phone)
        _shot(phone, name)


def test_browser_playground_generates_with_visible_progress(web: LiveServer, page: Any) -> None:
    page.goto(web.url + "/playground")
    assert page.locator("#noise").is_visible()
    page.get_by_label("Prompt").fill("a lighthouse at dusk")
    page.get_by_label("Exact size").fill("256x256")
    page.get_by_label("Seed").fill("42")
    page.get_by_label("Output format").select_option("webp")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#progress-box").wait_for(state="visible", timeout=10_000)
    image = page.locator("#result img").first
    image.wait_for(state="visible", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#result img').naturalWidth === 256")
    assert page.locator("#progress-box").is_hidden()
    # The partial images came on the way (the last one stays behind the result).
    assert (page.locator("#preview").get_attribute("src") or "").startswith("data:image/webp;base64,")
    assert (page.locator("#preview").get_attribute("alt") or "").startswith("Partial image")
    assert page.locator('dd[data-k="provider"]').inner_text() == "local"
    assert page.locator('dd[data-k="size"]').inner_text() == "256x256"
    assert page.locator('dd[data-k="cost"]').inner_text() == "free"
    assert page.locator("#result figcaption").inner_text().startswith("seed 42")
    download = page.get_by_role("link", name="Download webp")
    assert (download.get_attribute("download") or "").endswith(".webp")
    _shot(page, "playground-generate")
    # Bad input shows the API's message, naming the field, and marks the field.
    page.get_by_label("Exact size").fill("banana")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#error").wait_for(state="visible")
    assert "Invalid size 'banana'" in page.locator("#error").inner_text()
    assert page.get_by_label("Exact size").get_attribute("aria-invalid") == "true"
    _shot(page, "playground-error")


def test_browser_playground_edit_with_an_uploaded_reference(
    web: LiveServer, page: Any, tmp_path: Path
) -> None:
    ref = tmp_path / "reference.png"
    ref.write_bytes(png_bytes(300, 200, (30, 90, 200)))
    page.goto(web.url + "/playground")
    page.get_by_label("Prompt").fill("make it winter")
    page.get_by_label("Reference images").set_input_files(str(ref))
    assert page.locator("#mode").inner_text() == "Edit with 1 reference image"
    page.get_by_label("Resolution").select_option("0.5K")
    page.get_by_role("button", name="Edit", exact=True).click()
    page.locator("#result img").first.wait_for(state="visible", timeout=120_000)
    # No size given: the reference's 3:2 shape at 0.5K.
    width, height = map(int, page.locator('dd[data-k="size"]').inner_text().split("x"))
    assert abs(width / height - 1.5) < 0.02 and width * height <= 0.26 * 1024 * 1024
    _shot(page, "playground-edit")


def test_browser_playground_says_when_the_rate_limit_is_hit(limited: LiveServer, page: Any) -> None:
    page.goto(limited.url + "/playground")
    page.get_by_label("Prompt").fill("over and over")
    page.get_by_label("Exact size").fill("256x256")
    error = page.locator("#error")
    for _ in range(3):  # the limit is 2 per minute; earlier tests may have used some of it
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function(
            "() => !document.getElementById('go').disabled"
            " && (document.querySelector('#result img') || !document.getElementById('error').hidden)",
            timeout=120_000,
        )
        if error.is_visible():
            break
    assert "Playground rate limit reached" in error.inner_text()
    assert re.search(r"Try again in \d+ s", error.inner_text())
    _shot(page, "playground-rate-limited")
