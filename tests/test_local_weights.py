"""The local provider's weights and placement, on flux.2-dummy on the CPU: FP8 (torchao) and NF4
(bitsandbytes) transformer blocks, a quantised text encoder, the text encoder on a device of its
own, and group offloading. Each: the output's shape, determinism for a seed, closeness to plain."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers.local import LocalProvider
from fluxport.settings import Settings

pytest.importorskip("diffusers")

STEPS = 8


def job(seed: int = 4, *, enhance: bool = False) -> ImageJob:
    return ImageJob(
        request_id="r",
        model="flux.2-dummy",
        operation=Operation.GENERATE,
        prompt="a paper boat on a pond",
        size=Size(256, 256),
        n=2,
        seed=seed,
        prompt_enhancement=enhance,
    )


def generate(provider: LocalProvider, seed: int = 4, events: list[Any] | None = None) -> np.ndarray[Any, Any]:
    result = asyncio.run(provider.generate(job(seed), (events if events is not None else []).append))
    return np.stack([np.asarray(img.content, dtype=np.int16) for img in result.images])


def pipe_of(provider: LocalProvider) -> Any:
    return provider._pipelines._pipes["dummy"]


def loading(events: list[Any]) -> list[str]:
    return [e.message for e in events if e.stage == "loading"]


@pytest.fixture(scope="module")
def plain() -> Iterator[np.ndarray[Any, Any]]:
    provider = LocalProvider(Settings(dummy_steps=STEPS))
    try:
        yield generate(provider)
    finally:
        asyncio.run(provider.aclose())


def close_but_not_equal(got: np.ndarray[Any, Any], base: np.ndarray[Any, Any], mean: float) -> None:
    assert got.shape == base.shape == (2, 256, 256, 3)
    difference = np.abs(got - base)
    assert difference.max() > 0  # the weights really changed: not the plain result
    assert difference.mean() < mean  # ...and the image stays close to it (0-255 scale)


def test_fp8_transformer_blocks(plain: np.ndarray[Any, Any]) -> None:
    pytest.importorskip("torchao")
    provider = LocalProvider(Settings(dummy_steps=STEPS, local_quantize="fp8"))
    events: list[Any] = []
    try:
        got = generate(provider, events=events)
        said = "quantised the transformer blocks fp8 (weight-only, torchao)"
        assert any(said in m for m in loading(events))
        transformer = pipe_of(provider).transformer
        block = transformer.transformer_blocks[0].attn.to_q.weight
        assert type(block).__name__ == "Float8Tensor" and block.dtype.is_floating_point
        # Outside the repeated blocks the weights stay as they were.
        assert type(transformer.proj_out.weight).__name__ == "Parameter"
        close_but_not_equal(got, plain, mean=2.0)
        assert np.array_equal(generate(provider), got)  # same seed, same image
    finally:
        asyncio.run(provider.aclose())


def test_nf4_transformer_blocks_and_text_encoder(plain: np.ndarray[Any, Any]) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    provider = LocalProvider(
        Settings(dummy_steps=STEPS, local_quantize="nf4", local_quantize_text_encoder=True)
    )
    events: list[Any] = []
    try:
        got = generate(provider, events=events)
        messages = loading(events)
        assert any(m.startswith("quantised the transformer blocks nf4") for m in messages)
        assert any(m.startswith("quantised the text encoder nf4") for m in messages)
        pipe = pipe_of(provider)
        single = pipe.transformer.single_transformer_blocks[0]
        assert isinstance(single.attn.to_qkv_mlp_proj, bnb.nn.Linear4bit)
        named = list(pipe.text_encoder.named_modules())
        language = [m for n, m in named if "language_model." in n and ".layers." in n]
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in language)
        vision = [m for n, m in named if "vision_tower" in n]
        assert vision and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision)
        close_but_not_equal(got, plain, mean=12.0)
        assert np.array_equal(generate(provider), got)
    finally:
        asyncio.run(provider.aclose())


def test_text_encoder_on_its_own_device_gives_the_same_images(plain: np.ndarray[Any, Any]) -> None:
    """Prompts are encoded on the text encoder's device and the embeddings moved to the
    transformer's; prompt enhancement runs there too. (On the CPU both devices are the CPU.)"""
    provider = LocalProvider(Settings(dummy_steps=STEPS, local_text_encoder_device="cpu"))
    events: list[Any] = []
    try:
        got = generate(provider, events=events)
        assert any("text encoder on cpu" in m for m in loading(events))
        assert np.array_equal(got, plain)
        pipe = pipe_of(provider)
        # The latents' device is pinned to the transformer's, not the text encoder's.
        assert type(pipe).__name__ == "Flux2Pipeline" and str(pipe._execution_device) == "cpu"
        assert getattr(type(pipe), "_fluxport_pinned", False)
        enhanced = asyncio.run(provider.generate(job(enhance=True), [].append))
        assert enhanced.revised_prompt
    finally:
        asyncio.run(provider.aclose())


