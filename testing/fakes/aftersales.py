"""`uow.aftersales` in memory: store/aftersales.py's `SqlAfterSales` on the FakeDatabase.

Same semantics as the SQL repository: the version guard raises ConcurrentUpdate, a move the
after-sale table forbids is a Refusal(INVALID_STATE), changes are logged on the order's
timeline. Row locks have no meaning in memory (one message at a time): `lock` is accepted and
ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.status import AfterSaleAction, AfterSaleStatus, next_aftersale_status
from store import numbers
from store.aftersales import STEP_REFUND_REQUESTED
from store.refunds import UNREFUNDED_OPEN
from testing.fakes.db import FakeDatabase, Record

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork

AFTERSALES = "aftersales"
CANCELLATIONS = "merchant_cancellations"


class FakeAfterSales:
    """After-sales and merchant cancellations in memory."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow

    @property
    def db(self) -> FakeDatabase:
        return self.uow.db

    # -- after-sales ------------------------------------------------------------------------------

    def next_number(self) -> str:
        return numbers.format_number(numbers.AFTERSALE, self.uow.now, self.db.next_value())

    def refundable(self, order: Record) -> int:
        refunds = self.uow.refunds
        # Only refunds of the order's own payment: a late or refused payment's refund returns
        # another payment's money and takes nothing from this order's share.
        own_payment = [r for r in refunds.open_for([order.order_no]) if r.payment_no == order.payment_no]
        pending = sum(int(r.amount) for r in own_payment)
        claimed = sum(
            int(a.amount)
            for a in self.db.rows(AFTERSALES, lambda a: a.status in UNREFUNDED_OPEN, order_no=order.order_no)
        )
        own = int(order.paid_amount) - int(order.refunded_amount) - pending - claimed
        of_payment = refunds.balance(order.payment_no) - refunds.promised_claims(order.payment_no)
        return min(own, of_payment)

    def load(self, aftersale_no: str, lock: bool = True) -> Record | None:
        return self.db.one(AFTERSALES, aftersale_no=aftersale_no)

    def require(self, aftersale_no: str) -> Record:
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
        self.db.insert(
            AFTERSALES,
            {
                "aftersale_no": aftersale_no,
                "order_no": order.order_no,
                "user_id": order.user_id,
                "merchant_id": merchant_id,
                "kind": kind,
                "amount": amount,
                "reason": reason,
                "status": AfterSaleStatus.PENDING_REVIEW,
                "review_deadline": review_deadline,
                "created_at": self.uow.now,
                "updated_at": self.uow.now,
            },
        )

    def move(self, aftersale: Record, action: AfterSaleAction, actor: str, **columns: Any) -> AfterSaleStatus:
        to_status = next_aftersale_status(aftersale.status, action)
        stored = self.db.one(AFTERSALES, aftersale_no=aftersale.aftersale_no)
        if stored is None or stored.version != aftersale.version:
            raise ConcurrentUpdate(f"after-sale {aftersale.aftersale_no} changed under us")
        self.db.update(
            stored, status=to_status, version=aftersale.version + 1, updated_at=self.uow.now, **columns
        )
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
        wanted = set(order_nos)
        rows = self.db.rows(AFTERSALES, lambda a: a.order_no in wanted and a.status in UNREFUNDED_OPEN)
        return sorted(rows, key=lambda a: a.aftersale_no)

    def set_refund_no(self, aftersale_no: str, refund_no: str) -> None:
        self.db.update_where(AFTERSALES, {"refund_no": refund_no}, aftersale_no=aftersale_no)

    # -- merchant cancellations -------------------------------------------------------------------

    def load_cancellation(self, order_no: str, lock: bool = True) -> Record | None:
        return self.db.one(CANCELLATIONS, order_no=order_no)

    def create_cancellation(self, order_no: str, merchant_id: str, reason: str) -> None:
        self.db.insert(
            CANCELLATIONS,
            {
                "order_no": order_no,
                "merchant_id": merchant_id,
                "reason": reason,
                "step": STEP_REFUND_REQUESTED,
                "created_at": self.uow.now,
                "updated_at": self.uow.now,
            },
        )

    def advance_cancellation(self, order_no: str, step: str, actor: str, **columns: Any) -> None:
        changes = {"step": step, "updated_at": self.uow.now, **columns}
        self.db.update_where(CANCELLATIONS, changes, order_no=order_no)
        self.uow.record(order_no, f"MERCHANT_CANCEL_{step}", None, None, actor, dict(columns) or None)
