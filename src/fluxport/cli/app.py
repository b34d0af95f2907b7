"""The Typer app every command registers on, and help without `<bool>` or `{PROMPT}`."""

from __future__ import annotations

import re
from typing import Any

import typer
from rich.console import Console
from typer import _click
from typer.core import TyperCommand, TyperGroup, TyperOption


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Flags take no value: give them an empty metavar, so Rich help shows no `<bool>` beside them."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose help has no `<bool>` beside flags and no `{PROMPT}` braces in its usage line."""

    def get_params(self, ctx: _click.Context) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        # Typer braces required arguments (`{prompt}`), which reads as a set; Click writes them bare.
        return [re.sub(r"^\{(.+)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class _Group(TyperGroup):
    """A command group whose help shows no `<bool>` beside `--help`."""

    def get_params(self, ctx: _click.Context) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    # Help texts are Rich markup: a literal [dev] must be escaped or it vanishes as a tag.
    help="fluxport: one OpenAI-compatible API for FLUX.2 \\[dev] across fal, Replicate and your own GPUs.\n\n"
    "Configuration comes from the environment (FLUXPORT_DATA_DIR, FLUXPORT_DATABASE_URL, "
    "FLUXPORT_LOCAL_WEIGHTS, FLUXPORT_LOCAL_FLASH_LORA, FLUXPORT_LOCAL_DEVICE, FAL_KEY, "
    "REPLICATE_API_TOKEN, ...); "
    "see the README.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
    context_settings=HELP_OPTIONS,
)
console = Console(stderr=True)


def usd(amount: float) -> str:
    """A dollar amount without trailing zeros: $0.012, $0."""
    return "$" + (f"{amount:.6f}".rstrip("0").rstrip(".") if amount else "0")
