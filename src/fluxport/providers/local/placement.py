"""Where a loaded pipeline's weights live: quantised (torchao FP8, bitsandbytes NF4), resident on
one GPU, offloaded (a model at a time, or the transformer's blocks in groups), and the text encoder
on a device of its own. Runs on the device worker thread; torch is imported only when called.

The same functions serve flux.2-dummy on the CPU (the tests) and FLUX.2 [dev] on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fluxport.domain.errors import ProviderFailure

if TYPE_CHECKING:
    from pathlib import Path

    from fluxport.settings import Settings

COMPONENTS = ("transformer", "text_encoder", "vae")
HEADROOM = 8 * 1024**3  # activations at 1-4 MP and a few references
GIB = 1024**3

# Bytes per bf16 weight byte after quantisation: FP8 is one byte a weight (plus a scale per row);
# NF4 half a byte plus one absmax per 64 weights (bitsandbytes' default block size).
_SHRINK = {"off": 1.0, "fp8": 0.5, "nf4": 0.28}
# The quantised layers are the repeated blocks: nearly all the weights (the embedders, norms and
# output projection stay in bf16, as diffusers' own quantisation configs leave them).
_TRANSFORMER_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _transformer_block(fqn: str) -> bool:
    return fqn.startswith(_TRANSFORMER_BLOCKS)


def _language_layer(fqn: str) -> bool:
    # Mistral3ForConditionalGeneration: model.language_model.layers.N... (the vision tower stays).
    return "language_model." in fqn and ".layers." in fqn


def quantize(pipe: Any, settings: Settings, device: str, offload: str = "none") -> list[str]:
    """FLUXPORT_LOCAL_QUANTIZE (+ _TEXT_ENCODER): quantise in place one linear layer at a time,
    each moved to its device to be quantised there; with an offloading placement each goes back
    to the CPU at once, so neither the bf16 nor the quantised weights need to fit on the GPU
    together. Returns what it did."""
    mode = settings.local_quantize
    if mode == "off":
        return []
    back = offload != "none"
    blocks = _quantize_module(pipe.transformer, mode, device, _transformer_block, back)
    done = [f"transformer blocks {blocks}"]
    if settings.local_quantize_text_encoder:
        where = settings.local_text_encoder_device or device
        text_back = back and settings.local_text_encoder_device is None
        text = _quantize_module(pipe.text_encoder, mode, where, _language_layer, text_back)
        done.append(f"text encoder {text}")
    return done


def missing_library(mode: str) -> str | None:
    """What FLUXPORT_LOCAL_QUANTIZE=`mode` needs and this install lacks, in words (None: nothing)."""
    library = {"fp8": "torchao", "nf4": "bitsandbytes"}.get(mode)
    if library is None or importlib.util.find_spec(library) is not None:
        return None
    return f"FLUXPORT_LOCAL_QUANTIZE={mode} needs {library}: install fluxport[quant]"


def _quantize_module(module: Any, mode: str, device: str, wanted: Any, back_to_cpu: bool = False) -> str:
    import torch

    missing = missing_library(mode)
    if missing:
        raise ProviderFailure(missing)

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if mode == "fp8":
        # Untyped on purpose, as diffusers elsewhere: neither library ships type information.
        ao: Any = importlib.import_module("torchao.quantization")

        # FP8 matmuls need Ada/Hopper (compute capability 8.9+); elsewhere the weights are stored
        # in FP8 and widened for each matmul (the memory saving without the speed).
        fast = device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)
        config: Any = (
            ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow())
            if fast
            else ao.Float8WeightOnlyConfig()
        )

        linear = torch.nn.Linear
        layers = [m for fqn, m in module.named_modules() if isinstance(m, linear) and wanted(fqn)]
        for layer in layers:  # one at a time: quantize_ on the whole model would move it all
            ao.quantize_(layer, config, filter_fn=lambda m, fqn: isinstance(m, linear), device=device)
            if back_to_cpu:
                layer.to("cpu")
        count = len(layers)
        return f"fp8 ({'dynamic activations' if fast else 'weight-only'}, torchao): {count} linear layers"
    return f"nf4 (bitsandbytes): {_to_nf4(module, device, dtype, wanted)} linear layers"


def _to_nf4(root: Any, device: str, compute_dtype: Any, wanted: Any) -> int:
    """Swap each wanted nn.Linear for bitsandbytes' Linear4bit; moving it to `device` quantises it."""
    import torch

    bnb: Any = importlib.import_module("bitsandbytes")

    swaps = [(fqn, m) for fqn, m in root.named_modules() if isinstance(m, torch.nn.Linear) and wanted(fqn)]
    for fqn, linear in swaps:
        parent_name, _, child = fqn.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, q.to(device))
        del linear
    return len(swaps)


