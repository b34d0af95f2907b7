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


def quantize(pipe: Any, settings: Settings, device: str) -> list[str]:
    """FLUXPORT_LOCAL_QUANTIZE (+ _TEXT_ENCODER): quantise in place, each layer moved to its
    device first, so the bf16 weights never need to fit on the GPU at once. Returns what it did."""
    mode = settings.local_quantize
    if mode == "off":
        return []
    done = [f"transformer blocks {_quantize_module(pipe.transformer, mode, device, _transformer_block)}"]
    if settings.local_quantize_text_encoder:
        where = settings.local_text_encoder_device or device
        done.append(f"text encoder {_quantize_module(pipe.text_encoder, mode, where, _language_layer)}")
    return done


def _quantize_module(module: Any, mode: str, device: str, wanted: Any) -> str:
    import torch

    library = {"fp8": "torchao", "nf4": "bitsandbytes"}[mode]
    if importlib.util.find_spec(library) is None:
        raise ProviderFailure(
            f"FLUXPORT_LOCAL_QUANTIZE={mode} needs {library}: pip install 'fluxport[quant]'"
        )

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

        def chosen(m: Any, fqn: str) -> bool:
            return isinstance(m, torch.nn.Linear) and bool(wanted(fqn))

        count = sum(1 for fqn, m in module.named_modules() if chosen(m, fqn))
        ao.quantize_(module, config, filter_fn=chosen, device=device)
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
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        if gpu_bytes(pipe, settings, device) > free - HEADROOM:
            return "model"
    return "none"


def place(pipe: Any, settings: Settings, device: str, mode: str) -> str:
    """Put the pipeline's components where `mode` (offload_mode) and
    FLUXPORT_LOCAL_TEXT_ENCODER_DEVICE say; returns the placement in words (shown while loading)."""
    import torch

    text_device = settings.local_text_encoder_device
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
        return f"model CPU offload onto {device}"
    if text_device is not None:
        pipe.text_encoder.to(text_device)
    if mode == "group":
        cuda = device.startswith("cuda")
        # The VAE is small and decodes partials between steps: it stays resident.
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=settings.local_group_offload_blocks,
            use_stream=cuda,
            exclude_modules=["vae"] + (["text_encoder"] if text_device else []),
        )
        pipe.vae.to(device)
        where = f"group offload onto {device} ({settings.local_group_offload_blocks} blocks a group)"
    else:
        for name in COMPONENTS:
            if name != "text_encoder" or text_device is None:
                getattr(pipe, name).to(device)
        where = f"resident on {device}"
    if text_device is not None:
        where += f", text encoder on {text_device}"
    return where


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
    return {"prompt_embeds": embeds.to(pipe._execution_device)}


def gpu_bytes(pipe: Any, settings: Settings, device: str) -> int:
    """What the loaded, not yet quantised components will take on `device` once quantised."""
    total = 0
    for name in COMPONENTS:
        if name == "text_encoder" and settings.local_text_encoder_device not in (None, device):
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
    text_elsewhere = settings.local_text_encoder_device not in (None, "cuda", "cuda:0")
    need = transformer + sizes["vae"] + (0 if text_elsewhere else text)
    quant = "" if settings.local_quantize == "off" else f" with {settings.local_quantize} weights"
    free, _total = torch.cuda.mem_get_info()
    if settings.local_offload == "group":
        return (
            f"FLUX.2 [dev]{quant} with group offload: its transformer streams in from pinned CPU "
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
