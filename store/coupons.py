"""Coupons: held by a pending order, used on payment, returned on cancellation."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select, update

from domain.errors import Reason, Refusal
from domain.pricing import CouponTerms
from store import tables as t

AVAILABLE, HELD, USED = "AVAILABLE", "HELD", "USED"


def load_for_order(conn: Connection, code: str) -> CouponTerms:
    """The coupon's terms, locked for the placing transaction; Refusal(COUPON_INVALID) if unknown."""
    row: Row[Any] | None = conn.execute(
        select(t.coupons).where(t.coupons.c.code == code).with_for_update()
    ).first()
    if row is None:
        raise Refusal(Reason.COUPON_INVALID, f"no coupon {code}")
    return CouponTerms(row.code, row.user_id, row.amount, row.min_spend, row.expires_at, row.state)


def hold(conn: Connection, code: str, order_no: str) -> None:
    conn.execute(
        update(t.coupons)
        .where(t.coupons.c.code == code, t.coupons.c.state == AVAILABLE)
        .values(state=HELD, order_no=order_no, updated_at=t.NOW)
    )


def use(conn: Connection, code: str, order_no: str) -> None:
    """The order was paid: its coupon is spent."""
    conn.execute(
        update(t.coupons)
        .where(t.coupons.c.code == code, t.coupons.c.order_no == order_no, t.coupons.c.state == HELD)
        .values(state=USED, updated_at=t.NOW)
    )


def give_back(conn: Connection, code: str | None, order_no: str) -> bool:
    """The order was cancelled unpaid: its coupon may be spent again. True if it was returned."""
    if not code:
        return False
    result = conn.execute(
        update(t.coupons)
        .where(t.coupons.c.code == code, t.coupons.c.order_no == order_no, t.coupons.c.state == HELD)
        .values(state=AVAILABLE, order_no=None, updated_at=t.NOW)
    )
    return result.rowcount == 1
