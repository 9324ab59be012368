"""Queue order.payment: payment notifications and the split of a paid order into children; the
queue's other flows are user cancellation (consumers/cancel.py) and refund results
(consumers/refunds.py), wired here with the payment timeout.

A signed payment for an unpaid order pays it: PAID, its coupon spent, its locked stock sold,
then one PAID child per (merchant, warehouse) (`order.split`), or COMPLETED at once for a
virtual order. Money is never kept without an order to show for it: a payment for an order
cancelled or paid already is refunded (LATE_PAYMENT), and so is a signed payment of the wrong
amount (PAYMENT_REJECTED), which is still announced as `payment.rejected`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Final

from consumers import cancel
from consumers.common import item_event_list, stock_items
from consumers.events import OrderCompleted, OrderPaid, OrderSplit, PaymentRejected, SplitChild, StockDeducted
from consumers.refunds import RefundFollowup, RefundResults, note_unapplied_payment_refunded, request_refund
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import OrderCancel, PaymentNotify, RefundResult
from consumers.timers import TimerKind
from domain import pricing, signing
from domain.actors import PAYMENT_PROVIDER, SYSTEM
from domain.errors import Reason, Refusal
from domain.names import PAYMENT_QUEUE, Cmd
from domain.status import ORDER_TRANSITIONS, OrderAction, OrderStatus, OrderType, can
from settings import Settings
from store.numbers import child_number
from store.ports import NewPayment, Record, UnitOfWork


class PaymentOutcome:
    """What became of a recorded payment (payments.outcome)."""

    APPLIED: Final = "APPLIED"  # paid the order
    LATE_REFUNDED: Final = "LATE_REFUNDED"  # the order was cancelled or already paid: refunded
    REJECTED: Final = "REJECTED"  # the amount did not match: refunded (PAYMENT_REJECTED)


# Timeline actions that are not status transitions.
SPLIT: Final = "SPLIT"
PAYMENT_REFUSED: Final = "PAYMENT_REFUSED"
LATE_PAYMENT: Final = "LATE_PAYMENT"


# ---------------------------------------------------------------------------------------------
# Split into child orders


def order_quote(order: Record, lines: list[pricing.Line]) -> pricing.Quote:
    """The parent's quote as charged, with the freight of each package.

    Freight per package is recomputed with the placement rule; should the rule have changed
    since the order was placed, the freight actually charged is shared by goods instead, so
    the children always add up to what was paid.
    """
    groups = pricing.packages(lines)
    subtotals = [sum(line.line_total for line in group) for group in groups.values()]
    freights = [pricing.package_freight(subtotal, physical=True) for subtotal in subtotals]
    if sum(freights) != order.freight:
        freights = pricing.allocate(order.freight, subtotals)
    return pricing.Quote(
        goods_total=order.goods_total,
        freight=order.freight,
        discount_total=order.discount_total,
        payable=order.payable,
        freight_by_package=dict(zip(groups, freights, strict=True)),
    )


def split_order(uow: UnitOfWork, order: Record, actor: str) -> list[SplitChild]:
    """Create one PAID child per (merchant, warehouse); returns the children as order.split lists them."""
    rows = uow.orders.items(order)
    by_line = {row.line_no: row for row in rows}
    lines = [
        pricing.Line(r.line_no, r.sku, r.name, r.merchant_id, r.warehouse_id, r.unit_price, r.quantity)
        for r in rows
    ]
    quotes = pricing.split(lines, order_quote(order, lines))
    if sum(q.payable for q in quotes) != order.payable:
        raise RuntimeError(f"split of {order.order_no} does not add up to its payable {order.payable}")
    children = []
    for index, quote in enumerate(quotes, start=1):
        child_no = child_number(order.order_no, index)
        line_nos = [line.line_no for line in quote.lines]
        uow.orders.insert_child(
            order,
            child_no,
            line_nos,
            status=OrderStatus.PAID,
            merchant_id=quote.merchant_id,
            warehouse_id=quote.warehouse_id,
            goods_total=quote.goods_total,
            freight=quote.freight,
            discount_total=quote.discount_total,
            payable=quote.payable,
            paid_amount=quote.payable,
        )
        for line_no in line_nos:
            uow.stock.assign_child(order.order_no, line_no, child_no)
        uow.record(
            child_no,
            SPLIT,
            None,
            OrderStatus.PAID,
            actor,
            {"parent_no": order.order_no, "payable": quote.payable},
        )
        children.append(
            SplitChild(
                order_no=child_no,
                status=OrderStatus.PAID,
                merchant_id=quote.merchant_id,
                warehouse_id=quote.warehouse_id,
                goods_total=quote.goods_total,
                freight=quote.freight,
                discount_total=quote.discount_total,
                payable=quote.payable,
                items=item_event_list([by_line[n] for n in line_nos]),
            )
        )
    return children


# ---------------------------------------------------------------------------------------------
# payment.notify


class PaymentFlows:
    """payment.notify, with its refusal announcer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def secret(self) -> str:
        """The HMAC key, checked where it is used (once: the settings never change): unset or a
        published example value is refused (InsecureSetting) outside DEV_MODE; run_consumer.py
        refuses to start on it first."""
        return self.settings.webhook_secret()

    def notify(self, cmd: PaymentNotify, uow: UnitOfWork) -> None:
        """Apply a signed payment to an unpaid order, or refund it when the order cannot take it."""
        if not signing.verify(uow.envelope.body, self.secret):
            raise Refusal(Reason.BAD_SIGNATURE, "the signature does not match the notification")
        order = uow.orders.require(cmd.order_no)
        if order.parent_no is not None:
            raise Refusal(Reason.UNKNOWN_ORDER, f"{cmd.order_no} is a child order; payments name the parent")
        if uow.refunds.payment(cmd.payment_no) is not None:
            return  # the same payment again: it was dealt with the first time
        if cmd.amount != order.payable:
            raise Refusal(Reason.AMOUNT_MISMATCH, f"paid {cmd.amount}, payable is {order.payable}")
        if can(ORDER_TRANSITIONS, order.status, OrderAction.PAY):
            self._apply_payment(cmd, uow, order)
        else:
            self._refund_unwanted_payment(cmd, uow, order)

    def _apply_payment(self, cmd: PaymentNotify, uow: UnitOfWork, order: Record) -> None:
        _record_payment(uow, cmd, PaymentOutcome.APPLIED)
        status = uow.orders.transition(
            order,
            OrderAction.PAY,
            PAYMENT_PROVIDER,
            {"payment_no": cmd.payment_no, "amount": cmd.amount, "method": cmd.method},
            paid_at=cmd.paid_at,
            paid_amount=cmd.amount,
            payment_no=cmd.payment_no,
        )
        if order.coupon_code:
            uow.coupons.use(order.coupon_code, order.order_no)
        moves = uow.stock.deduct(order.order_no)
        uow.emit(
            OrderPaid(
                order_no=order.order_no,
                status=status,
                user_id=order.user_id,
                payment_no=cmd.payment_no,
                method=cmd.method,
                amount=cmd.amount,
                paid_at=cmd.paid_at.isoformat(),
            )
        )
        uow.emit(StockDeducted(order_no=order.order_no, items=stock_items(moves)))
        paid = uow.orders.require(order.order_no)  # the new version, for the next guarded write
        if paid.order_type == OrderType.VIRTUAL:
            completed = uow.orders.transition(
                paid, OrderAction.COMPLETE_VIRTUAL, SYSTEM, None, completed_at=uow.now
            )
            uow.emit(
                OrderCompleted(
                    order_no=paid.order_no,
                    status=completed,
                    user_id=paid.user_id,
                    completed_at=uow.now.isoformat(),
                )
            )
            return
        children = split_order(uow, paid, SYSTEM)
        uow.emit(
            OrderSplit(order_no=paid.order_no, status=paid.status, payable=paid.payable, children=children)
        )

    def _refund_unwanted_payment(self, cmd: PaymentNotify, uow: UnitOfWork, order: Record) -> None:
        # Cancelled, or paid already by another payment: money is never kept, the order stays as it is.
        _record_payment(uow, cmd, PaymentOutcome.LATE_REFUNDED)
        uow.record(
            order.order_no,
            LATE_PAYMENT,
            order.status,
            order.status,
            PAYMENT_PROVIDER,
            {"payment_no": cmd.payment_no, "amount": cmd.amount},
        )
        request_refund(
            uow,
            order.order_no,
            cmd.amount,
            Reason.LATE_PAYMENT,
            cmd.payment_no,
            PAYMENT_PROVIDER,
            payment_no=cmd.payment_no,
        )

    @staticmethod
    def refuse_payment(cmd: PaymentNotify, refusal: Refusal, uow: UnitOfWork) -> None:
        """Announce payment.rejected; a signed payment of the wrong amount was still taken from
        the buyer, so it is recorded and refunded in full (PAYMENT_REJECTED)."""
        if refusal.reason == Reason.AMOUNT_MISMATCH:
            recorded = _record_payment(uow, cmd, PaymentOutcome.REJECTED, once=True)
            uow.record(
                cmd.order_no,
                PAYMENT_REFUSED,
                None,
                None,
                PAYMENT_PROVIDER,
                {"payment_no": cmd.payment_no, "amount": cmd.amount, "reason": refusal.reason},
            )
            if recorded:
                request_refund(
                    uow,
                    cmd.order_no,
                    cmd.amount,
                    Reason.PAYMENT_REJECTED,
                    cmd.payment_no,
                    PAYMENT_PROVIDER,
                    payment_no=cmd.payment_no,
                )
        uow.emit(
            PaymentRejected(
                order_no=cmd.order_no,
                payment_no=cmd.payment_no,
                amount=cmd.amount,
                reason=refusal.reason,
                detail=refusal.detail,
            )
        )


