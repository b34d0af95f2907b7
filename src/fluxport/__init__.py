"""fluxport: one OpenAI-compatible API for FLUX.2 [dev] across hosted providers and local GPUs."""

__version__ = "0.1.0"
