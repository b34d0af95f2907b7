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

Modes, each timed after one warm-up call, medians of `--repeat`, in this order (the ones marked
* build a fresh transformer first: quantising, offloading and compiling change it for good):
  plain        Flux2Pipeline as diffusers runs it, bf16, resident
  taylorseer   FLUXPORT_LOCAL_STEP_CACHE=taylorseer (interval 5, first 3 steps in full)
  turbo-8      the Turbo LoRA's 8-step schedule (what flux.2-dev-flash runs), plain otherwise
  batch-2      FLUXPORT_LOCAL_BATCH_IMAGES=2: two jobs in one call (s/image is half the call)
  group*       FLUXPORT_LOCAL_OFFLOAD=group: blocks stream in from CPU memory, one at a time
  fp8*         FLUXPORT_LOCAL_QUANTIZE=fp8 (torchao; dynamic FP8 matmuls on H100)
  nf4*         FLUXPORT_LOCAL_QUANTIZE=nf4 (bitsandbytes 4-bit)
  compile*     FLUXPORT_LOCAL_COMPILE=1 (regional torch.compile of the repeated blocks)
  fp8-compile* fp8 and compile together
  turbo-8-fast* the 8-step schedule on fp8 and compile: the fastest flux.2-dev-flash
Printed per mode: seconds per step, seconds per image, peak GPU memory, and the ratio to plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fluxport.providers.local.plan import TURBO_SIGMAS  # noqa: E402


def build(dummy: bool) -> tuple[Any, Any]:
    """(pipeline, prompt embeddings) on the best device."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline

    if dummy:
        from fluxport.providers.local.dummy import build_dummy_pipeline

        pipe = build_dummy_pipeline()
        pipe.set_progress_bar_config(disable=True)
        embeds = pipe.encode_prompt("a lighthouse at dusk", device="cpu")[0]
        return pipe, embeds
    device = "cuda"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        vae = AutoencoderKLFlux2()
    torch.set_default_dtype(torch.float32)
    from fluxport.providers.local.dummy import flux2_scheduler

    scheduler = flux2_scheduler()
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=fresh_transformer(device)
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 512, 15360, device=device, dtype=torch.bfloat16)
    return pipe, embeds


def fresh_transformer(device: str, dummy: bool = False) -> Any:
    """FLUX.2 [dev]'s transformer (its constructor defaults), random, in bf16 on `device`."""
    import torch
    from diffusers import Flux2Transformer2DModel

    if dummy:
        from fluxport.providers.local.dummy import build_dummy_pipeline

        return build_dummy_pipeline().transformer
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: fp32 would need 128 GB
    with torch.device(device):
        transformer = Flux2Transformer2DModel()
    torch.set_default_dtype(torch.float32)
    return transformer


@dataclass(frozen=True)
class Mode:
    fresh: bool = False  # a new transformer first (the modes before left theirs changed)
    cache: bool = False
    sigmas: Sequence[float] | None = None
    batch: int = 1
    offload: str = "none"
    quantize: str = "off"
    compile: bool = False


MODES = {
    "plain": Mode(),
    "taylorseer": Mode(cache=True),
    "turbo-8": Mode(sigmas=TURBO_SIGMAS),
    "batch-2": Mode(batch=2),
    "group": Mode(fresh=True, offload="group"),
    "fp8": Mode(fresh=True, quantize="fp8"),
    "nf4": Mode(fresh=True, quantize="nf4"),
    "compile": Mode(fresh=True, compile=True),
    "fp8-compile": Mode(fresh=True, quantize="fp8", compile=True),
    "turbo-8-fast": Mode(fresh=True, quantize="fp8", compile=True, sigmas=TURBO_SIGMAS),
}


def prepare(pipe: Any, mode: Mode, device: str, dummy: bool) -> None:
    """Set the pipeline up as fluxport would for `mode`, through fluxport's own functions."""
    import gc

    import torch
    from diffusers import TaylorSeerCacheConfig

    from fluxport.providers.local.placement import place, quantize
    from fluxport.settings import Settings

    if mode.fresh:
        pipe.transformer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # Built on the GPU even for group offload (random init of 32B weights on a CPU takes
        # many minutes); the offload hooks move it to the CPU.
        pipe.transformer = fresh_transformer(device, dummy)
    on = getattr(pipe.transformer, "is_cache_enabled", False)
    if mode.cache and not on:
        config = TaylorSeerCacheConfig(
            cache_interval=5, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
        )
        pipe.transformer.enable_cache(config)
    elif not mode.cache and on:
        pipe.transformer.disable_cache()
    settings = Settings(local_quantize=mode.quantize, local_offload=mode.offload)
    quantize(pipe, settings, device)
    if mode.offload == "group":
        place(pipe, settings, device, "group")
    if mode.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)


def timed(pipe: Any, embeds: Any, size: int, steps: int, mode: Mode) -> float:
    import torch

    from fluxport.providers.local.pipeline import _step_cache_context

    sigmas = mode.sigmas
    generators = [torch.Generator("cpu").manual_seed(1 + i) for i in range(mode.batch)]
    call: dict[str, Any] = {"prompt_embeds": embeds.repeat(mode.batch, 1, 1), "height": size, "width": size}
    call |= {"num_inference_steps": steps, "generator": generators, "output_type": "pil"}
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
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated; default all")
    args = parser.parse_args(argv)
    import torch

    pipe, embeds = build(args.dummy)
    cuda = torch.cuda.is_available() and not args.dummy
    device = "cuda" if cuda else "cpu"
    asked = args.modes.split(",")
    unknown = [m for m in asked if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    wanted = [m for m in MODES if m in asked]  # this order: the fresh-transformer modes last
    where = torch.cuda.get_device_name() if cuda else "CPU"
    dummy = " (dummy, CPU)" if args.dummy else ""
    shape = f"{args.size}x{args.size}, {args.steps} steps"
    print(f"FLUX.2 [dev]{dummy} at {shape}, medians of {args.repeat}; {where}")
    print(f"{'mode':<13} {'s/step':>8} {'s/image':>9} {'peak GiB':>9} {'x plain':>8}")
    plain_s: float | None = None
    for name in wanted:
        mode = MODES[name]
        prepare(pipe, mode, device, args.dummy)
        steps = len(mode.sigmas) if mode.sigmas else args.steps
        timed(pipe, embeds, args.size, steps, mode)  # warm-up (and the compile)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(timed(pipe, embeds, args.size, steps, mode) for _ in range(args.repeat))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        per_image = seconds / mode.batch
        if name == "plain":
            plain_s = per_image
        ratio = f"{per_image / plain_s:.2f}" if plain_s else "-"
        print(f"{name:<13} {seconds / steps:>8.3f} {per_image:>9.2f} {peak:>9.1f} {ratio:>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
