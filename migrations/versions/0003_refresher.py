"""Add the refresher's columns to grants: issue time, failures, intent record, lease.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns and the index the change poll reads by."""
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("access_issued_at", UTCDateTime(), nullable=True))
        batch.add_column(
            sa.Column("refresh_failures", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("intent_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime(), nullable=True))
        batch.create_index(batch.f("ix_grants_updated_at"), ["updated_at"])


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("grants") as batch:
        batch.drop_index(batch.f("ix_grants_updated_at"))
        for column in (
            "lease_expires_at",
            "lease_owner",
            "intent_at",
            "refresh_failures",
            "access_issued_at",
        ):
            batch.drop_column(column)
