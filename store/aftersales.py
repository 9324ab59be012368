"""After-sales and merchant cancellations: their rows, guarded status changes and what is refundable."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.status import AfterSaleAction, AfterSaleStatus, next_aftersale_status
from store import tables as t
from store.refunds import PENDING_REFUNDS, UNREFUNDED_OPEN, promised_claims, refundable_balance
from store.uow import UnitOfWork

# Steps of the merchant-cancel operation record.
STEP_REFUND_REQUESTED = "REFUND_REQUESTED"
STEP_REFUNDED = "REFUNDED"
STEP_CLOSED = "CLOSED"


def refundable(conn: Connection, order: Row[Any]) -> int:
    """What may still be refunded on an order: paid, less refunded, pending refunds and open
    claims; and never more than what remains of its payment once every other claim on that
    payment (the parent's cancellation, the other children's after-sales) is counted."""
    pending = conn.execute(
        select(func.coalesce(func.sum(t.refunds.c.amount), 0)).where(
            t.refunds.c.order_no == order.order_no, t.refunds.c.status.in_(PENDING_REFUNDS)
        )
    ).scalar_one()
    claimed = conn.execute(
        select(func.coalesce(func.sum(t.aftersales.c.amount), 0)).where(
            t.aftersales.c.order_no == order.order_no, t.aftersales.c.status.in_(UNREFUNDED_OPEN)
        )
    ).scalar_one()
    own = int(order.paid_amount) - int(order.refunded_amount) - int(pending) - int(claimed)
    of_payment = refundable_balance(conn, order.payment_no) - promised_claims(conn, order.payment_no)
    return min(own, of_payment)


def load_aftersale(conn: Connection, aftersale_no: str, lock: bool = True) -> Row[Any] | None:
    """One after-sale row, locked FOR UPDATE by default."""
    stmt = select(t.aftersales).where(t.aftersales.c.aftersale_no == aftersale_no)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def require_aftersale(conn: Connection, aftersale_no: str) -> Row[Any]:
    """The after-sale (locked), or Refusal(UNKNOWN_AFTERSALE)."""
    row = load_aftersale(conn, aftersale_no)
    if row is None:
        raise Refusal(Reason.UNKNOWN_AFTERSALE, f"no after-sale {aftersale_no}", aftersale_no=aftersale_no)
    return row


def create_aftersale(
    uow: UnitOfWork,
    aftersale_no: str,
    order: Row[Any],
    merchant_id: str,
    kind: str,
    amount: int,
    reason: str,
    review_deadline: datetime,
) -> None:
    """Insert a new after-sale awaiting the merchant's review."""
    uow.conn.execute(
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
            created_at=uow.now,
            updated_at=uow.now,
        )
    )


def move_aftersale(
    uow: UnitOfWork, aftersale: Row[Any], action: AfterSaleAction, actor: str, **columns: Any
) -> AfterSaleStatus:
    """Apply `action` through the after-sale table (Refusal(INVALID_STATE)); logged on the order."""
    to_status = next_aftersale_status(aftersale.status, action)
    result = uow.conn.execute(
        update(t.aftersales)
        .where(
            t.aftersales.c.aftersale_no == aftersale.aftersale_no, t.aftersales.c.version == aftersale.version
        )
        .values(status=to_status, version=aftersale.version + 1, updated_at=uow.now, **columns)
    )
    if result.rowcount != 1:
        raise ConcurrentUpdate(f"after-sale {aftersale.aftersale_no} changed under us")
    uow.record(
        aftersale.order_no,
        f"AFTERSALE_{action.value}",
        None,
        None,
        actor,
        {"aftersale_no": aftersale.aftersale_no, "from": aftersale.status, "to": to_status.value},
    )
    return to_status


def open_unrefunded(conn: Connection, order_nos: list[str]) -> list[Row[Any]]:
    """These orders' after-sales still open and not yet behind a refund, locked."""
    return list(
        conn.execute(
            select(t.aftersales)
            .where(t.aftersales.c.order_no.in_(order_nos), t.aftersales.c.status.in_(UNREFUNDED_OPEN))
            .order_by(t.aftersales.c.aftersale_no)
            .with_for_update()
        ).all()
    )


def overdue_reviews(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """After-sales still pending review whose deadline is before `cutoff` (SKIP LOCKED)."""
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


# ---------------------------------------------------------------------------------------------
# Merchant cancellations: one operation record per cancelled child, advanced step by step


def load_cancellation(conn: Connection, order_no: str) -> Row[Any] | None:
    """The merchant-cancel record of a child, locked."""
    return conn.execute(
        select(t.merchant_cancellations)
        .where(t.merchant_cancellations.c.order_no == order_no)
        .with_for_update()
    ).first()


def create_cancellation(uow: UnitOfWork, order_no: str, merchant_id: str, reason: str) -> None:
    """Insert the operation record (its first step is the refund request)."""
    uow.conn.execute(
        insert(t.merchant_cancellations).values(
            order_no=order_no,
            merchant_id=merchant_id,
            reason=reason,
            step=STEP_REFUND_REQUESTED,
            created_at=uow.now,
            updated_at=uow.now,
        )
    )


def advance_cancellation(uow: UnitOfWork, order_no: str, step: str, actor: str, **columns: Any) -> None:
    """Move the operation record to `step` and log the step on the order's timeline."""
    uow.conn.execute(
        update(t.merchant_cancellations)
        .where(t.merchant_cancellations.c.order_no == order_no)
        .values(step=step, updated_at=uow.now, **columns)
    )
    uow.record(order_no, f"MERCHANT_CANCEL_{step}", None, None, actor, dict(columns) or None)


def set_refund_no(conn: Connection, aftersale_no: str, refund_no: str) -> None:
    """Tie an after-sale to the refund that pays it."""
    conn.execute(
        update(t.aftersales).where(t.aftersales.c.aftersale_no == aftersale_no).values(refund_no=refund_no)
    )
