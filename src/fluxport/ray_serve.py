"""FLUX.2 on Ray Serve: the local provider as a deployment, one replica per GPU, autoscaled.

Each replica is a whole fluxport app (OpenAI's images routes, `/healthz`) serving only the local
provider on the GPU Ray gives it, with its own data directory; the gateway reaches the
deployment through Ray's HTTP proxy as an OpenAI upstream (FLUXPORT_UPSTREAMS). Two ways to run:

    fluxport ray --max-replicas 4                 # starts or joins Ray, deploys, prints the upstream
    serve run fluxport.ray_serve:app              # Ray's own CLI; knobs from FLUXPORT_RAY_* below

Ray decides the replica count between `min_replicas` and `max_replicas` from the requests each
replica has in flight (`target_ongoing_requests`). A replica holds one pipeline, so it takes
`max_ongoing_requests` (default 4) at a time and queues the rest in the local provider's queue.

Ray is an optional extra: `pip install "fluxport[ray]"`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application


@dataclass(frozen=True)
class RayWorkers:
    """How the deployment scales and what each replica gets."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 4
    gpus_per_replica: float = 1.0  # one replica per GPU; 0 on a CPU-only cluster (the dummy model)
    cpus_per_replica: float = 1.0
    data_dir: str | None = None  # each replica's own directory goes under it (default: the temp dir)
    settings: dict[str, Any] = field(default_factory=dict)  # more fluxport settings for replicas

    @classmethod
    def from_env(cls) -> RayWorkers:
        """The knobs of `serve run fluxport.ray_serve:app`: FLUXPORT_RAY_MIN_REPLICAS and so on."""

        def number(name: str, default: float) -> float:
            return float(os.environ.get(f"FLUXPORT_RAY_{name}", default))

        return cls(
            min_replicas=int(number("MIN_REPLICAS", 1)),
            max_replicas=int(number("MAX_REPLICAS", 1)),
            target_ongoing_requests=number("TARGET_ONGOING_REQUESTS", 2.0),
            max_ongoing_requests=int(number("MAX_ONGOING_REQUESTS", 4)),
            gpus_per_replica=number("GPUS_PER_REPLICA", 1.0),
            cpus_per_replica=number("CPUS_PER_REPLICA", 1.0),
            data_dir=os.environ.get("FLUXPORT_RAY_DATA_DIR"),
        )


_SHARED = frozenset({"database_url", "redis_url", "blob_url", "blob_downloads"})


class FluxportReplica:
    """One replica: fluxport's app, built inside the replica (nothing big is pickled)."""

    def __init__(self, data_dir: str | None, settings: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        from fluxport.api.app import create_app
        from fluxport.settings import Settings

        replica = serve.get_replica_context().replica_tag.replace("#", "-")
        root = Path(self.data_dir or tempfile.gettempdir())
        settings = Settings(
            **{
                # Inside the cluster, behind the gateway: the gateway authenticates its users (set
                # FLUXPORT_AUTH=keys and a shared database in `settings` to require keys here too).
                "auth": "none",
                **self.settings,
                "data_dir": root / f"fluxport-ray-{replica}",
                # Only this replica's GPU: hosted providers and upstreams belong to the gateway.
                "fal_key": None,
                "replicate_api_token": None,
                "upstreams": [],
                # Its own records and files: not the gateway's database, Redis or bucket (pass
                # them in `settings` on purpose to share them).
                "database_url": None,
                "redis_url": None,
                "blob_url": None,
                "blob_downloads": "proxy",
                **{k: v for k, v in self.settings.items() if k in _SHARED},
            }
        )
        return create_app(settings)


def build(workers: RayWorkers) -> Application:
    """The Serve application for `workers`."""
    ingress = serve.ingress()(FluxportReplica)
    deployment = serve.deployment(
        name="fluxport",
        ray_actor_options={"num_gpus": workers.gpus_per_replica, "num_cpus": workers.cpus_per_replica},
        autoscaling_config={
            "min_replicas": workers.min_replicas,
            "max_replicas": max(workers.min_replicas, workers.max_replicas),
            "target_ongoing_requests": workers.target_ongoing_requests,
        },
        max_ongoing_requests=workers.max_ongoing_requests,
        health_check_period_s=10,
    )(ingress)
    return deployment.bind(workers.data_dir, workers.settings)


def app_from_env() -> Application:
    return build(RayWorkers.from_env())


# `serve run fluxport.ray_serve:app`
app = app_from_env()
