"""The local provider's partial images, at the level of the pipeline: which steps, what sizes,
and that the estimate is the flow-matching x0 (at the last step it is the final image itself)."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers.base import PartialImage
from fluxport.providers.local.partials import PartialDecoder, partial_size, partial_steps

pytest.importorskip("diffusers")


def test_partial_steps_start_early_and_spread_evenly() -> None:
    assert partial_steps(50, 3) == {0: 0, 16: 1, 33: 2}  # the first after step 1: pixels early
    assert partial_steps(8, 3) == {0: 0, 2: 1, 5: 2}  # the Turbo schedule
    assert partial_steps(4, 3) == {0: 0, 1: 1, 2: 2}  # never at the last step: the image follows
    assert partial_steps(2, 3) == {0: 0}  # fewer steps than partials: one per step but the last
    assert partial_steps(1, 3) == {} and partial_steps(50, 0) == {}


def test_partial_size_caps_the_long_side_on_the_vae_grid() -> None:
    assert partial_size(256, 256) == Size(256, 256)
    assert partial_size(1024, 1024) == Size(512, 512)
    assert partial_size(2048, 1152) == Size(512, 288)
    assert partial_size(1024, 64) == Size(512, 32)


@pytest.fixture(scope="module")
def pipe() -> Any:
    from fluxport.providers.local.dummy import build_dummy_pipeline

    return build_dummy_pipeline()


def _run(
    pipe: Any, at: dict[int, int], steps: int, size: int, n: int = 1
) -> tuple[list[Any], list[PartialImage]]:
    import torch

    job = ImageJob(
        request_id="r",
        model="flux.2-dummy",
        operation=Operation.GENERATE,
        prompt="a kite",
        size=Size(size, size),
        n=n,
        partial_images=1,
    )
    sent: list[PartialImage] = []
    decoder = PartialDecoder(pipe, job, steps=steps, width=size, height=size, emit=sent.append)
    decoder.at = at

    def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        decoder.after_step(p, i, t)
        return kwargs

    try:
        with torch.inference_mode():
            images = pipe(
                prompt="a kite",
                height=size,
                width=size,
                num_inference_steps=steps,
                num_images_per_prompt=n,
                generator=[torch.Generator("cpu").manual_seed(5 + i) for i in range(n)],
                output_type="pil",
                callback_on_step_end=on_step,
            ).images
    finally:
        decoder.close()
    return images, sent


def test_the_estimate_at_the_last_step_is_the_final_image(pipe: Any) -> None:
    """x0 = x_t - σ v: after the last Euler step (to σ = 0) the latents are exactly that, so a
    partial decoded there matches the pipeline's own output. A wrong σ, token order or VAE
    de-normalisation would not."""
    steps = 4
    images, sent = _run(pipe, {steps - 1: 0}, steps, 256, n=2)
    assert [p.image_index for p in sent] == [0, 1]
    for partial, final in zip(sent, images, strict=True):
        got = np.asarray(Image.open(io.BytesIO(partial.data)).convert("RGB"), dtype=np.int16)
        want = np.asarray(final.convert("RGB"), dtype=np.int16)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2  # float rounding only


def test_earlier_estimates_differ_and_are_reduced_in_size(pipe: Any) -> None:
    images, sent = _run(pipe, {0: 0, 2: 1}, 4, 640)
    assert [(p.partial_index, p.width, p.height) for p in sent] == [(0, 512, 512), (1, 512, 512)]
    assert images[0].size == (640, 640)
    first, second = (np.asarray(Image.open(io.BytesIO(p.data)).convert("RGB"), dtype=np.int16) for p in sent)
    assert np.abs(first - second).mean() > 0.5
    # The hook is gone afterwards: a plain call sends nothing more.
    assert not pipe.transformer._forward_hooks