def _record_payment(uow: UnitOfWork, cmd: PaymentNotify, outcome: str, once: bool = False) -> bool:
    """The payments row of a notification, all of it refundable; `once`: a known one is kept."""
    payment = NewPayment(
        payment_no=cmd.payment_no,
        order_no=cmd.order_no,
        method=cmd.method,
        amount=cmd.amount,
        paid_at=cmd.paid_at,
        outcome=outcome,
        raw=dict(uow.envelope.body),
    )
    return uow.refunds.add_payment(payment, once=once)


# ---------------------------------------------------------------------------------------------
# Wiring


def spec(settings: Settings, followups: Mapping[str, RefundFollowup]) -> ConsumerSpec:
    """The order.payment consumer: payment.notify, order.cancel and refund.result; `followups`
    (refund source -> what follows its success) come from every module that creates refunds."""
    payments = PaymentFlows(settings)
    results = RefundResults(settings, followups)
    routes = {
        Cmd.PAYMENT_NOTIFY: Route(PaymentNotify, payments.notify, payments.refuse_payment),
        Cmd.ORDER_CANCEL: Route(OrderCancel, cancel.cancel, cancel.refuse_cancel),
        Cmd.REFUND_RESULT: Route(RefundResult, results.refund_result),
    }
    return ConsumerSpec(PAYMENT_QUEUE, routes)  # bound from order.commands by its routes' keys


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """The timers this queue's flows answer: the pay deadline of every placed order."""
    return cancel.timer_kinds(settings.order_payment_timeout)


def refund_followups(settings: Settings) -> dict[str, RefundFollowup]:
    """What happens after a refund of each source this queue's flows create succeeds."""
    return {
        Reason.USER_CANCEL: cancel.close_cancelled_order,
        Reason.LATE_PAYMENT: note_unapplied_payment_refunded,
        Reason.PAYMENT_REJECTED: note_unapplied_payment_refunded,
    }