def test_group_offload_gives_the_same_images(plain: np.ndarray[Any, Any]) -> None:
    from diffusers.hooks.group_offloading import _get_group_onload_device

    provider = LocalProvider(Settings(dummy_steps=STEPS, local_offload="group", local_group_offload_blocks=1))
    events: list[Any] = []
    try:
        got = generate(provider, events=events)
        assert any("group offload onto cpu (1 block a group)" in m for m in loading(events))
        pipe = pipe_of(provider)
        assert str(_get_group_onload_device(pipe.transformer)) == "cpu"  # hooks in place
        assert str(_get_group_onload_device(pipe.text_encoder)) == "cpu"  # layer by layer
        assert np.abs(got - plain).max() <= 1
    finally:
        asyncio.run(provider.aclose())


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"local_quantize": "nf4", "local_offload": "group"}, "do not combine"),
        ({"local_quantize_text_encoder": True}, "needs FLUXPORT_LOCAL_QUANTIZE"),
        ({"local_compile": True, "local_offload": "group"}, "LOCAL_OFFLOAD=group do not combine"),
        ({"local_offload": "model", "local_text_encoder_device": "cuda:1"}, "needs auto, none or group"),
        ({"local_text_encoder_device": "gpu1"}, "local_text_encoder_device"),
        ({"local_warm": "flux.2-dev,sdxl"}, "'sdxl' is not a local model"),
    ],
)
def test_placements_that_cannot_work_are_refused_at_start(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Settings(**settings)


def test_the_banner_gives_the_memory_of_each_placement(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start banner on an 80 GB GPU (torch's CUDA queries answered as an H100's would be)."""
    import torch

    from fluxport.providers.local.placement import placement_note

    for name, gib in (("transformer", 60), ("text_encoder", 45), ("vae", 1)):
        (tmp_path / name).mkdir()
        with (tmp_path / name / "model.safetensors").open("wb") as f:
            f.truncate(gib * 1024**3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (79 * 1024**3, 80 * 1024**3))
    note = placement_note(Settings(local_weights=tmp_path))
    assert note is not None and "needs 106 GB resident" in note and "model CPU offload" in note
    fp8 = Settings(local_weights=tmp_path, local_quantize="fp8", local_text_encoder_device="cuda:1")
    assert placement_note(fp8) == (
        "FLUX.2 [dev] with fp8 weights stays resident on the GPU (31 GB of 79 GB free); "
        "text encoder on cuda:1."
    )
    nf4 = Settings(local_weights=tmp_path, local_quantize="nf4", local_quantize_text_encoder=True)
    note = placement_note(nf4)
    assert note is not None and "nf4 weights stays resident on the GPU (30 GB" in note
    note = placement_note(Settings(local_weights=tmp_path, local_offload="group"))
    assert note is not None and "group offload" in note and "60 GB of host RAM" in note
