"""The one refund module: every refund (user cancel, late payment, payment refused for its
amount, after-sale, merchant cancel).

Every refund returns money of one payment and claims its amount from that payment's
refundable balance (`payments.refundable`) with a conditional UPDATE, under the payment row's
lock and in the same transaction as the refund row: refunds of one payment can never add up to
more than it, whichever flows ask for them and however they interleave. A claim beyond the
balance is a Refusal(AMOUNT_EXCEEDS_REFUNDABLE); a failed refund gives its amount back, and a
retry claims it again.

A refund is created once per source (`uq_refunds_source`), announced with `refund.requested`,
and settled by a signed `refund.result`. Follow-ups of a successful refund (closing the order,
completing the after-sale, ...) are chosen by the refund's source: each module that creates
refunds names its own, and consumers/registry.py hands them all to the payment consumer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from domain.errors import Reason, Refusal
from domain.names import Evt
from domain.status import AfterSaleStatus, RefundAction, RefundStatus, next_refund_status
from store import numbers
from store import tables as t
from store.uow import UnitOfWork

# After-sales whose amount is promised but not yet behind a refund row.
UNREFUNDED_OPEN = (AfterSaleStatus.PENDING_REVIEW, AfterSaleStatus.AWAITING_RETURN)
# Refunds that may still pay out (a failed one can be retried).
PENDING_REFUNDS = (RefundStatus.REQUESTED, RefundStatus.FAILED)


def claim_refundable(conn: Connection, payment_no: str | None, amount: int) -> int:
    """Take `amount` from the payment's refundable balance (row lock); returns what is left.

    Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when the balance is short or there is no such payment.
    """
    left = (
        conn.execute(
            update(t.payments)
            .where(t.payments.c.payment_no == payment_no, t.payments.c.refundable >= amount)
            .values(refundable=t.payments.c.refundable - amount)
            .returning(t.payments.c.refundable)
        ).scalar()
        if payment_no is not None and amount > 0
        else None
    )
    if left is None:
        balance = refundable_balance(conn, payment_no)
        raise Refusal(
            Reason.AMOUNT_EXCEEDS_REFUNDABLE,
            f"{amount} asked, {balance} left refundable of payment {payment_no}",
            refundable=balance,
        )
    return int(left)


def give_back(conn: Connection, payment_no: str | None, amount: int) -> None:
    """A refund that failed returns its amount to what remains refundable of its payment."""
    if payment_no is not None:
        conn.execute(
            update(t.payments)
            .where(t.payments.c.payment_no == payment_no)
            .values(refundable=t.payments.c.refundable + amount)
        )


def refundable_balance(conn: Connection, payment_no: str | None, lock: bool = False) -> int:
    """What remains refundable of a payment (0 for none)."""
    if payment_no is None:
        return 0
    stmt = select(t.payments.c.refundable).where(t.payments.c.payment_no == payment_no)
    if lock:
        stmt = stmt.with_for_update()
    return int(conn.execute(stmt).scalar() or 0)


def promised_claims(conn: Connection, payment_no: str | None) -> int:
    """After-sale amounts promised on orders of this payment but not yet behind a refund."""
    if payment_no is None:
        return 0
    orders_of_payment = select(t.orders.c.order_no).where(t.orders.c.payment_no == payment_no)
    return int(
        conn.execute(
            select(func.coalesce(func.sum(t.aftersales.c.amount), 0)).where(
                t.aftersales.c.order_no.in_(orders_of_payment), t.aftersales.c.status.in_(UNREFUNDED_OPEN)
            )
        ).scalar_one()
    )


def request_refund(
    uow: UnitOfWork,
    order_no: str,
    amount: int,
    source: str,
    source_ref: str,
    actor: str,
    payment_no: str | None,
) -> str:
    """Create the refund of this source (once), claiming its amount from the payment's
    refundable balance, and announce it; returns its refund number."""
    existing = uow.conn.execute(
        select(t.refunds.c.refund_no).where(
            t.refunds.c.source == source, t.refunds.c.source_ref == source_ref
        )
    ).scalar()
    if existing:
        return str(existing)
    claim_refundable(uow.conn, payment_no, amount)
    refund_no = numbers.next_number(uow.conn, numbers.REFUND, uow.now)
    uow.conn.execute(
        pg_insert(t.refunds).values(
            refund_no=refund_no,
            order_no=order_no,
            source=source,
            source_ref=source_ref,
            payment_no=payment_no,
            amount=amount,
            status=RefundStatus.REQUESTED,
            created_at=uow.now,
            updated_at=uow.now,
        )
    )
    uow.record(
        order_no,
        "REFUND_REQUESTED",
        None,
        None,
        actor,
        {"refund_no": refund_no, "amount": amount, "reason": source, "payment_no": payment_no},
    )
    uow.emit(
        Evt.REFUND_REQUESTED,
        {
            "refund_no": refund_no,
            "order_no": order_no,
            "amount": amount,
            "reason": source,
            "payment_no": payment_no,
            "refund_status": RefundStatus.REQUESTED,
        },
    )
    return refund_no


def load_refund(uow: UnitOfWork, refund_no: str) -> Row[Any] | None:
    return uow.conn.execute(
        select(t.refunds).where(t.refunds.c.refund_no == refund_no).with_for_update()
    ).first()


def settle(uow: UnitOfWork, refund: Row[Any], action: RefundAction, provider_refund_no: str | None) -> str:
    """Move a refund through its state machine (Refusal(INVALID_STATE) when not allowed),
    keeping its payment's refundable balance: a failure gives the amount back, a retry or a
    success after a failure claims it again (Refusal(AMOUNT_EXCEEDS_REFUNDABLE) if it is gone)."""
    to_status = next_refund_status(refund.status, action)
    if to_status == RefundStatus.FAILED:
        give_back(uow.conn, refund.payment_no, refund.amount)
    elif refund.status == RefundStatus.FAILED:
        claim_refundable(uow.conn, refund.payment_no, refund.amount)
    uow.conn.execute(
        update(t.refunds)
        .where(t.refunds.c.refund_no == refund.refund_no)
        .values(
            status=to_status,
            provider_refund_no=provider_refund_no or refund.provider_refund_no,
            attempts=refund.attempts + (1 if action == RefundAction.RETRY else 0),
            updated_at=uow.now,
        )
    )
    return to_status


def retry_refund(uow: UnitOfWork, refund_no: str, actor: str) -> bool:
    """Submit a FAILED refund again (`refund.requested` once more); False when it is not failed.

    Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when its amount was meanwhile refunded another way.
    """
    refund = load_refund(uow, refund_no)
    if refund is None or refund.status != RefundStatus.FAILED:
        return False
    settle(uow, refund, RefundAction.RETRY, None)
    uow.record(refund.order_no, "REFUND_RETRIED", None, None, actor, {"refund_no": refund_no})
    uow.emit(
        Evt.REFUND_REQUESTED,
        {
            "refund_no": refund_no,
            "order_no": refund.order_no,
            "amount": refund.amount,
            "reason": refund.source,
            "payment_no": refund.payment_no,
            "refund_status": RefundStatus.REQUESTED,
            "attempt": refund.attempts + 1,
        },
    )
    return True


def open_refunds(uow: UnitOfWork, order_nos: list[str]) -> list[Row[Any]]:
    """Refunds of these orders that have not succeeded yet (REQUESTED, or FAILED and retryable)."""
    return list(
        uow.conn.execute(
            select(t.refunds).where(
                t.refunds.c.order_no.in_(order_nos),
                t.refunds.c.status.in_(PENDING_REFUNDS),
            )
        ).all()
    )
