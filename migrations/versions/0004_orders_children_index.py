"""orders: the index of children by parent holds children only

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 03:00:00

ix_orders_parent indexed every order, parents under NULL. Before the first ANALYZE of a new
database the planner took it as the most selective index for `parent_no IS NULL` and looked
up a placement window's request ids by walking every parent order (2 to 4.5 ms a window,
growing with the table, in the first minute of the latency probe) instead of using
uq_orders_user_request. Children are only ever looked up by `parent_no = ...`, so the index
needs no NULLs. Built and dropped concurrently: no lock on orders' writers.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_children ON orders (parent_no) "
            "WHERE parent_no IS NOT NULL"
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_orders_parent")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_parent ON orders (parent_no)")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_orders_children")
