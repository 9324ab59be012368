"""After-sales and merchant cancellations: their rows, guarded status changes and what is refundable.

`SqlAfterSales` is the `uow.aftersales` repository (store/ports.py `AfterSales`): it reads and
writes the `aftersales` and `merchant_cancellations` tables and logs its changes on the order's
timeline. It announces nothing and decides nothing: the handlers in consumers/aftersale.py do.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.status import AfterSaleAction, AfterSaleStatus, next_aftersale_status
from store import numbers
from store import tables as t
from store.ports import Record
from store.refunds import UNREFUNDED_OPEN

if TYPE_CHECKING:
    from store.uow import UnitOfWork

# Steps of the merchant-cancel operation record.
STEP_REFUND_REQUESTED = "REFUND_REQUESTED"
STEP_REFUNDED = "REFUNDED"
STEP_CLOSED = "CLOSED"


class SqlAfterSales:
    """`uow.aftersales` on PostgreSQL."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    @property
    def conn(self) -> Connection:
        return self.uow.conn

    # -- after-sales ------------------------------------------------------------------------------

    def next_number(self) -> str:
        """A new after-sale number (`A...`)."""
        return numbers.next_number(self.conn, numbers.AFTERSALE, self.uow.now)

    def refundable(self, order: Record) -> int:
        """What may still be refunded on an order: paid, less refunded, pending refunds of its
        payment and open claims; and never more than what remains of its payment once every
        other claim on that payment (the parent's cancellation, the other children's after-sales)
        is counted."""
        refunds = self.uow.refunds
        # Only refunds of the order's own payment: a late or refused payment's refund returns
        # another payment's money and takes nothing from this order's share.
        own_payment = [r for r in refunds.open_for([order.order_no]) if r.payment_no == order.payment_no]
        pending = sum(int(r.amount) for r in own_payment)
        claimed = self.conn.execute(
            select(func.coalesce(func.sum(t.aftersales.c.amount), 0)).where(
                t.aftersales.c.order_no == order.order_no, t.aftersales.c.status.in_(UNREFUNDED_OPEN)
            )
        ).scalar_one()
        own = int(order.paid_amount) - int(order.refunded_amount) - pending - int(claimed)
        of_payment = refunds.balance(order.payment_no) - refunds.promised_claims(order.payment_no)
        return min(own, of_payment)

    def load(self, aftersale_no: str, lock: bool = True) -> Record | None:
        """One after-sale row, locked FOR UPDATE by default."""
        stmt = select(t.aftersales).where(t.aftersales.c.aftersale_no == aftersale_no)
        if lock:
            stmt = stmt.with_for_update()
        return self.conn.execute(stmt).first()

    def require(self, aftersale_no: str) -> Record:
        """The after-sale (locked), or Refusal(UNKNOWN_AFTERSALE)."""
        row = self.load(aftersale_no)
        if row is None:
            raise Refusal(
                Reason.UNKNOWN_AFTERSALE, f"no after-sale {aftersale_no}", aftersale_no=aftersale_no
            )
        return row

    def create(
        self,
        aftersale_no: str,
        order: Record,
        merchant_id: str,
        kind: str,
        amount: int,
        reason: str,
        review_deadline: datetime,
    ) -> None:
        """Insert a new after-sale awaiting the merchant's review."""
        self.conn.execute(
            insert(t.aftersales).values(
                aftersale_no=aftersale_no,
                order_no=order.order_no,
                user_id=order.user_id,
                merchant_id=merchant_id,
                kind=kind,
                amount=amount,
                reason=reason,
                status=AfterSaleStatus.PENDING_REVIEW,
                review_deadline=review_deadline,
                created_at=self.uow.now,
                updated_at=self.uow.now,
            )
        )

    def move(self, aftersale: Record, action: AfterSaleAction, actor: str, **columns: Any) -> AfterSaleStatus:
        """Apply `action` through the after-sale table (Refusal(INVALID_STATE)) under the version
        guard (ConcurrentUpdate); logged on the order's timeline."""
        to_status = next_aftersale_status(aftersale.status, action)
        result = self.conn.execute(
            update(t.aftersales)
            .where(
                t.aftersales.c.aftersale_no == aftersale.aftersale_no,
                t.aftersales.c.version == aftersale.version,
            )
            .values(status=to_status, version=aftersale.version + 1, updated_at=self.uow.now, **columns)
        )
        if result.rowcount != 1:
            raise ConcurrentUpdate(f"after-sale {aftersale.aftersale_no} changed under us")
        self.uow.record(
            aftersale.order_no,
            f"AFTERSALE_{action.value}",
            None,
            None,
            actor,
            {"aftersale_no": aftersale.aftersale_no, "from": aftersale.status, "to": to_status.value},
        )
        return to_status

    def open_unrefunded(self, order_nos: list[str]) -> list[Record]:
        """These orders' after-sales still open and not yet behind a refund, locked."""
        return list(
            self.conn.execute(
                select(t.aftersales)
                .where(t.aftersales.c.order_no.in_(order_nos), t.aftersales.c.status.in_(UNREFUNDED_OPEN))
                .order_by(t.aftersales.c.aftersale_no)
                .with_for_update()
            ).all()
        )

    def set_refund_no(self, aftersale_no: str, refund_no: str) -> None:
        """Tie an after-sale to the refund that pays it."""
        self.conn.execute(
            update(t.aftersales)
            .where(t.aftersales.c.aftersale_no == aftersale_no)
            .values(refund_no=refund_no)
        )

    # -- merchant cancellations: one operation record per cancelled child, advanced step by step --

    def load_cancellation(self, order_no: str, lock: bool = True) -> Record | None:
        """The merchant-cancel record of a child, locked FOR UPDATE by default."""
        stmt = select(t.merchant_cancellations).where(t.merchant_cancellations.c.order_no == order_no)
        if lock:
            stmt = stmt.with_for_update()
        return self.conn.execute(stmt).first()

    def create_cancellation(self, order_no: str, merchant_id: str, reason: str) -> None:
        """Insert the operation record (its first step is the refund request)."""
        self.conn.execute(
            insert(t.merchant_cancellations).values(
                order_no=order_no,
                merchant_id=merchant_id,
                reason=reason,
                step=STEP_REFUND_REQUESTED,
                created_at=self.uow.now,
                updated_at=self.uow.now,
            )
        )

    def advance_cancellation(self, order_no: str, step: str, actor: str, **columns: Any) -> None:
        """Move the operation record to `step` and log the step on the order's timeline."""
        self.conn.execute(
            update(t.merchant_cancellations)
            .where(t.merchant_cancellations.c.order_no == order_no)
            .values(step=step, updated_at=self.uow.now, **columns)
        )
        self.uow.record(order_no, f"MERCHANT_CANCEL_{step}", None, None, actor, dict(columns) or None)


def overdue_reviews(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """After-sales still pending review whose deadline is before `cutoff` (SKIP LOCKED): the sweeper's."""
    rows = conn.execute(
        select(t.aftersales.c.aftersale_no)
        .where(
            t.aftersales.c.status == AfterSaleStatus.PENDING_REVIEW, t.aftersales.c.review_deadline < cutoff
        )
        .order_by(t.aftersales.c.review_deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [r.aftersale_no for r in rows]
