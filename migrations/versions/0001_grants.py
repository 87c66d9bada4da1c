"""Create the grants table.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `grants` with its unique (provider, user_name) and its two indexes."""
    op.create_table(
        "grants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("sub", sa.String(255), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("scopes", sa.Text(), server_default="", nullable=False),
        sa.Column("token_type", sa.String(32), server_default="Bearer", nullable=False),
        sa.Column("refresh_token", sa.LargeBinary(), nullable=True),
        sa.Column("access_token", sa.LargeBinary(), nullable=True),
        sa.Column("id_token", sa.LargeBinary(), nullable=True),
        sa.Column("claims", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("access_expires_at", UTCDateTime(), nullable=True),
        sa.Column("next_refresh_at", UTCDateTime(), nullable=True),
        sa.Column("generation", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
        sa.UniqueConstraint("provider", "user_name", name=op.f("uq_grants_provider")),
    )
    op.create_index(op.f("ix_grants_next_refresh_at"), "grants", ["next_refresh_at"])
    op.create_index(op.f("ix_grants_key_id"), "grants", ["key_id"])


def downgrade() -> None:
    """Drop `grants`."""
    op.drop_index(op.f("ix_grants_key_id"), table_name="grants")
    op.drop_index(op.f("ix_grants_next_refresh_at"), table_name="grants")
    op.drop_table("grants")
