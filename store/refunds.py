"""The one refund module: every refund (user cancel, late payment, after-sale, merchant cancel).

A refund is created once per source (`uq_refunds_source`), announced with `refund.requested`,
and settled by a signed `refund.result`. Follow-ups of a successful refund (closing the order,
completing the after-sale, ...) are chosen by the refund's source in consumers/refund_followups.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from domain.names import Evt
from domain.status import RefundAction, RefundStatus, next_refund_status
from store import numbers
from store import tables as t
from store.uow import UnitOfWork


def request_refund(
    uow: UnitOfWork, order_no: str, amount: int, source: str, source_ref: str, actor: str
) -> str:
    """Create the refund of this source (once) and announce it; returns its refund number."""
    existing = uow.conn.execute(
        select(t.refunds.c.refund_no).where(
            t.refunds.c.source == source, t.refunds.c.source_ref == source_ref
        )
    ).scalar()
    if existing:
        return str(existing)
    refund_no = numbers.next_number(uow.conn, numbers.REFUND, uow.now)
    uow.conn.execute(
        pg_insert(t.refunds).values(
            refund_no=refund_no,
            order_no=order_no,
            source=source,
            source_ref=source_ref,
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
        {"refund_no": refund_no, "amount": amount, "reason": source},
    )
    uow.emit(
        Evt.REFUND_REQUESTED,
        {
            "refund_no": refund_no,
            "order_no": order_no,
            "amount": amount,
            "reason": source,
            "refund_status": RefundStatus.REQUESTED,
        },
    )
    return refund_no


def load_refund(uow: UnitOfWork, refund_no: str) -> Row[Any] | None:
    return uow.conn.execute(
        select(t.refunds).where(t.refunds.c.refund_no == refund_no).with_for_update()
    ).first()


def settle(uow: UnitOfWork, refund: Row[Any], action: RefundAction, provider_refund_no: str | None) -> str:
    """Move a refund through its state machine (Refusal(INVALID_STATE) when not allowed)."""
    to_status = next_refund_status(refund.status, action)
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
    """Submit a FAILED refund again (`refund.requested` once more); False when it is not failed."""
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
                t.refunds.c.status.in_([RefundStatus.REQUESTED, RefundStatus.FAILED]),
            )
        ).all()
    )
