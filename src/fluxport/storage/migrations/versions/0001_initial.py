"""Initial schema: requests, attempts, images.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("operation", sa.String(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.Column("queued_ms", sa.Double(), nullable=True),
        sa.Column("generation_ms", sa.Double(), nullable=True),
        sa.Column("ttfb_ms", sa.Double(), nullable=True),
        sa.Column("total_ms", sa.Double(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("revised_prompt", sa.Text(), nullable=True),
        sa.Column("client_disconnected", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
    )
    op.create_index("ix_requests_model_created_at", "requests", ["model", "created_at"])
    op.create_index("ix_requests_status", "requests", ["status"])

    op.create_table(
        "attempts",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("queued_ms", sa.Double(), nullable=True),
        sa.Column("ttfb_ms", sa.Double(), nullable=True),
        sa.Column("generation_ms", sa.Double(), nullable=True),
        sa.Column("total_ms", sa.Double(), nullable=True),
        sa.Column("error", _json(), nullable=True),
        sa.Column("provider_request_id", sa.String(), nullable=True),
        sa.Column("normalization", _json(), nullable=True),
        sa.Column("billed_usd", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name="fk_attempts_request_id_requests", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
    )
    op.create_index("ix_attempts_model_provider_started_at", "attempts", ["model", "provider", "started_at"])
    op.create_index("ix_attempts_request_id", "attempts", ["request_id"])

    op.create_table(
        "images",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("mime", sa.String(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name="fk_images_request_id_requests", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("request_id", "index", name="uq_images_request_id_index"),
    )
    op.create_index("ix_images_request_id", "images", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_images_request_id", table_name="images")
    op.drop_table("images")
    op.drop_index("ix_attempts_request_id", table_name="attempts")
    op.drop_index("ix_attempts_model_provider_started_at", table_name="attempts")
    op.drop_table("attempts")
    op.drop_index("ix_requests_status", table_name="requests")
    op.drop_index("ix_requests_model_created_at", table_name="requests")
    op.drop_table("requests")
