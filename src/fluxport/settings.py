"""Settings: the only place that reads the environment. Built once at start-up and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXPORT_", env_file=None, extra="ignore")

    # Service
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(
        default=None, description="Base URL for image links; defaults to the request's own base URL."
    )
    default_model: str = "flux.2-dev"

    # Storage: SQLite file and image files under data_dir unless database_url says otherwise.
    data_dir: Path = Path("./data")
    database_url: str | None = None

    # Local diffusers provider
    local_weights: Path | None = Field(default=None, description="Directory of FLUX.2 [dev] weights.")
    local_flash_lora: Path | None = Field(
        default=None, description="Turbo LoRA file or directory; serves flux.2-dev-flash locally."
    )
    local_device: Literal["auto", "cuda", "cpu"] = "auto"
    local_steps: int = Field(default=28, ge=1, le=100, description="Denoising steps for flux.2-dev.")
    local_queue_size: int = Field(default=16, ge=1, description="Jobs waiting per device before 429.")
    dummy_steps: int = Field(default=4, ge=1, le=50, description="Denoising steps for flux.2-dummy.")

    # Hosted providers (keys use the providers' own variable names)
    fal_key: str | None = Field(default=None, validation_alias=AliasChoices("FAL_KEY", "FLUXPORT_FAL_KEY"))
    replicate_api_token: str | None = Field(
        default=None, validation_alias=AliasChoices("REPLICATE_API_TOKEN", "FLUXPORT_REPLICATE_API_TOKEN")
    )
    fal_url: str = "https://queue.fal.run"
    replicate_url: str = "https://api.replicate.com"

    # Input limits
    max_prompt_chars: int = 32000
    max_image_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 50_000_000
    max_body_bytes: int = 5 * 50 * 1024 * 1024 + 1024 * 1024

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'fluxport.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"
