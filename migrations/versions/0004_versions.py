"""Order a grant's writes by a change sequence, never by wall-clock time; remember write ids.

Every write that changes what callers see of a grant takes the next value of one counter
(`grant_changes.seq`, a single row whose lock is held until the writing transaction commits, so
values are handed out in commit order) and stamps it in `grants.version`. Caches order two
writes of a row by (generation, version); other processes follow the store by polling
`version > last seen`, which a write that commits late can never slip under. `last_write`
holds the id of the last commit or settle of a refresh, so a retry can recognise its own write.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the counter (seeded past every row) and the version column with its index."""
    changes = op.create_table(
        "grant_changes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
    )
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), server_default="0", nullable=False))
        batch.add_column(sa.Column("last_write", sa.String(32), nullable=True))
        batch.create_index(batch.f("ix_grants_version"), ["version"])
    # Existing rows get distinct versions in their write order, and the counter starts above.
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id FROM grants ORDER BY updated_at, id")).all()
    for number, (row_id,) in enumerate(rows, start=1):
        bind.execute(
            sa.text("UPDATE grants SET version = :v WHERE id = :id"), {"v": number, "id": row_id}
        )
    op.bulk_insert(changes, [{"id": 1, "seq": len(rows)}])
    # Deletions take a version too, so a process following the sequence learns of them.
    op.create_table(
        "grant_deletions",
        sa.Column("version", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("grant_id", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("deleted_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    """Drop them again."""
    op.drop_table("grant_deletions")
    with op.batch_alter_table("grants") as batch:
        batch.drop_index(batch.f("ix_grants_version"))
        batch.drop_column("last_write")
        batch.drop_column("version")
    op.drop_table("grant_changes")