def offload_mode(pipe: Any, settings: Settings, device: str) -> str:
    """FLUXPORT_LOCAL_OFFLOAD resolved: "auto" keeps everything resident when it fits with room
    for activations, else offloads model by model. Asked before quantising (sizes in bf16)."""
    import torch

    if settings.local_offload != "auto":
        return settings.local_offload
    if not device.startswith("cuda"):
        return "none"
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    need = gpu_bytes(pipe, settings, device)
    if need <= free - HEADROOM:
        return "none"
    short = f"needs {need / GIB:.0f} GB on {device} with {free / GIB:.0f} GB free"
    if settings.local_quantize == "nf4":
        raise ProviderFailure(
            f"FLUX.2 [dev] {short}, and nf4 weights cannot be offloaded: also set "
            "FLUXPORT_LOCAL_QUANTIZE_TEXT_ENCODER=true or FLUXPORT_LOCAL_TEXT_ENCODER_DEVICE"
        )
    if settings.local_text_encoder_device is not None:
        if settings.local_compile:
            raise ProviderFailure(
                f"FLUX.2 [dev] {short}: group offload would fit it, but not with FLUXPORT_LOCAL_COMPILE"
            )
        return "group"  # model offload would put the text encoder back on this GPU
    return "model"


def place(pipe: Any, settings: Settings, device: str, mode: str) -> str:
    """Put the pipeline's components where `mode` (offload_mode) and
    FLUXPORT_LOCAL_TEXT_ENCODER_DEVICE say; returns the placement in words (shown while loading)."""
    import torch

    text_device = settings.local_text_encoder_device
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
        return f"model CPU offload onto {device}"
    pipe.vae.to(device)  # small, and it decodes partials between steps: always resident
    if mode == "group":
        hooks: Any = importlib.import_module("diffusers.hooks")

        blocks = settings.local_group_offload_blocks
        # diffusers prefetches on a CUDA stream one block at a time only; larger groups go without.
        stream = device.startswith("cuda") and blocks == 1
        onload, offload = torch.device(device), torch.device("cpu")
        pipe.transformer.enable_group_offload(
            onload_device=onload,
            offload_device=offload,
            offload_type="block_level",
            num_blocks_per_group=blocks,
            use_stream=stream,
        )
        where = f"group offload onto {device} ({blocks} block{'s' if blocks > 1 else ''} a group"
        where += ", prefetched on a CUDA stream)" if stream else ")"
        if text_device is None and pipe.text_encoder is not None:  # bench/gpu.py runs without one
            # Mistral3 has no top-level block list: its layers move one by one (it runs once a job).
            hooks.apply_group_offloading(
                pipe.text_encoder, onload_device=onload, offload_device=offload, offload_type="leaf_level"
            )
    else:
        pipe.transformer.to(device)
        if text_device is None and pipe.text_encoder is not None:
            pipe.text_encoder.to(device)
        where = f"resident on {device}"
    if text_device is not None:
        pipe.text_encoder.to(text_device)
        _pin_execution_device(pipe, device)
        where += f", text encoder on {text_device}"
    return where


def _pin_execution_device(pipe: Any, device: str) -> None:
    """diffusers takes the execution device from the first component off the CPU, in name order:
    the text encoder on a GPU of its own would win, and the latents would land there. The
    pipeline runs on `device`: a subclass (once per pipeline class) says so."""
    import torch

    cls = type(pipe)
    if not getattr(cls, "_fluxport_pinned", False):
        pinned = type(
            cls.__name__,
            (cls,),
            {
                "_fluxport_pinned": True,
                "_execution_device": property(lambda self: self._fluxport_device),
                "__module__": cls.__module__,
            },
        )
        pipe.__class__ = pinned
    pipe._fluxport_device = torch.device(device)


