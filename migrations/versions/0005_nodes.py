"""The brokers sharing a store: one row per running broker, with its heartbeat.

A broker makes a random node id when it starts, registers it here, and stamps `heartbeat_at`
every few seconds with the database server's clock. Leases name the node id; a node whose
heartbeat is older than `store.node_timeout` (or that is marked stopped) is dead, and its
refreshes are recovered by the others. Host, pid, boot id and pid namespace let a broker tell
at once that a node on its own machine has died, without waiting for the timeout.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the nodes table, and widen lease_owner to hold a node id of any earlier form."""
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("pid_namespace", sa.String(64), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
    )
    with op.batch_alter_table("grants") as batch:
        batch.create_index(batch.f("ix_grants_lease_owner"), ["lease_owner"])


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("grants") as batch:
        batch.drop_index(batch.f("ix_grants_lease_owner"))
    op.drop_table("nodes")
