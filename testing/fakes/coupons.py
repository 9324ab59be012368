"""The `coupons` repository in memory (store/coupons.py `SqlCoupons`, the same semantics)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from domain.errors import Reason, Refusal
from domain.pricing import CouponTerms
from store.coupons import AVAILABLE, HELD, USED
from testing.fakes.db import Record

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork


class FakeCoupons:
    """Coupons in the fake's coupons table: AVAILABLE -> HELD (by an order) -> USED, or back."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow
        self.db = uow.db

    def grant(
        self, code: str, user_id: str, amount: int, min_spend: int, expires_at: datetime
    ) -> tuple[Record, bool]:
        inserted = self.db.insert_new(
            "coupons",
            {
                "code": code,
                "user_id": user_id,
                "amount": amount,
                "min_spend": min_spend,
                "expires_at": expires_at,
            },
        )
        row = self.db.one("coupons", code=code)
        assert row is not None
        return row, inserted is not None

    def load_for_order(self, code: str) -> CouponTerms:
        row = self.db.one("coupons", code=code)
        if row is None:
            raise Refusal(Reason.COUPON_INVALID, f"no coupon {code}")
        return CouponTerms(row.code, row.user_id, row.amount, row.min_spend, row.expires_at, row.state)

    def hold(self, code: str, order_no: str) -> None:
        self.db.update_where(
            "coupons",
            {"state": HELD, "order_no": order_no, "updated_at": self.uow.now},
            code=code,
            state=AVAILABLE,
        )

    def use(self, code: str, order_no: str) -> None:
        self.db.update_where(
            "coupons", {"state": USED, "updated_at": self.uow.now}, code=code, order_no=order_no, state=HELD
        )

    def give_back(self, code: str | None, order_no: str) -> bool:
        if not code:
            return False
        returned = self.db.update_where(
            "coupons",
            {"state": AVAILABLE, "order_no": None, "updated_at": self.uow.now},
            code=code,
            order_no=order_no,
            state=HELD,
        )
        return len(returned) == 1

    def give_back_many(self, order_nos: list[str]) -> list[str]:
        wanted = set(order_nos)
        returned = self.db.update_where(
            "coupons",
            {"state": AVAILABLE, "order_no": None, "updated_at": self.uow.now},
            lambda r: r.order_no in wanted,
            state=HELD,
        )
        return [r.code for r in returned]