def same_device(a: str, b: str) -> bool:
    """Whether two device names are one device ("cuda" is cuda:0: fluxport never sets another)."""
    import torch

    def resolved(name: str) -> Any:
        d = torch.device(name)
        return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d

    return bool(resolved(a) == resolved(b))


def text_encoder_device(pipe: Any, settings: Settings) -> Any:
    """Where prompts are encoded: the text encoder's own device when it has one, else the pipeline's."""
    import torch

    if settings.local_text_encoder_device is not None:
        return torch.device(settings.local_text_encoder_device)
    return pipe._execution_device


def encode_prompts(pipe: Any, prompts: list[str], settings: Settings) -> dict[str, Any]:
    """The pipeline-call arguments for `prompts`: the prompts themselves, or, with the text encoder
    on a device of its own, their embeddings encoded there and moved to the transformer's device."""
    if settings.local_text_encoder_device is None:
        return {"prompt": prompts}
    embeds, _text_ids = pipe.encode_prompt(prompt=prompts, device=text_encoder_device(pipe, settings))
    return {"prompt_embeds": embeds.to(pipe._execution_device)}  # pinned to the transformer's


def gpu_bytes(pipe: Any, settings: Settings, device: str) -> int:
    """What the loaded, not yet quantised components will take on `device` once quantised."""
    total = 0
    text_device = settings.local_text_encoder_device
    for name in COMPONENTS:
        if name == "text_encoder" and text_device is not None and not same_device(text_device, device):
            continue
        size = sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters())
        if name == "transformer" or (name == "text_encoder" and settings.local_quantize_text_encoder):
            size = int(size * _SHRINK[settings.local_quantize])
        total += size
    return total


def stored_bytes(weights: Path) -> dict[str, int]:
    """Each component's safetensors as stored (bf16): what it takes in memory unquantised."""
    return {
        name: sum(f.stat().st_size for f in (weights / name).glob("*.safetensors")) for name in COMPONENTS
    }


def placement_note(settings: Settings) -> str | None:
    """For the start banner: where FLUX.2 [dev] will run and what that costs (None: no weights)."""
    weights = settings.local_weights
    if weights is None:
        return None
    try:
        import torch
    except ImportError:
        return None  # the provider says itself that the local extra is missing
    sizes = stored_bytes(weights)
    if settings.local_device == "cpu" or not torch.cuda.is_available():
        fp32 = 2 * sum(sizes.values())
        return f"FLUX.2 [dev] on the CPU (about {fp32 / GIB:.0f} GB in fp32): minutes per image."
    shrink = _SHRINK[settings.local_quantize]
    transformer = sizes["transformer"] * shrink
    text = sizes["text_encoder"] * (shrink if settings.local_quantize_text_encoder else 1.0)
    text_device = settings.local_text_encoder_device
    text_elsewhere = text_device is not None and not same_device(text_device, "cuda")
    need = transformer + sizes["vae"] + (0 if text_elsewhere else text)
    quant = "" if settings.local_quantize == "off" else f" with {settings.local_quantize} weights"
    free, _total = torch.cuda.mem_get_info()
    if settings.local_offload == "group":
        return (
            f"FLUX.2 [dev]{quant} with group offload: its transformer streams in from CPU "
            f"memory ({transformer / GIB:.0f} GB of host RAM), a few GB on the GPU; "
            "roughly 1.5-3x slower per step than resident."
        )
    if settings.local_offload == "model" or (settings.local_offload == "auto" and need >= free - HEADROOM):
        return (
            f"FLUX.2 [dev]{quant} needs {need / GIB:.0f} GB resident and this GPU has {free / GIB:.0f} GB "
            "free: it runs with model CPU offload, about 2-4 s slower per component swap (several per job)."
        )
    where = f"; text encoder on {settings.local_text_encoder_device}" if text_elsewhere else ""
    return (
        f"FLUX.2 [dev]{quant} stays resident on the GPU ({need / GIB:.0f} GB of {free / GIB:.0f} GB free)"
        f"{where}."
    )
