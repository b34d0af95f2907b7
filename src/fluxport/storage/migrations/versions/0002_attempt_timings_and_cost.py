"""Hosted attempt timings (submitted, first status) and the cost of each request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fluxport.storage.migration_ops import drop_columns_in_place

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("attempts", "submitted_ms"),
    ("attempts", "first_status_ms"),
    ("requests", "cost_usd"),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, column in COLUMNS:
        # Development databases made before this revision existed may already have a column.
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column(column, sa.Double(), nullable=True))


def downgrade() -> None:
    # In place, not batch mode: a copied table would lose its attempts and images (migration_ops).
    for table, column in reversed(COLUMNS):
        drop_columns_in_place(table, column)
