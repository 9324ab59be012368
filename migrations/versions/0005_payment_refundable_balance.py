"""payments: one refundable balance per payment; refunds name the payment they return

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 19:30:00

Every refund path (user cancel, after-sale, merchant cancel, late payment, a payment refused
for its amount) claims its amount from `payments.refundable` under the row lock of a
conditional UPDATE, in the same transaction as its refund row; a failed refund gives it back.
Existing rows are converted without losing one: each refund is tied to the payment it returns
(a late payment's own, otherwise its order's), and each balance is the payment's amount less
its refunds that have not failed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("payments", sa.Column("refundable", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("refunds", sa.Column("payment_no", sa.String(64), nullable=True))
    op.execute(
        """
        UPDATE refunds r SET payment_no = CASE
            WHEN r.source = 'LATE_PAYMENT' THEN r.source_ref
            ELSE (SELECT o.payment_no FROM orders o WHERE o.order_no = r.order_no) END
        """
    )
    op.execute(
        """
        UPDATE payments p SET refundable = p.amount - coalesce((
            SELECT sum(r.amount) FROM refunds r
            WHERE r.payment_no = p.payment_no AND r.status <> 'FAILED'), 0)
        """
    )
    op.create_index("ix_refunds_payment", "refunds", ["payment_no"])


def downgrade() -> None:
    op.drop_index("ix_refunds_payment", table_name="refunds")
    op.drop_column("refunds", "payment_no")
    op.drop_column("payments", "refundable")
