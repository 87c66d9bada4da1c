"""Device logins (RFC 8628): a login's method, its sealed device authorization, no state.

A device login has no redirect and so no state: `state_hash` may be NULL (a unique column
admits any number of NULLs). `method` says which grant a login uses; `device` holds the
provider's answer (device code, user code, verification URIs, interval), sealed, until the
login finishes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `method` (existing logins are code-flow logins) and `device`; let state be NULL."""
    with op.batch_alter_table("logins") as batch:
        batch.add_column(sa.Column("method", sa.String(16), server_default="code", nullable=False))
        batch.add_column(sa.Column("device", sa.LargeBinary(), nullable=True))
        batch.alter_column("state_hash", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    """Drop device logins (they cannot exist without their columns), then the columns."""
    op.execute(sa.text("DELETE FROM logins WHERE state_hash IS NULL"))
    with op.batch_alter_table("logins") as batch:
        batch.alter_column("state_hash", existing_type=sa.String(64), nullable=False)
        batch.drop_column("device")
        batch.drop_column("method")
