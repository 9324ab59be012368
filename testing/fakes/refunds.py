"""`uow.refunds` in memory: store/refunds.py `SqlRefunds` on a FakeDatabase, same semantics.

The refundable balance of a payment is claimed conditionally (never below zero: a short claim
is Refusal(AMOUNT_EXCEEDS_REFUNDABLE) and changes nothing), one refund per (source, source_ref)
(the fake's unique key holds it as `uq_refunds_source` does), and refunds move through the
refund state machine, a failure giving the amount back and a retry or late success claiming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domain.errors import Reason, Refusal
from domain.status import RefundAction, RefundStatus, next_refund_status
from store import numbers
from store.ports import NewPayment, NewRefund, Record
from store.refunds import PENDING_REFUNDS, UNREFUNDED_OPEN

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork


class FakeRefunds:
    """`uow.refunds` on the fake database (store.ports.Refunds)."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow
        self.db = uow.db

    # -- the refundable balance of a payment ------------------------------------------------------

    def claim(self, payment_no: str | None, amount: int) -> int:
        payment = self.db.one("payments", payment_no=payment_no) if payment_no is not None else None
        if payment is None or amount <= 0 or payment.refundable < amount:
            balance = self.balance(payment_no)
            raise Refusal(
                Reason.AMOUNT_EXCEEDS_REFUNDABLE,
                f"{amount} asked, {balance} left refundable of payment {payment_no}",
                refundable=balance,
            )
        return int(self.db.update(payment, refundable=payment.refundable - amount).refundable)

    def give_back(self, payment_no: str | None, amount: int) -> None:
        payment = self.db.one("payments", payment_no=payment_no) if payment_no is not None else None
        if payment is not None:
            self.db.update(payment, refundable=payment.refundable + amount)

    def balance(self, payment_no: str | None, lock: bool = False) -> int:
        payment = self.db.one("payments", payment_no=payment_no) if payment_no is not None else None
        return int(payment.refundable) if payment is not None else 0

    def promised_claims(self, payment_no: str | None) -> int:
        if payment_no is None:
            return 0
        orders = {o.order_no for o in self.db.rows("orders", payment_no=payment_no)}
        return sum(
            int(a.amount)
            for a in self.db.rows("aftersales", where=lambda a: a.status in UNREFUNDED_OPEN)
            if a.order_no in orders
        )

    # -- refunds ----------------------------------------------------------------------------------

    def request(
        self, order_no: str, amount: int, source: str, source_ref: str, payment_no: str | None
    ) -> NewRefund:
        existing = self.db.one("refunds", source=source, source_ref=source_ref)
        if existing is not None:
            return NewRefund(existing.refund_no, created=False)
        self.claim(payment_no, amount)
        now = self.uow.now
        refund_no = numbers.format_number(numbers.REFUND, now, self.db.next_value())
        self.db.insert(
            "refunds",
            {
                "refund_no": refund_no,
                "order_no": order_no,
                "source": source,
                "source_ref": source_ref,
                "payment_no": payment_no,
                "amount": amount,
                "status": RefundStatus.REQUESTED,
                "created_at": now,
                "updated_at": now,
            },
        )
        return NewRefund(refund_no, created=True)

    def load(self, refund_no: str, lock: bool = True) -> Record | None:
        return self.db.one("refunds", refund_no=refund_no)

    def settle(self, refund: Record, action: RefundAction, provider_refund_no: str | None) -> str:
        to_status = next_refund_status(refund.status, action)
        if to_status == RefundStatus.FAILED:
            self.give_back(refund.payment_no, refund.amount)
        elif refund.status == RefundStatus.FAILED:
            self.claim(refund.payment_no, refund.amount)
        self.db.update(
            refund,
            status=to_status,
            provider_refund_no=provider_refund_no or refund.provider_refund_no,
            attempts=refund.attempts + (1 if action == RefundAction.RETRY else 0),
            updated_at=self.uow.now,
        )
        return to_status

    def open_for(self, order_nos: list[str]) -> list[Record]:
        wanted = set(order_nos)
        return self.db.rows("refunds", where=lambda r: r.order_no in wanted and r.status in PENDING_REFUNDS)

    # -- payments ---------------------------------------------------------------------------------

    def payment(self, payment_no: str) -> Record | None:
        return self.db.one("payments", payment_no=payment_no)

    def add_payment(self, payment: NewPayment, once: bool = False) -> bool:
        row = {**payment._asdict(), "refundable": payment.amount, "received_at": self.uow.now}
        if once:
            return self.db.insert_new("payments", row) is not None
        self.db.insert("payments", row)
        return True
