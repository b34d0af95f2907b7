"""Settings: the only place that reads the environment. Built once at start-up and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from fluxport.storage.engine import PoolSizing


RESERVED_PROVIDER_NAMES = frozenset({"local", "fal", "replicate"})


class UpstreamConfig(BaseModel):
    """One server that speaks OpenAI's Images API (another fluxport, SGLang-Diffusion, vLLM-Omni,
    a Ray Serve deployment): a provider named `name`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="The provider's name (provider=...).")
    base_url: str = Field(pattern=r"^https?://", description="Its API root, e.g. http://10.0.0.5:8000/v1.")
    api_key: str | None = Field(default=None, repr=False, description="Sent as Authorization: Bearer.")
    models: dict[str, str] = Field(
        min_length=1, description="fluxport model id -> the model name the upstream serves it as."
    )
    price_per_mp: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="USD per megapixel.")
    max_concurrency: int = Field(default=4, ge=1, le=1024, description="Requests in flight at most.")
    max_images_per_call: int = Field(default=4, ge=1, le=10, description="Largest n it takes in one call.")
    output_formats: tuple[Literal["png", "jpeg", "webp"], ...] = Field(
        default=("png",), min_length=1, description="Formats it encodes itself (sent as output_format)."
    )
    timeout_s: float = Field(default=600.0, gt=0, description="Longest one call may take.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXPORT_", env_file=None, extra="ignore")

    # Service
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(
        default=None, description="Base URL for image links; defaults to the request's own base URL."
    )
    # The model of a request that names none (the SDK's default shape); unset: the first model in
    # the catalog with a configured provider (flux.2-dummy when nothing else is configured).
    default_model: str | None = None

    # Storage: SQLite file and image files under data_dir unless database_url says otherwise.
    data_dir: Path = Path("./data")
    database_url: str | None = None
    # PostgreSQL's connection pool, per process: every replica and every worker has its own.
    database_pool_size: int = Field(
        default=10, ge=1, description="PostgreSQL connections each process keeps open."
    )
    database_max_overflow: int = Field(
        default=20, ge=0, description="Connections a process may open beyond the pool size under load."
    )
    database_pool_timeout_s: float = Field(
        default=30.0, gt=0, description="How long a query waits for a free connection before failing."
    )
    database_migration_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a starting process waits for another one's migration (PostgreSQL).",
    )
    # Image files: under data_dir/images, or in an S3-compatible bucket every replica shares.
    blob_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix for image files (pip install 'fluxport[s3]'); "
        "unset: data_dir/images.",
    )
    blob_endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+/?$",
        description="The S3 API's base URL for MinIO, R2, Ceph...; unset: AWS S3.",
    )
    blob_region: str | None = Field(
        default=None, description="The bucket's region; unset: AWS_REGION, else us-east-1."
    )
    blob_downloads: Literal["proxy", "presign"] = Field(
        default="proxy",
        description="proxy: image links stream the object through the gateway; presign: they redirect "
        "(307) to a presigned GET URL valid until the link expires.",
    )
    # The standard AWS variables; unset: the rest of the AWS chain (web identity, container or
    # instance role). As keyword arguments, by these names: Settings(AWS_ACCESS_KEY_ID=...).
    blob_access_key_id: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "FLUXPORT_BLOB_ACCESS_KEY_ID")
    )
    blob_secret_access_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "FLUXPORT_BLOB_SECRET_ACCESS_KEY"),
    )
    blob_session_token: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SESSION_TOKEN", "FLUXPORT_BLOB_SESSION_TOKEN")
    )

    # Live state shared by replicas (rate limits, circuit breakers); unset: in this process's memory.
    redis_url: str | None = Field(
        default=None,
        description="redis:// URL shared by every replica (pip install 'fluxport[redis]'); "
        "unset: limits and breakers are per process.",
    )
    redis_prefix: str = Field(
        default="fluxport:",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Prefix of every Redis key: one Redis can serve several separate gateways.",
    )

    # Local diffusers provider
    local_weights: Path | None = Field(default=None, description="Directory of FLUX.2 [dev] weights.")
    local_flash_lora: Path | None = Field(
        default=None, description="Turbo LoRA file or directory; serves flux.2-dev-flash locally."
    )
    local_device: Literal["auto", "cuda", "cpu"] = "auto"
    local_steps: int = Field(default=28, ge=1, le=100, description="Denoising steps for flux.2-dev.")
    local_queue_size: int = Field(default=16, ge=1, description="Jobs waiting per device before 429.")
    dummy_steps: int = Field(default=4, ge=1, le=50, description="Denoising steps for flux.2-dummy.")
    local_compile: bool = Field(
        default=False,
        description="torch.compile the transformer's repeated blocks (regional: one block compiled, "
        "shared by all; a new size recompiles that block only). The first call pays the compile.",
    )
    # Step caching (diffusers' cache hooks): TaylorSeer computes the transformer fully every
    # `interval` steps and forecasts the steps between from a Taylor series of its features.
    local_step_cache: Literal["off", "taylorseer"] = Field(
        default="off", description="Skip transformer work between steps (faster, slightly different)."
    )
    local_step_cache_interval: int = Field(
        default=5, ge=2, le=20, description="TaylorSeer: full transformer passes every N steps."
    )
    local_step_cache_warmup_steps: int = Field(
        default=3, ge=1, le=50, description="TaylorSeer: first steps always computed in full."
    )
    # Weights and placement (README "Your own GPUs" gives the memory each needs). FLUX.2 [dev] is
    # a 32B transformer (64 GB in bf16) and a 24B Mistral text encoder (48 GB in bf16).
    local_quantize: Literal["off", "fp8", "nf4"] = Field(
        default="off",
        description="The transformer blocks' weights: fp8 (torchao; 32 GB, dynamic FP8 matmuls on "
        "H100-class GPUs, weight-only elsewhere) or nf4 (bitsandbytes 4-bit; about 18 GB).",
    )
    local_quantize_text_encoder: bool = Field(
        default=False,
        description="Quantise the text encoder's language layers the same way (fp8: 24 GB; nf4: 13 GB).",
    )
    local_text_encoder_device: str | None = Field(
        default=None,
        pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="Run the text encoder here (another GPU, or cpu) instead of with the transformer.",
    )
    local_offload: Literal["auto", "none", "model", "group"] = Field(
        default="auto",
        description="auto: resident when it fits, else model offload; model: one component on the "
        "GPU at a time; group: the transformer's blocks stream in from pinned CPU memory (small cards).",
    )
    local_group_offload_blocks: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Group offload: transformer blocks moved to the GPU per group (1: prefetched on "
        "a CUDA stream while the previous block computes; more: larger groups, no stream).",
    )
    # Batching: concurrent jobs with the same size, steps, guidance and model run in one call.
    local_batch_images: int = Field(
        default=1,
        ge=1,
        le=32,
        description="Most images one pipeline call may run for several waiting jobs (1: no batching).",
    )
    local_batch_megapixels: float = Field(
        default=4.2,
        gt=0,
        description="Most megapixels one batched call may generate: the activations' memory bound.",
    )
    local_warm: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Local models to load (and compile) at start, before serving: comma-separated.",
    )

    # Hosted providers (keys use the providers' own variable names)
    fal_key: str | None = Field(default=None, validation_alias=AliasChoices("FAL_KEY", "FLUXPORT_FAL_KEY"))
    replicate_api_token: str | None = Field(
        default=None, validation_alias=AliasChoices("REPLICATE_API_TOKEN", "FLUXPORT_REPLICATE_API_TOKEN")
    )
    fal_url: str = "https://queue.fal.run"
    replicate_url: str = "https://api.replicate.com"
    hosted_poll_interval_s: float = Field(
        default=0.25, gt=0, description="First status poll; then backs off."
    )
    hosted_max_poll_interval_s: float = Field(default=2.0, gt=0, description="Longest gap between polls.")
    hosted_max_connections: int = Field(
        default=1024,
        ge=4,
        description="Kept-alive connections per hosted provider (bounds its requests in flight).",
    )

    # Routing: candidates are ordered from live stats; failover, circuit breaker, hedging, deadline.
    router_strategy: Literal["balanced", "fastest", "cheapest"] = "balanced"
    router_cost_weight: float = Field(
        default=200.0, ge=0, description="balanced: seconds of expected latency one dollar is worth."
    )
    hedge: bool = Field(default=False, description="Start a backup attempt when the primary is slow.")
    hedge_percentile: float = Field(
        default=0.75, gt=0, lt=1, description="Hedge after this latency percentile."
    )
    hedge_min_samples: int = Field(default=20, ge=1, description="Samples needed before hedging a provider.")
    breaker_failures: int = Field(default=5, ge=1, description="Consecutive failures that open the breaker.")
    breaker_cooldown_s: float = Field(default=30.0, gt=0, description="First cool-down of an open breaker.")
    request_deadline_s: float = Field(default=300.0, gt=0, description="Overall deadline per request.")

    # Keys, idempotency and stored links (issue #6)
    auth: Literal["keys", "none"] = Field(
        default="keys",
        description="keys: Bearer API keys on every /v1 route; none: open (local experiments).",
    )
    otel: bool = Field(
        default=False,
        description="FastAPI's built-in OpenTelemetry spans, metrics and logs (with an OTel SDK configured).",
    )
    image_fsync: Literal["before_answer", "after_answer"] = Field(
        default="after_answer",
        description="When a saved image is fsynced: before the answer (power-loss durable when the "
        "client gets its link; ~1-2 ms more per request, far more under load) or right after it "
        "(kill -9 safe either way; a file torn by a power cut in between is removed at start).",
    )
    image_ttl_s: int = Field(default=24 * 3600, ge=1, description="How long image links (url) stay valid.")
    stream_keepalive_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Streamed requests: an SSE comment after this many seconds without an event, so "
        "proxies keep the connection open while a provider works.",
    )
    idempotency_ttl_s: int = Field(
        default=24 * 3600, ge=60, description="How long Idempotency-Key answers are kept."
    )
    # Hosts result images may be downloaded from (besides the configured provider URLs' own hosts);
    # unset, each hosted provider allows the hosts it serves images from (its DOWNLOAD_HOSTS).
    download_hosts: list[str] | None = Field(
        default=None,
        description="Result images are fetched only over https from these domains (and their subdomains).",
    )

    # Input limits
    max_prompt_chars: int = 32000
    max_image_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 50_000_000
    max_body_bytes: int = 5 * 50 * 1024 * 1024 + 1024 * 1024
    # A JSON body holds a prompt and parameters, never images: refused (413) beyond this.
    max_json_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Each provider-specific or unknown field is handed on to a provider: bounded in size and depth.
    max_extra_field_bytes: int = Field(default=16 * 1024, ge=64)
    max_extra_field_depth: int = Field(default=4, ge=1)

    # Slow and greedy clients, cut off at the connection (api/connections.py); 0 turns one off.
    header_timeout_s: float = Field(
        default=10.0, ge=0, description="Seconds for a request's line and headers to arrive; else 408."
    )
    body_timeout_s: float = Field(
        default=30.0, ge=0, description="Longest pause between two reads of a request body; else 408."
    )
    max_connections_per_client: int = Field(
        default=100,
        ge=0,
        description="Open connections one client address may hold (trusted proxies exempt); else 429.",
    )

    # Web pages and playground (no API key; limited per client IP instead)
    playground_rate_per_minute: int = Field(
        default=10, ge=0, description="Playground submissions per client IP per minute; 0 means no limit."
    )

    # Behind a load balancer: the addresses whose X-Forwarded-For / X-Forwarded-Proto are believed
    # (the per-IP limits then key on the real client). Empty: nobody's, so a client cannot spoof them.
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description='Proxy IPs or networks allowed to set X-Forwarded-For, e.g. ["10.0.0.0/8"]; "*" for any.',
    )

    # Pricing: "provider/model" -> US dollars per megapixel, for references and output alike; wins
    # over each provider's list price. FLUXPORT_PRICES='{"local/flux.2-dev": 0.002}'.
    prices: dict[
        Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[^/\s]+/[^\s]+$")],
        Annotated[float, Field(ge=0, allow_inf_nan=False)],
    ] = Field(default_factory=dict, description="Per-megapixel prices by provider/model.")

    # OpenAI-compatible upstreams, each a provider: a JSON list (FLUXPORT_UPSTREAMS) or a file
    # holding the same list (FLUXPORT_UPSTREAMS_FILE).
    upstreams: list[UpstreamConfig] = Field(
        default_factory=list, description="OpenAI Images API servers to route to, each a provider."
    )
    upstreams_file: Path | None = Field(
        default=None, description="A JSON file with the upstreams list (instead of FLUXPORT_UPSTREAMS)."
    )

    @model_validator(mode="after")
    def _compile_or_step_cache(self) -> Settings:
        if self.local_compile and self.local_step_cache != "off":
            raise ValueError(
                "FLUXPORT_LOCAL_COMPILE and FLUXPORT_LOCAL_STEP_CACHE do not combine: the cache's hooks "
                "break the transformer's compiled graph (diffusers 0.42); choose one"
            )
        return self

    @field_validator("local_warm", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _local_placement(self) -> Settings:
        from fluxport.providers.local.plan import MODELS as local  # data only, no torch

        for model in self.local_warm:
            if model not in local:
                raise ValueError(f"FLUXPORT_LOCAL_WARM: {model!r} is not a local model ({', '.join(local)})")
        if self.local_quantize_text_encoder and self.local_quantize == "off":
            raise ValueError("FLUXPORT_LOCAL_QUANTIZE_TEXT_ENCODER needs FLUXPORT_LOCAL_QUANTIZE=fp8 or nf4")
        nf4 = self.local_quantize == "nf4"
        if nf4 and self.local_offload in ("model", "group"):
            raise ValueError(
                f"FLUXPORT_LOCAL_QUANTIZE=nf4 and FLUXPORT_LOCAL_OFFLOAD={self.local_offload} do not "
                "combine: bitsandbytes quantises the weights on their way to the GPU, where they stay"
            )
        if self.local_compile and self.local_offload == "group":
            raise ValueError(
                "FLUXPORT_LOCAL_COMPILE and FLUXPORT_LOCAL_OFFLOAD=group do not combine: the offload "
                "hooks are excluded from the compiled graph (diffusers 0.42); choose one"
            )
        if self.local_offload == "model" and self.local_text_encoder_device:
            raise ValueError(
                "FLUXPORT_LOCAL_OFFLOAD=model moves every component to one GPU in turn; "
                "FLUXPORT_LOCAL_TEXT_ENCODER_DEVICE needs auto, none or group"
            )
        return self

    @model_validator(mode="after")
    def _upstreams(self) -> Settings:
        if self.upstreams_file is not None:
            if self.upstreams:
                raise ValueError("set FLUXPORT_UPSTREAMS or FLUXPORT_UPSTREAMS_FILE, not both")
            import json

            from pydantic import TypeAdapter

            try:
                raw = json.loads(self.upstreams_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"FLUXPORT_UPSTREAMS_FILE {self.upstreams_file}: {exc}") from None
            self.upstreams = TypeAdapter(list[UpstreamConfig]).validate_python(raw)
        names = [u.name for u in self.upstreams]
        for name in names:
            if name in RESERVED_PROVIDER_NAMES:
                raise ValueError(f"upstream name {name!r} is a built-in provider's; choose another")
            if names.count(name) > 1:
                raise ValueError(f"upstream name {name!r} is used twice")
        from fluxport.catalog import MODELS  # data only

        for upstream in self.upstreams:
            unknown = sorted(set(upstream.models) - set(MODELS))
            if unknown:
                raise ValueError(
                    f"upstream {upstream.name!r} names unknown models {unknown}; known: {sorted(MODELS)}"
                )
        return self

    @field_validator("blob_url")
    @classmethod
    def _blob_url(cls, value: str | None) -> str | None:
        if value:
            from fluxport.storage.blobs.factory import parse_blob_url  # storage owns the format

            parse_blob_url(value)  # raises, saying what is expected
        return value or None

    @model_validator(mode="after")
    def _presign_needs_a_bucket(self) -> Settings:
        if self.blob_downloads == "presign" and not self.blob_url:
            raise ValueError(
                "FLUXPORT_BLOB_DOWNLOADS=presign needs FLUXPORT_BLOB_URL (s3://bucket/prefix): "
                "files in the data directory have no presigned URLs"
            )
        return self

    @property
    def shared_database(self) -> bool:
        """Whether replicas on several processes can share the database (not SQLite)."""
        return not self.resolved_database_url.startswith("sqlite")

    @property
    def database_pool(self) -> PoolSizing:
        from fluxport.storage.engine import PoolSizing  # storage owns the engine (and its imports)

        return PoolSizing(
            size=self.database_pool_size,
            max_overflow=self.database_max_overflow,
            timeout_s=self.database_pool_timeout_s,
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'fluxport.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


def redact_url(url: str) -> str:
    """A URL fit for logs and banners: its password (anything before '@') hidden."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
