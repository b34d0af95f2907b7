"""FLUXPORT_LOCAL_WARM on a real `fluxport serve`: the named local models load before the server
listens (progress shown), and a model that cannot load stops the start with the reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.serveproc import healthy, serve, start, stop
from tests.services import free_port

pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")


def test_warmed_models_load_before_the_server_listens(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(tmp_path / "data", port, log, FLUXPORT_LOCAL_WARM="flux.2-dummy")
    try:
        text = log.read_text(errors="replace")
        # The progress bar's last state, written before /healthz ever answered (serve waits for it).
        assert "flux.2-dummy: ready" in text
        assert "3/3" in text  # built, placed and ready: every loading stage counted
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything")
        result = client.images.generate(model="flux.2-dummy", prompt="a kite", size="256x256")
        assert result.data and result.data[0].url
    finally:
        stop(proc)


def test_a_model_that_cannot_load_stops_the_start(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = start(
        tmp_path / "data", port, log, strip_prefixes=("FLUXPORT_LOCAL_",), FLUXPORT_LOCAL_WARM="flux.2-dev"
    )
    try:
        code = proc.wait(timeout=120)
        text = log.read_text(errors="replace")
        assert code != 0
        assert "FLUXPORT_LOCAL_WARM: flux.2-dev could not be loaded" in text
        assert "FLUXPORT_LOCAL_WEIGHTS" in text  # what to set, from the provider's own state
        assert not healthy(port)
    except subprocess.TimeoutExpired:
        pytest.fail("fluxport serve kept running with a model it could not warm")
    finally:
        stop(proc)
