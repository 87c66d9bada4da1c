"""Create the logins table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `logins` with its unique state hash and expiry index."""
    op.create_table(
        "logins",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=True),
        sa.Column("code_verifier", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("force", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_logins")),
        sa.UniqueConstraint("state_hash", name=op.f("uq_logins_state_hash")),
    )
    op.create_index(op.f("ix_logins_expires_at"), "logins", ["expires_at"])


def downgrade() -> None:
    """Drop `logins`."""
    op.drop_index(op.f("ix_logins_expires_at"), table_name="logins")
    op.drop_table("logins")
