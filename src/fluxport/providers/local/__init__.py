"""The local provider: diffusers' Flux2Pipeline on this machine, one worker thread per device.

torch and diffusers are imported lazily, so this package imports (and reports itself unconfigured)
on an install without the `local` extra.
"""

from fluxport.providers.local.pipeline import GRID, LORA_ADAPTER, PREVIEW_SIDE, UPSAMPLE_TEMPERATURE
from fluxport.providers.local.plan import (
    DEV,
    DEV_GUIDANCE,
    DUMMY,
    FLASH,
    FLASH_GUIDANCE,
    GUIDANCE_RANGE,
    MAX_REFERENCE_ASPECT,
    MAX_STEPS,
    MIN_REFERENCE_SIDE,
    MODELS,
    TURBO_SIGMAS,
)
from fluxport.providers.local.provider import (
    INSTALL_HINT,
    NORMALIZATION,
    LocalProvider,
    local_extra_installed,
)
from fluxport.providers.local.worker import FIRST_GUESS_S

__all__ = [
    "DEV",
    "DEV_GUIDANCE",
    "DUMMY",
    "FIRST_GUESS_S",
    "FLASH",
    "FLASH_GUIDANCE",
    "GRID",
    "GUIDANCE_RANGE",
    "INSTALL_HINT",
    "LORA_ADAPTER",
    "MAX_REFERENCE_ASPECT",
    "MAX_STEPS",
    "MIN_REFERENCE_SIDE",
    "MODELS",
    "NORMALIZATION",
    "PREVIEW_SIDE",
    "TURBO_SIGMAS",
    "UPSAMPLE_TEMPERATURE",
    "LocalProvider",
    "local_extra_installed",
]
