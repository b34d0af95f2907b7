"""GPU benchmark: FLUX.2 [dev] at full size with random weights (nothing is downloaded), side by
side in one run: plain bf16 diffusers, each of fluxport's local speed-ups, and the Turbo schedule.

Run on a GPU machine from the repository root: `.venv/bin/python bench/gpu.py` (1024x1024, 50
steps; `--size`, `--steps`, `--repeat`). `--dummy` runs the same modes on flux.2-dummy (tiny,
on the CPU) to check the script itself; its times mean nothing for a GPU.

The transformer is built from diffusers' own class with the FLUX.2 [dev] configuration (its
constructor defaults, ~32 B parameters, 64 GB in bf16) and the full-size VAE, both with random
weights; the text encoder is left out and random prompt embeddings of the real shape
(1 x 512 x 15360) are passed instead, so that the transformer and VAE fit one 80 GB H100. Random
weights make noise, at exactly the real cost per step.

TaylorSeer's hooks and a fullgraph compile do not combine in diffusers 0.42 (dynamo cannot trace
the hook), so fluxport refuses both settings at once and this bench has no mode for the pair.

Modes, each timed after one warm-up call, medians of `--repeat`:
  plain        Flux2Pipeline as diffusers runs it, bf16
  taylorseer   FLUXPORT_LOCAL_STEP_CACHE=taylorseer (interval 5, first 3 steps in full)
  compile      FLUXPORT_LOCAL_COMPILE=1 (regional torch.compile of the repeated blocks)
  turbo-8      the Turbo LoRA's 8-step schedule (what flux.2-dev-flash runs), plain otherwise
Printed per mode: seconds per step, seconds per image, peak GPU memory, and the ratio to plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fluxport.providers.local.plan import TURBO_SIGMAS  # noqa: E402


def build(dummy: bool) -> tuple[Any, Any]:
    """(pipeline, prompt embeddings) on the best device."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    if dummy:
        from fluxport.providers.local.dummy import build_dummy_pipeline

        pipe = build_dummy_pipeline()
        pipe.set_progress_bar_config(disable=True)
        embeds = pipe.encode_prompt("a lighthouse at dusk", device="cpu")[0]
        return pipe, embeds
    device = "cuda"
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: fp32 would need 128 GB
    with torch.device(device):
        transformer = Flux2Transformer2DModel()
        vae = AutoencoderKLFlux2()
    torch.set_default_dtype(torch.float32)
    from fluxport.providers.local.dummy import flux2_scheduler

    scheduler = flux2_scheduler()
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 512, 15360, device=device, dtype=torch.bfloat16)
    return pipe, embeds


def timed(pipe: Any, embeds: Any, size: int, steps: int, sigmas: Sequence[float] | None) -> float:
    import torch

    from fluxport.providers.local.pipeline import _step_cache_context

    call: dict[str, Any] = {"prompt_embeds": embeds, "height": size, "width": size, "output_type": "pil"}
    call |= {"num_inference_steps": steps, "generator": torch.Generator("cpu").manual_seed(1)}
    if sigmas is not None:
        call |= {"sigmas": list(sigmas), "num_inference_steps": len(sigmas), "guidance_scale": 2.5}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode(), _step_cache_context(pipe):
        pipe(**call)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dummy", action="store_true", help="flux.2-dummy on the CPU: checks the script")
    parser.add_argument("--modes", default="plain,taylorseer,turbo-8,compile")
    args = parser.parse_args(argv)
    import torch
    from diffusers import TaylorSeerCacheConfig

    pipe, embeds = build(args.dummy)
    cuda = torch.cuda.is_available() and not args.dummy

    def cache(on: bool) -> None:
        if on and not getattr(pipe.transformer, "is_cache_enabled", False):
            config = TaylorSeerCacheConfig(
                cache_interval=5, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
            )
            pipe.transformer.enable_cache(config)
        elif not on and getattr(pipe.transformer, "is_cache_enabled", False):
            pipe.transformer.disable_cache()

    compiled = False

    def compile_once() -> None:
        nonlocal compiled
        if not compiled:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
            compiled = True

    modes: dict[str, tuple[Callable[[], None], Sequence[float] | None]] = {
        "plain": (lambda: cache(False), None),
        "taylorseer": (lambda: cache(True), None),
        "compile": (lambda: (cache(False), compile_once()), None),  # type: ignore[dict-item]
        "turbo-8": (lambda: cache(False), TURBO_SIGMAS),
    }
    wanted = [m for m in args.modes.split(",") if m in modes]
    # Compiling changes the model for good: the modes without it run first.
    wanted.sort(key=lambda m: m == "compile")
    where = torch.cuda.get_device_name() if cuda else "CPU"
    dummy = " (dummy, CPU)" if args.dummy else ""
    shape = f"{args.size}x{args.size}, {args.steps} steps"
    print(f"FLUX.2 [dev]{dummy} at {shape}, medians of {args.repeat}; {where}")
    print(f"{'mode':<12} {'s/step':>8} {'s/image':>9} {'peak GiB':>9} {'x plain':>8}")
    plain_s: float | None = None
    for mode in wanted:
        prepare, sigmas = modes[mode]
        prepare()
        steps = len(sigmas) if sigmas else args.steps
        timed(pipe, embeds, args.size, steps, sigmas)  # warm-up (and the compile)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(timed(pipe, embeds, args.size, steps, sigmas) for _ in range(args.repeat))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        if mode == "plain":
            plain_s = seconds
        ratio = f"{seconds / plain_s:.2f}" if plain_s else "-"
        print(f"{mode:<12} {seconds / steps:>8.3f} {seconds:>9.2f} {peak:>9.1f} {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
