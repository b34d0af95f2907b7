"""The CLI runs in-process: generate and edit write real image files; serve says what it serves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxport.cli import app
from tests.conftest import free_port
from tests.imagefactory import png_bytes
from tests.serveproc import serve, stop


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLUXPORT_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    for name in ("FAL_KEY", "REPLICATE_API_TOKEN", "FLUXPORT_LOCAL_WEIGHTS", "FLUXPORT_DEFAULT_MODEL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "fluxport.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_help_documents_every_command(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "--help")
    assert out.returncode == 0
    for command in ("serve", "generate", "edit"):
        assert command in out.stdout
    gen = run_cli(tmp_path, "generate", "--help")
    assert "--aspect-ratio" in gen.stdout and "--output" in gen.stdout


def test_generate_writes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "cat.webp"
    out = run_cli(
        tmp_path,
        "generate",
        "a cat",
        "-m",
        "flux.2-dummy",
        "--size",
        "320x272",
        "--seed",
        "3",
        "-o",
        str(target),
    )
    assert out.returncode == 0, out.stderr
    image = Image.open(target)
    assert image.format == "WEBP" and image.size == (320, 272)
    assert "noise" in out.stderr  # the dummy model says what it is
    assert "Denoising" in out.stderr


def test_edit_with_two_references(tmp_path: Path) -> None:
    refs = []
    for i, (w, h) in enumerate([(300, 200), (200, 200)]):
        ref = tmp_path / f"ref{i}.png"
        ref.write_bytes(png_bytes(w, h))
        refs += ["-i", str(ref)]
    target = tmp_path / "edit.png"
    out = run_cli(tmp_path, "edit", "blend", *refs, "-m", "flux.2-dummy", "-n", "2", "-o", str(target))
    assert out.returncode == 0, out.stderr
    for i in (1, 2):
        image = Image.open(tmp_path / f"edit-{i}.png")
        assert abs(image.size[0] / image.size[1] - 1.5) < 0.01


def test_errors_are_clear(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "generate", "a cat", "-m", "flux.2-dev", "-o", str(tmp_path / "x.png"))
    assert out.returncode == 1
    said = " ".join(out.stderr.split())  # Rich wraps lines at 80 columns off a terminal
    assert "FAL_KEY" in said and "FLUX.2 [dev]" in said  # the brackets are not eaten as Rich markup
    # In-process there is no server to restart: the environment is read afresh on the next run.
    assert "restart" not in said
    assert "then run this command again" in said and "use -m flux.2-dummy" in said


def test_generate_without_a_model_uses_the_dummy_when_nothing_is_configured(tmp_path: Path) -> None:
    target = tmp_path / "fox.png"
    out = run_cli(tmp_path, "generate", "a red fox", "--size", "256x256", "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert Image.open(target).size == (256, 256) and "noise" in out.stderr


HELP_PAGES = [
    [],
    ["generate"],
    ["edit"],
    ["serve"],
    ["stats"],
    ["keys"],
    ["keys", "create"],
    ["keys", "revoke"],
]


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda c: " ".join(c) or "fluxport")
def test_help_has_no_typer_artefacts(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "100"}, prog_name="fluxport")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert "<bool>" not in result.output  # flags take no value
    usage = next(line for line in lines if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    if command in (["generate"], ["edit"]):
        assert re.search(r"Usage: fluxport \w+ \[OPTIONS\] PROMPT\s*$", usage)
    if not command:
        assert "FLUX.2 [dev] across" in result.output  # not swallowed as a markup tag


def test_dash_h_is_help() -> None:
    result = CliRunner().invoke(app, ["generate", "-h"], env={"COLUMNS": "100"}, prog_name="fluxport")
    assert result.exit_code == 0 and "Usage: fluxport generate" in result.output


def serve_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start `fluxport serve` with nothing configured but `env`; its process, base URL and output."""
    for name in ("FLUXPORT_LOCAL_WEIGHTS", "FLUXPORT_DEFAULT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve(tmp_path / "data", port, log, COLUMNS="100", **env)
    return proc, f"http://127.0.0.1:{port}", log.read_text()


def sdk_snippet(log: str) -> str:
    match = re.search(r"^from openai import OpenAI$.*?^print\(result\.data\[0\]\.url\)$", log, re.M | re.S)
    assert match, log
    return match.group(0)


def test_serve_banner_names_the_default_model_and_a_working_sdk_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, base, log = serve_log(tmp_path, monkeypatch, FLUXPORT_AUTH="keys")
    try:
        said = " ".join(log.split())
        assert (
            "Default model: flux.2-dummy (nothing else is configured; set FLUXPORT_LOCAL_WEIGHTS, FAL_KEY "
            "or REPLICATE_API_TOKEN to serve flux.2-dev)" in said
        )
        snippet = sdk_snippet(log)
        assert f'base_url="{base}/v1"' in snippet and 'model="flux.2-dummy"' in snippet
        # Pasted as printed, with the first key the server printed below it in place of fp_...
        key = re.findall(r"^\s+(fp_\S+)$", log, re.M)
        assert len(key) == 1, log
        ran = subprocess.run(
            [sys.executable, "-c", snippet.replace('api_key="fp_..."', f'api_key="{key[0]}"')],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.startswith(f"{base}/images/")
    finally:
        stop(proc)


def test_serve_models_table_states_each_provider_in_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, _, log = serve_log(tmp_path, monkeypatch, FLUXPORT_AUTH="none", FAL_KEY="fal-test-key")
    try:
        assert all(len(line) <= 100 for line in log.splitlines() if "│" in line)
        assert re.search(
            r"│ flux\.2-dev \(default\)\s+│ local\s+│ not configured: set FLUXPORT_LOCAL_WEIGHTS", log
        )
        assert re.search(r"│ fal\s+│ configured: fal queue API at", log)
        assert re.search(r"│ replicate\s+│ not configured: set REPLICATE_API_TOKEN", log)
        assert re.search(r"│ flux\.2-dummy \(noise\)\s+│ local\s+│ configured: built in", log)
        assert "FLUX.2 [dev]" in log  # a provider's detail, not eaten as Rich markup
        said = " ".join(log.split())
        assert "Default model: flux.2-dev (the first configured model;" in said
        assert 'api_key="anything"' in sdk_snippet(log) and "FLUXPORT_AUTH=none" in said
    finally:
        stop(proc)
