"""Coupons: held by a pending order, used on payment, returned on cancellation."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from domain.errors import Reason, Refusal
from domain.pricing import CouponTerms
from store import tables as t

if TYPE_CHECKING:
    from store.uow import UnitOfWork

AVAILABLE, HELD, USED = "AVAILABLE", "HELD", "USED"


class SqlCoupons:
    """The `coupons` repository on PostgreSQL (store.ports.Coupons): AVAILABLE -> HELD -> USED."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def grant(
        self, code: str, user_id: str, amount: int, min_spend: int, expires_at: datetime
    ) -> tuple[Row[Any], bool]:
        """Grant a coupon; granting a code again leaves the first grant. The row, and whether it is new."""
        conn = self.uow.conn
        inserted = conn.execute(
            pg_insert(t.coupons)
            .values(code=code, user_id=user_id, amount=amount, min_spend=min_spend, expires_at=expires_at)
            .on_conflict_do_nothing()
        ).rowcount
        return conn.execute(select(t.coupons).where(t.coupons.c.code == code)).one(), inserted == 1

    def load_for_order(self, code: str) -> CouponTerms:
        """The coupon's terms, locked for the placing transaction; Refusal(COUPON_INVALID) if unknown."""
        stmt = select(t.coupons).where(t.coupons.c.code == code).with_for_update()
        row = self.uow.conn.execute(stmt).first()
        if row is None:
            raise Refusal(Reason.COUPON_INVALID, f"no coupon {code}")
        return CouponTerms(row.code, row.user_id, row.amount, row.min_spend, row.expires_at, row.state)

    def hold(self, code: str, order_no: str) -> None:
        """A pending order holds the coupon (if it is still available)."""
        self.uow.conn.execute(
            update(t.coupons)
            .where(t.coupons.c.code == code, t.coupons.c.state == AVAILABLE)
            .values(state=HELD, order_no=order_no, updated_at=t.NOW)
        )

    def use(self, code: str, order_no: str) -> None:
        """The order was paid: its coupon is spent."""
        self.uow.conn.execute(
            update(t.coupons)
            .where(t.coupons.c.code == code, t.coupons.c.order_no == order_no, t.coupons.c.state == HELD)
            .values(state=USED, updated_at=t.NOW)
        )

    def give_back(self, code: str | None, order_no: str) -> bool:
        """The order was cancelled unpaid: its coupon may be spent again. True if it was returned."""
        if not code:
            return False
        result = self.uow.conn.execute(
            update(t.coupons)
            .where(t.coupons.c.code == code, t.coupons.c.order_no == order_no, t.coupons.c.state == HELD)
            .values(state=AVAILABLE, order_no=None, updated_at=t.NOW)
        )
        return result.rowcount == 1

    def give_back_many(self, order_nos: list[str]) -> list[str]:
        """Return the coupons held by any of these orders (cancelled unpaid); the codes returned."""
        if not order_nos:
            return []
        return list(
            self.uow.conn.execute(
                update(t.coupons)
                .where(t.coupons.c.order_no.in_(order_nos), t.coupons.c.state == HELD)
                .values(state=AVAILABLE, order_no=None, updated_at=self.uow.now)
                .returning(t.coupons.c.code)
            ).scalars()
        )
