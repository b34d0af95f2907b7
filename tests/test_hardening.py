"""Hardening, second round: what a hostile client still got through, each over real HTTP with the
official openai SDK (or raw httpx where the SDK cannot send the shape) against a live server."""

from __future__ import annotations

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
    err = refused(server, my_field="x" * (1024 * 1024), dry_run=True)
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
