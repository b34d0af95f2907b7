"""`python -m fluxport.cli`: the same as the `fluxport` command."""

from fluxport.cli import app

app()
