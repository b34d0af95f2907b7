"""The fluxport command line: serve the API, or generate and edit in-process with progress bars.

One module per command (group): `serve`, `generate` (and `edit`), `stats`, `keys`, `ray`; `app` holds the
Typer app they register on, in the order `--help` lists them.
"""

from __future__ import annotations

# isort: off
from fluxport.cli.app import app
from fluxport.cli import serve, generate, stats, keys, ray

# isort: on

__all__ = ["app", "generate", "keys", "ray", "serve", "stats"]
