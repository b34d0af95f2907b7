"""Hardening, second round: what a hostile client still got through, each over real HTTP with the
official openai SDK (or raw httpx where the SDK cannot send the shape) against a live server."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LiveServer

DUMMY = "flux.2-dummy"


def refused(server: LiveServer, **fields: Any) -> openai.BadRequestError:
    """Send `fields` (beside a prompt and the dummy model) and return the 400 the SDK raised."""
    body = {"model": DUMMY, "prompt": "a barn", **fields}
    extra = {k: v for k, v in body.items() if k not in ("model", "prompt")}
    with pytest.raises(openai.BadRequestError) as info:
        server.client().images.generate(model=DUMMY, prompt="a barn", extra_body=extra)
    return info.value


def param_of(err: openai.BadRequestError) -> str | None:
    body = err.body
    assert isinstance(body, dict)
    param = body.get("param")
    assert param is None or isinstance(param, str)
    return param


@pytest.mark.parametrize("field", ["size", "aspect_ratio", "resolution"])
def test_an_empty_size_field_is_a_400_not_the_default(server: LiveServer, field: str) -> None:
    err = refused(server, **{field: ""})
    assert param_of(err) == field


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "1024x1024", "aspect_ratio": "banana"}, "aspect_ratio"),
        ({"size": "1024x1024", "resolution": "huge"}, "resolution"),
        ({"size": "16:9", "aspect_ratio": "0:0"}, "aspect_ratio"),
    ],
)
def test_every_size_field_sent_is_validated_even_when_size_wins(
    server: LiveServer, fields: dict[str, Any], param: str
) -> None:
    assert param_of(refused(server, **fields)) == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", "3"),
        ("n", True),
        ("n", 2.5),
        ("seed", "7"),
        ("output_compression", "80"),
        ("cfg_scale", "3.5"),
        ("stream", "true"),
        ("hedge", 1),
        ("dry_run", "yes"),
    ],
)
def test_numbers_and_booleans_are_not_coerced(server: LiveServer, field: str, value: Any) -> None:
    err = refused(server, **{field: value})
    assert param_of(err) == field


def test_typed_values_still_work(server: LiveServer) -> None:
    result = server.client().images.generate(
        model=DUMMY,
        prompt="a barn",
        n=2,
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 7, "cfg_scale": 3, "hedge": False},  # an int is a fine float
    )
    assert result.data is not None and len(result.data) == 2


def test_an_image_asked_for_under_another_extension_is_404(server: LiveServer) -> None:
    result = server.client().images.generate(
        model=DUMMY, prompt="a barn", size="256x256", output_format="png"
    )
    assert result.data and result.data[0].url
    url = result.data[0].url
    assert url.endswith(".png")
    assert httpx.get(url).status_code == 200
    wrong = httpx.get(url.removesuffix(".png") + ".jpg")
    assert wrong.status_code == 404
    assert "No such image" in wrong.json()["error"]["message"]


def test_an_unknown_field_is_bounded_in_size(server: LiveServer) -> None:
    err = refused(server, my_field="x" * (100 * 1024), dry_run=True)
    assert param_of(err) == "my_field"
    assert "FLUXPORT_MAX_EXTRA_FIELD_BYTES" in err.message


def test_an_unknown_field_is_bounded_in_depth(server: LiveServer) -> None:
    deep: Any = 1
    for _ in range(6):
        deep = {"k": deep}
    err = refused(server, my_field=deep, dry_run=True)
    assert param_of(err) == "my_field" and "nested deeper" in err.message


def test_a_modest_unknown_field_still_passes(server: LiveServer) -> None:
    raw = server.client().images.with_raw_response.generate(
        model=DUMMY,
        prompt="a barn",
        size="256x256",
        extra_body={"my_field": {"a": [1, 2, 3]}, "dry_run": True},
    )
    assert raw.http_response.status_code == 200


def test_a_json_body_over_the_json_cap_is_413_before_it_is_read(server: LiveServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    cap = server.settings.max_json_bytes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {cap + 1}\r\n\r\n".encode()
        )
        head = s.recv(4096)  # answered with no body sent at all
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert str(cap).encode() in head


def test_a_chunked_json_body_is_cut_off_at_the_cap(server: LiveServer) -> None:
    cap = server.settings.max_json_bytes

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "x", "model": "flux.2-dummy", "junk": "'
        for _ in range(cap // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(
        f"{server.api}/images/generations", content=body(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["type"]


def test_the_loop_serves_while_a_large_body_is_parsed(server: LiveServer) -> None:
    """A body near the cap (a 1 MiB unknown array) is parsed in a thread: /healthz stays fast."""
    items = ",".join(["1"] * (server.settings.max_json_bytes // 2 - 100))
    raw = ('{"prompt": "x", "model": "flux.2-dummy", "dry_run": true, "junk": [' + items + "]}").encode()
    assert len(raw) <= server.settings.max_json_bytes
    slowest = 0.0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        posts = [
            pool.submit(httpx.post, f"{server.api}/images/generations", content=raw, timeout=60)
            for _ in range(4)
        ]
        while not all(p.done() for p in posts):
            t = time.monotonic()
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - t)
    # The junk field is refused (bounded passthrough) with a 400 naming it, never a 5xx.
    assert {p.result().status_code for p in posts} == {400}
    assert posts[0].result().json()["error"]["param"] == "junk"
    assert slowest < 2.0, slowest


def test_the_trailing_slash_redirect_is_relative(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/healthz/?x=1", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 307
    assert r.headers["location"] == "/healthz?x=1"  # no Host echoed into it
    followed = httpx.get(f"{server.url}/healthz/", follow_redirects=True)
    assert followed.status_code == 200 and followed.url.path == "/healthz"
    assert httpx.get(f"{server.api}/nope/", follow_redirects=False).status_code == 404
