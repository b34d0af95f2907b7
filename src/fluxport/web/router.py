"""The one router app.py includes: the catalog and model pages, then the playground."""

from __future__ import annotations

from fastapi import APIRouter

from fluxport.web import pages, playground

router = APIRouter(include_in_schema=False)
router.include_router(pages.router)
router.include_router(playground.router)
