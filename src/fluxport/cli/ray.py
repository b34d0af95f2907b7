"""`fluxport ray`: deploy the local provider on Ray Serve (one replica per GPU, autoscaled) and
print the upstream entry a gateway needs to reach it."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Annotated

import typer

from fluxport.cli.app import _Command, app, console
from fluxport.settings import Settings


@app.command(cls=_Command)
def ray(
    host: Annotated[str, typer.Option(help="Interface Ray's HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of Ray's HTTP proxy.")] = 8000,
    address: Annotated[
        str | None, typer.Option(help="A running Ray cluster (ray start --head); default: start one here.")
    ] = None,
    min_replicas: Annotated[int, typer.Option(min=0, help="Replicas kept running.")] = 1,
    max_replicas: Annotated[int, typer.Option(min=1, help="Replicas Ray may scale up to.")] = 1,
    target_ongoing_requests: Annotated[
        float, typer.Option(min=0.1, help="Requests in flight per replica Ray scales towards.")
    ] = 2.0,
    max_ongoing_requests: Annotated[int, typer.Option(min=1, help="Requests one replica takes at once.")] = 4,
    gpus_per_replica: Annotated[
        float, typer.Option(min=0.0, help="GPUs per replica: 1 is one replica per GPU; 0 on a CPU.")
    ] = 1.0,
    data_dir: Annotated[str | None, typer.Option(help="Where each replica's data dir goes.")] = None,
) -> None:
    """Serve FLUX.2 from Ray Serve replicas, for a gateway to use as an upstream."""
    try:
        import ray as ray_core
        from ray import serve

        from fluxport.ray_serve import RayWorkers, build
    except ImportError as exc:
        console.print(f'[red]error[/]: Ray is not installed ({exc}); pip install "fluxport[ray]"')
        raise typer.Exit(2) from None
    workers = RayWorkers(
        min_replicas=min_replicas,
        max_replicas=max(min_replicas, max_replicas),
        target_ongoing_requests=target_ongoing_requests,
        max_ongoing_requests=max_ongoing_requests,
        gpus_per_replica=gpus_per_replica,
        data_dir=data_dir,
    )
    with console.status("Starting Ray and the replicas (each loads its pipeline on first use)..."):
        ray_core.init(address=address, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(workers), name="fluxport", route_prefix="/")
    entry = {
        "name": "ray",
        "base_url": f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1",
        "models": {model: model for model in _served(Settings())},
        "max_concurrency": max(1, workers.max_replicas * workers.max_ongoing_requests),
    }
    console.print(
        f"fluxport on Ray Serve at http://{host}:{port}: {workers.min_replicas}-{workers.max_replicas} "
        f"replica(s), {workers.gpus_per_replica:g} GPU each, scaling towards "
        f"{workers.target_ongoing_requests:g} requests in flight per replica."
    )
    console.print("Point a gateway at it with:", style="bold")
    console.print(f"FLUXPORT_UPSTREAMS='{json.dumps([entry])}'", soft_wrap=True, highlight=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray_core.shutdown()


def _served(settings: Settings) -> list[str]:
    """The models the replicas serve with this environment (they read the same settings)."""
    models = ["flux.2-dummy"]
    if settings.local_weights is not None:
        models.insert(0, "flux.2-dev")
        if settings.local_flash_lora is not None:
            models.insert(1, "flux.2-dev-flash")
    return models
