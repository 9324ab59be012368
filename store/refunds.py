"""Refunds and payments: their rows and the refundable balance of each payment (`uow.refunds`).

Every refund (user cancel, late payment, payment refused for its amount, after-sale, merchant
cancel) returns money of one payment and claims its amount from that payment's refundable
balance (`payments.refundable`) with a conditional UPDATE, under the payment row's lock and in
the same transaction as the refund row: refunds of one payment can never add up to more than
it, whichever flows ask for them and however they interleave. A claim beyond the balance is a
Refusal(AMOUNT_EXCEEDS_REFUNDABLE); a failed refund gives its amount back, and a retry or a late
success claims it again.

A refund is created once per source (`uq_refunds_source`). `SqlRefunds` reads and writes; the
handlers (consumers/refunds.py `request_refund`, `retry_refund`) log and announce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from domain.errors import Reason, Refusal
from domain.status import AfterSaleStatus, RefundAction, RefundStatus, next_refund_status
from store import numbers
from store import tables as t
from store.ports import NewPayment, NewRefund, Record

if TYPE_CHECKING:
    from store.uow import UnitOfWork

# After-sales whose amount is promised but not yet behind a refund row.
UNREFUNDED_OPEN = (AfterSaleStatus.PENDING_REVIEW, AfterSaleStatus.AWAITING_RETURN)
# Refunds that may still pay out (a failed one can be retried).
PENDING_REFUNDS = (RefundStatus.REQUESTED, RefundStatus.FAILED)


class SqlRefunds:
    """`uow.refunds` on PostgreSQL (store.ports.Refunds)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    @property
    def conn(self) -> Connection:
        return self.uow.conn

    # -- the refundable balance of a payment ------------------------------------------------------

    def claim(self, payment_no: str | None, amount: int) -> int:
        """Take `amount` from the payment's refundable balance (row lock); returns what is left.

        Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when the balance is short or there is no such payment.
        """
        left = (
            self.conn.execute(
                update(t.payments)
                .where(t.payments.c.payment_no == payment_no, t.payments.c.refundable >= amount)
                .values(refundable=t.payments.c.refundable - amount)
                .returning(t.payments.c.refundable)
            ).scalar()
            if payment_no is not None and amount > 0
            else None
        )
        if left is None:
            balance = self.balance(payment_no)
            raise Refusal(
                Reason.AMOUNT_EXCEEDS_REFUNDABLE,
                f"{amount} asked, {balance} left refundable of payment {payment_no}",
                refundable=balance,
            )
        return int(left)

    def give_back(self, payment_no: str | None, amount: int) -> None:
        """A refund that failed returns its amount to what remains refundable of its payment."""
        if payment_no is not None:
            self.conn.execute(
                update(t.payments)
                .where(t.payments.c.payment_no == payment_no)
                .values(refundable=t.payments.c.refundable + amount)
            )

    def balance(self, payment_no: str | None, lock: bool = False) -> int:
        """What remains refundable of a payment (0 for none)."""
        if payment_no is None:
            return 0
        stmt = select(t.payments.c.refundable).where(t.payments.c.payment_no == payment_no)
        if lock:
            stmt = stmt.with_for_update()
        return int(self.conn.execute(stmt).scalar() or 0)

    def promised_claims(self, payment_no: str | None) -> int:
        """After-sale amounts promised on orders of this payment but not yet behind a refund."""
        if payment_no is None:
            return 0
        orders_of_payment = select(t.orders.c.order_no).where(t.orders.c.payment_no == payment_no)
        return int(
            self.conn.execute(
                select(func.coalesce(func.sum(t.aftersales.c.amount), 0)).where(
                    t.aftersales.c.order_no.in_(orders_of_payment),
                    t.aftersales.c.status.in_(UNREFUNDED_OPEN),
                )
            ).scalar_one()
        )

    # -- refunds ----------------------------------------------------------------------------------

    def request(
        self, order_no: str, amount: int, source: str, source_ref: str, payment_no: str | None
    ) -> NewRefund:
        """The refund of this source: the existing one, or a new REQUESTED one whose amount is
        claimed from the payment's balance (Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when short)."""
        existing = self.conn.execute(
            select(t.refunds.c.refund_no).where(
                t.refunds.c.source == source, t.refunds.c.source_ref == source_ref
            )
        ).scalar()
        if existing:
            return NewRefund(str(existing), created=False)
        self.claim(payment_no, amount)
        now = self.uow.now
        refund_no = numbers.next_number(self.conn, numbers.REFUND, now)
        self.conn.execute(
            pg_insert(t.refunds).values(
                refund_no=refund_no,
                order_no=order_no,
                source=source,
                source_ref=source_ref,
                payment_no=payment_no,
                amount=amount,
                status=RefundStatus.REQUESTED,
                created_at=now,
                updated_at=now,
            )
        )
        return NewRefund(refund_no, created=True)

    def load(self, refund_no: str, lock: bool = True) -> Record | None:
        """One refund row, locked FOR UPDATE by default."""
        stmt = select(t.refunds).where(t.refunds.c.refund_no == refund_no)
        if lock:
            stmt = stmt.with_for_update()
        return self.conn.execute(stmt).first()

    def settle(self, refund: Record, action: RefundAction, provider_refund_no: str | None) -> str:
        """Move a refund through its state machine (Refusal(INVALID_STATE) when not allowed),
        keeping its payment's refundable balance: a failure gives the amount back, a retry or a
        success after a failure claims it again (Refusal(AMOUNT_EXCEEDS_REFUNDABLE) if it is gone)."""
        to_status = next_refund_status(refund.status, action)
        if to_status == RefundStatus.FAILED:
            self.give_back(refund.payment_no, refund.amount)
        elif refund.status == RefundStatus.FAILED:
            self.claim(refund.payment_no, refund.amount)
        self.conn.execute(
            update(t.refunds)
            .where(t.refunds.c.refund_no == refund.refund_no)
            .values(
                status=to_status,
                provider_refund_no=provider_refund_no or refund.provider_refund_no,
                attempts=refund.attempts + (1 if action == RefundAction.RETRY else 0),
                updated_at=self.uow.now,
            )
        )
        return to_status

    def open_for(self, order_nos: list[str]) -> list[Record]:
        """Refunds of these orders that have not succeeded yet (REQUESTED, or FAILED and retryable)."""
        return list(
            self.conn.execute(
                select(t.refunds).where(
                    t.refunds.c.order_no.in_(order_nos), t.refunds.c.status.in_(PENDING_REFUNDS)
                )
            ).all()
        )

    # -- payments ---------------------------------------------------------------------------------

    def payment(self, payment_no: str) -> Record | None:
        """The recorded payment of this number, if any."""
        return self.conn.execute(select(t.payments).where(t.payments.c.payment_no == payment_no)).first()

    def add_payment(self, payment: NewPayment, once: bool = False) -> bool:
        """Record a payment, all of it refundable. `once`: a payment number already recorded is
        left as it is (False returned); otherwise it is an IntegrityError, as any duplicate key."""
        values = {**payment._asdict(), "refundable": payment.amount, "received_at": self.uow.now}
        if once:
            return bool(
                self.conn.execute(pg_insert(t.payments).values(**values).on_conflict_do_nothing()).rowcount
            )
        self.conn.execute(insert(t.payments).values(**values))
        return True
