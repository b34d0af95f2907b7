"""The pages' Jinja2 environment, its filters and the static folder, shared by every web page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from fluxport.catalog import NOISE_NOTE
from fluxport.gateway.service import ImageService

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")


def image_service(request: Request) -> ImageService:
    """The app's ImageService, as the lifespan stored it."""
    service: ImageService = request.app.state.service
    return service


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "free"
    return f"${value:.4f}".rstrip("0").rstrip(".") if value < 0.01 else f"${value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


templates.env.filters["ms"] = _ms
templates.env.filters["usd"] = _usd
templates.env.filters["pct"] = _pct


def render_page(
    request: Request, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> HTMLResponse:
    """Render template `name` with `context` and the note every page may show about the dummy model."""
    return templates.TemplateResponse(
        request, name, {"noise_note": NOISE_NOTE, **context}, status_code=status, headers=headers
    )
