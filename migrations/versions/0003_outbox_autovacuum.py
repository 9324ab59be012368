"""outbox: vacuum after a fixed number of rows marked sent, not a fifth of the table

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 02:50:00

Marking a row sent leaves an entry in ix_outbox_unsent (and in the primary key and the
message_id index) that only VACUUM removes, and the relay's claim walks the unsent index from
its start. The outbox keeps every row it ever published, so the default trigger (20% of the
table dead) would come later and later: at ten million rows, two million dead entries before
a vacuum. A fixed threshold keeps the walk short however large the outbox grows.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE outbox RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)")
