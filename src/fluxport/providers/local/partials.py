"""Real partial images for streamed requests: the pipeline's current estimate of the clean image.

FLUX.2 is a flow-matching model: at the noisy latents x_t = (1 - σ) x0 + σ ε the transformer
predicts the velocity v = ε - x0, so at every step the clean image it is heading for is
x0 = x_t - σ v. A forward hook on the transformer keeps the (x_t, v) of its latest call; after the
chosen steps that estimate goes through the pipeline's own VAE (its batch-norm statistics, the
2x2 unpatchify, then `vae.decode`), at a reduced size, and is encoded in the job's output format.

It all runs on the device worker thread, between two steps: never on the event loop. The first
partial follows the first step (blurry, but real pixels within about a step's time), the others
are evenly spaced after it, and none comes at the last step: the completed image follows that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fluxport import media
from fluxport.domain.job import GeneratedImage, ImageJob, Size
from fluxport.providers.base import PartialImage

log = logging.getLogger("fluxport.local")

# The long side of a partial image, in pixels: decoding at a quarter of 1024² costs a quarter.
PARTIAL_SIDE = 512
_LATENT_GRID = 8  # the VAE's own downsampling (the transformer's tokens are 2x2 patches of it)


def partial_steps(total: int, count: int) -> dict[int, int]:
    """0-based step -> partial index: after which steps of `total` the `count` partials are sent."""
    if count <= 0 or total <= 1:
        return {}
    count = min(count, total - 1)
    return {round(j * (total - 1) / count): j for j in range(count)}


def partial_size(width: int, height: int, side: int = PARTIAL_SIDE) -> Size:
    """The size a partial of a `width` x `height` image is decoded at: long side at most `side`,
    on the VAE's grid."""
    scale = min(1.0, side / max(width, height))
    grid = _LATENT_GRID
    return Size(max(grid, round(width * scale / grid) * grid), max(grid, round(height * scale / grid) * grid))


class PartialDecoder:
    """Hooks a pipeline's transformer for one call and sends the job's partial images."""

    def __init__(
        self,
        pipe: Any,
        job: ImageJob,
        *,
        steps: int,
        width: int,
        height: int,
        emit: Callable[[PartialImage], None],
    ) -> None:
        self.pipe = pipe
        self.job = job
        self.at = partial_steps(steps, job.partial_images)
        self.width, self.height = width, height
        self.emit = emit
        self._latest: tuple[Any, Any] | None = None
        self._hook = pipe.transformer.register_forward_hook(self._capture, with_kwargs=True)

    def close(self) -> None:
        self._hook.remove()
        self._latest = None

    def _capture(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        velocity = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self._latest = (hidden, velocity)

    def after_step(self, pipe: Any, step: int, timestep: Any) -> None:
        """Called by the step callback after step `step` (0-based): decode and send if it is due.
        A partial is a nicety: one that fails is logged and the rest are skipped, never the job."""
        index = self.at.get(step)
        if index is None or self._latest is None:
            return
        try:
            self._send(pipe, step, timestep, index)
        except Exception:
            log.exception("partial image %d failed; no more partials for this job", index)
            self.at = {}

    def _send(self, pipe: Any, step: int, timestep: Any, index: int) -> None:
        images = self._decode(pipe, self._clean_estimate(pipe, step, timestep))
        for image_index, pixels in enumerate(images):
            encoded = media.finalize_image(
                GeneratedImage(pixels, pixels.width, pixels.height),
                Size(pixels.width, pixels.height),
                self.job.output_format,
                self.job.output_compression,
            )
            self.emit(
                PartialImage(
                    image_index=image_index,
                    partial_index=index,
                    data=encoded.data,
                    width=encoded.width,
                    height=encoded.height,
                    output_format=encoded.format,
                )
            )

    def _clean_estimate(self, pipe: Any, step: int, timestep: Any) -> Any:
        """x0 = x_t - σ_t v for the image tokens of the step just taken (float32)."""
        assert self._latest is not None
        hidden, velocity = self._latest
        tokens = (self.height // (_LATENT_GRID * 2)) * (self.width // (_LATENT_GRID * 2))
        sigmas = getattr(pipe.scheduler, "sigmas", None)
        if sigmas is not None and step < len(sigmas):
            sigma = float(sigmas[step])
        else:  # flow matching: timestep = σ x num_train_timesteps
            sigma = float(timestep) / pipe.scheduler.config.num_train_timesteps
        # Edits append the reference tokens after the image's own: keep the image's.
        return hidden[:, :tokens].float() - sigma * velocity[:, :tokens].float()

    def _decode(self, pipe: Any, x0: Any) -> list[Any]:
        """Packed latents (B, H*W, C) -> PIL images at `partial_size`, as the pipeline decodes."""
        import torch
        import torch.nn.functional as F

        batch, _tokens, channels = x0.shape
        rows, cols = self.height // (_LATENT_GRID * 2), self.width // (_LATENT_GRID * 2)
        latents = x0.view(batch, rows, cols, channels).permute(0, 3, 1, 2)  # tokens are row-major
        vae = pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = pipe._unpatchify_latents(latents * std + mean)  # (B, C / 4, 2 rows, 2 cols)
        target = partial_size(self.width, self.height)
        shape = (target.height // _LATENT_GRID, target.width // _LATENT_GRID)
        if shape != tuple(latents.shape[-2:]):
            latents = F.interpolate(latents, size=shape, mode="bilinear", align_corners=False)
        from diffusers.utils.torch_utils import get_module_execution_device

        image = vae.decode(latents.to(get_module_execution_device(vae), vae.dtype), return_dict=False)[0]
        images: list[Any] = pipe.image_processor.postprocess(image, output_type="pil")
        return images
