"""Queue order.payment: payment notifications, user cancellation, refund results, the pay deadline.

Every flow that changes a parent order locks its row first (`load_order(lock=True)`), so a
payment, a cancellation and the payment timeout of the same order serialise: exactly one of
them finds the order unpaid. Where children exist they are locked before their parent, the
order fulfillment uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cached_property
from typing import Any, Final

from sqlalchemy import Connection, Row, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from consumers.loop import ConsumerSpec, Route
from consumers.schemas import OrderCancel, PaymentNotify, RefundResult
from consumers.timers import TimerKind
from domain import pricing, signing
from domain.actors import PAYMENT_PROVIDER, REFUND_PROVIDER, SYSTEM, user
from domain.errors import ParkCommand, Reason, Refusal
from domain.names import COMMANDS_EXCHANGE, PAYMENT_QUEUE, Cmd, Evt, Timer
from domain.status import (
    ORDER_TRANSITIONS,
    REFUND_TRANSITIONS,
    AfterSaleAction,
    OrderAction,
    OrderStatus,
    OrderType,
    RefundAction,
    RefundStatus,
    can,
    next_order_status,
)
from settings import Settings
from store import aftersales as store_aftersales
from store import coupons, numbers
from store import tables as t
from store.orders import (
    add_refunded,
    children_of,
    item_event_list,
    items_of,
    load_order,
    refusal_subject,
    require_order,
    transition,
)
from store.refunds import load_refund, open_refunds, refundable_balance, request_refund, settle
from store.stock import (
    StockMove,
    assign_child,
    deduct_stock,
    release_orders_stock,
    release_stock,
    restore_stock,
)
from store.uow import Envelope, UnitOfWork, WriteBuffer

RefundFollowup = Callable[[UnitOfWork, Any], None]


class PaymentOutcome:
    """What became of a recorded payment (payments.outcome)."""

    APPLIED: Final = "APPLIED"  # paid the order
    LATE_REFUNDED: Final = "LATE_REFUNDED"  # the order was cancelled or already paid: refunded
    REJECTED: Final = "REJECTED"  # the amount did not match: refunded (PAYMENT_REJECTED)


# Refunds of a payment that never paid the order: they return none of the order's paid amount.
UNAPPLIED_PAYMENT_REFUNDS: Final = frozenset({Reason.LATE_PAYMENT, Reason.PAYMENT_REJECTED})


PAYMENT_TIMER: Final = f"timer:{Timer.PAYMENT_TIMEOUT}"

# Timeline actions that are not status transitions.
SPLIT: Final = "SPLIT"
PAYMENT_REFUSED: Final = "PAYMENT_REFUSED"
LATE_PAYMENT: Final = "LATE_PAYMENT"
CANCEL_REQUESTED: Final = "CANCEL_REQUESTED"
REFUND_SUCCEEDED: Final = "REFUND_SUCCEEDED"
REFUND_FAILED: Final = "REFUND_FAILED"
LATE_PAYMENT_REFUNDED: Final = "LATE_PAYMENT_REFUNDED"
REJECTED_PAYMENT_REFUNDED: Final = "REJECTED_PAYMENT_REFUNDED"


def stock_items(moves: list[StockMove]) -> list[dict[str, Any]]:
    """Stock moves as the `items` of a stock.* event."""
    return [m.as_event_item() for m in moves]


# ---------------------------------------------------------------------------------------------
# Shared by cancellation and the payment timeout


def cancel_unpaid(uow: UnitOfWork, order: Row[Any], action: OrderAction, reason: str, actor: str) -> None:
    """Cancel an unpaid order: CANCELLED, locked stock released, coupon returned, both announced."""
    status = transition(uow, order, action, actor, {"reason": reason}, cancelled_at=uow.now)
    moves = release_stock(uow.conn, order.order_no)
    returned = coupons.give_back(uow.conn, order.coupon_code, order.order_no)
    uow.emit(
        Evt.ORDER_CANCELLED,
        {
            "order_no": order.order_no,
            "status": status,
            "reason": reason,
            "user_id": order.user_id,
            "coupon_code": order.coupon_code if returned else None,
            "cancelled_at": uow.now.isoformat(),
        },
    )
    uow.emit(Evt.STOCK_RELEASED, {"order_no": order.order_no, "items": stock_items(moves)})


# ---------------------------------------------------------------------------------------------
# Split into child orders


def order_quote(order: Row[Any], lines: list[pricing.Line]) -> pricing.Quote:
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


def split_order(uow: UnitOfWork, order: Row[Any], actor: str) -> list[dict[str, Any]]:
    """Create one PAID child per (merchant, warehouse); returns the children as order.split lists them."""
    conn = uow.conn
    rows = items_of(conn, order)
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
        child_no = numbers.child_number(order.order_no, index)
        conn.execute(
            insert(t.orders).values(
                order_no=child_no,
                parent_no=order.order_no,
                user_id=order.user_id,
                order_type=order.order_type,
                status=OrderStatus.PAID,
                merchant_id=quote.merchant_id,
                warehouse_id=quote.warehouse_id,
                goods_total=quote.goods_total,
                freight=quote.freight,
                discount_total=quote.discount_total,
                payable=quote.payable,
                paid_amount=quote.payable,
                receiver=order.receiver,
                payment_no=order.payment_no,
                placed_at=order.placed_at,
                paid_at=order.paid_at,
                updated_at=uow.now,
            )
        )
        line_nos = [line.line_no for line in quote.lines]
        conn.execute(
            update(t.order_items)
            .where(t.order_items.c.order_no == order.order_no, t.order_items.c.line_no.in_(line_nos))
            .values(child_order_no=child_no)
        )
        for line_no in line_nos:
            assign_child(conn, order.order_no, line_no, child_no)
        uow.record(
            child_no,
            SPLIT,
            None,
            OrderStatus.PAID,
            actor,
            {"parent_no": order.order_no, "payable": quote.payable},
        )
        children.append(
            {
                "order_no": child_no,
                "status": OrderStatus.PAID,
                "merchant_id": quote.merchant_id,
                "warehouse_id": quote.warehouse_id,
                "goods_total": quote.goods_total,
                "freight": quote.freight,
                "discount_total": quote.discount_total,
                "payable": quote.payable,
                "items": item_event_list([by_line[n] for n in line_nos]),
            }
        )
    return children


# ---------------------------------------------------------------------------------------------
# The payment timer


def fire_payment_timeout(uow: UnitOfWork, order_no: str) -> None:
    """Cancel the order if it is still unpaid; a timer for a paid or cancelled order does nothing."""
    order = load_order(uow.conn, order_no)
    if order is None or not can(ORDER_TRANSITIONS, order.status, OrderAction.PAYMENT_TIMEOUT):
        return
    if order.pay_deadline is None or order.pay_deadline > uow.now:
        return  # a timer before the stored deadline (forged or misrouted) changes nothing
    cancel_unpaid(uow, order, OrderAction.PAYMENT_TIMEOUT, Reason.PAYMENT_TIMEOUT, PAYMENT_TIMER)


def fire_payment_timeouts(conn: Connection, now: datetime, timers: list[tuple[str, Envelope]]) -> None:
    """The payment timers of a whole window at once: the same effects as fire_payment_timeout
    for each order, in a handful of statements instead of a handful per order."""
    envelopes = {ref: envelope for ref, envelope in timers}
    to_status = next_order_status(OrderStatus.PENDING_PAYMENT, OrderAction.PAYMENT_TIMEOUT)
    # The orders are locked by primary key and checked here, then updated by primary key. With
    # the status in the WHERE clause, a planner without fresh statistics (a new or bulk-loaded
    # table, autovacuum off) read the whole unpaid-orders partial index for every window: 300
    # cancellations a second with 1,000,000 pending.
    cancelled = [
        row
        for row in conn.execute(
            select(
                t.orders.c.order_no,
                t.orders.c.user_id,
                t.orders.c.coupon_code,
                t.orders.c.status,
                t.orders.c.parent_no,
                t.orders.c.pay_deadline,
            )
            .where(t.orders.c.order_no.in_(list(envelopes)))
            .order_by(t.orders.c.order_no)
            .with_for_update()
        )
        if row.status == OrderStatus.PENDING_PAYMENT
        and row.parent_no is None
        # Never before the stored deadline, whatever the timer message says.
        and row.pay_deadline is not None
        and row.pay_deadline <= now
    ]
    if not cancelled:
        return
    order_nos = [row.order_no for row in cancelled]
    conn.execute(
        update(t.orders)
        .where(t.orders.c.order_no.in_(order_nos))
        .values(status=to_status, version=t.orders.c.version + 1, cancelled_at=now, updated_at=now)
    )
    moves = release_orders_stock(conn, order_nos)
    with_coupon = sorted(row.order_no for row in cancelled if row.coupon_code)
    returned = (
        set(
            conn.execute(
                update(t.coupons)
                .where(t.coupons.c.order_no.in_(with_coupon), t.coupons.c.state == coupons.HELD)
                .values(state=coupons.AVAILABLE, order_no=None, updated_at=now)
                .returning(t.coupons.c.code)
            ).scalars()
        )
        if with_coupon
        else set()
    )
    buffer = WriteBuffer()
    uows = [UnitOfWork(conn, envelopes[order.order_no], now, buffer=buffer) for order in cancelled]
    for order, uow in zip(cancelled, uows, strict=True):
        uow.record(
            order.order_no,
            OrderAction.PAYMENT_TIMEOUT.value,
            OrderStatus.PENDING_PAYMENT,
            to_status,
            PAYMENT_TIMER,
            {"reason": Reason.PAYMENT_TIMEOUT},
        )
        uow.emit(
            Evt.ORDER_CANCELLED,
            {
                "order_no": order.order_no,
                "status": to_status,
                "reason": Reason.PAYMENT_TIMEOUT,
                "user_id": order.user_id,
                "coupon_code": order.coupon_code if order.coupon_code in returned else None,
                "cancelled_at": now.isoformat(),
            },
        )
        uow.flush()
    # The stock events after all the cancellations: the relay publishes in outbox order, and
    # the cancellations are what a waiting user sees. Each order's own events keep their order.
    for order, uow in zip(cancelled, uows, strict=True):
        uow.emit(
            Evt.STOCK_RELEASED,
            {"order_no": order.order_no, "items": stock_items(moves.get(order.order_no, []))},
        )
        uow.flush()
    buffer.write(conn)


def overdue_unpaid(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """Unpaid parents whose pay deadline is before `cutoff`, locked so several sweepers share them."""
    stmt = (
        select(t.orders.c.order_no)
        .where(
            t.orders.c.status == OrderStatus.PENDING_PAYMENT,
            t.orders.c.parent_no.is_(None),
            t.orders.c.pay_deadline < cutoff,
        )
        .order_by(t.orders.c.pay_deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [str(order_no) for order_no in conn.execute(stmt).scalars()]


# ---------------------------------------------------------------------------------------------
# The handlers


class PaymentFlows:
    """payment.notify, order.cancel and refund.result, with their refusal announcers."""

    def __init__(self, settings: Settings, followups: Mapping[str, RefundFollowup]) -> None:
        self.settings = settings
        self.followups = followups

    @cached_property
    def secret(self) -> str:
        """The HMAC key, checked where it is used (once: the settings never change): unset or a
        published example value is refused (InsecureSetting) outside DEV_MODE; run_consumer.py
        refuses to start on it first."""
        return self.settings.webhook_secret()

    # -- payment.notify -------------------------------------------------------------------------

    def notify(self, cmd: PaymentNotify, uow: UnitOfWork) -> None:
        """Apply a signed payment to an unpaid order, or refund it when the order cannot take it."""
        if not signing.verify(uow.envelope.body, self.secret):
            raise Refusal(Reason.BAD_SIGNATURE, "the signature does not match the notification")
        order = require_order(uow.conn, cmd.order_no)
        if order.parent_no is not None:
            raise Refusal(Reason.UNKNOWN_ORDER, f"{cmd.order_no} is a child order; payments name the parent")
        known = uow.conn.execute(
            select(t.payments.c.payment_no).where(t.payments.c.payment_no == cmd.payment_no)
        ).first()
        if known is not None:
            return  # the same payment again: it was dealt with the first time
        if cmd.amount != order.payable:
            raise Refusal(Reason.AMOUNT_MISMATCH, f"paid {cmd.amount}, payable is {order.payable}")
        if can(ORDER_TRANSITIONS, order.status, OrderAction.PAY):
            self._apply_payment(cmd, uow, order)
        else:
            self._refund_unwanted_payment(cmd, uow, order)

    def _apply_payment(self, cmd: PaymentNotify, uow: UnitOfWork, order: Row[Any]) -> None:
        conn = uow.conn
        self._record_payment(uow, cmd, PaymentOutcome.APPLIED)
        status = transition(
            uow,
            order,
            OrderAction.PAY,
            PAYMENT_PROVIDER,
            {"payment_no": cmd.payment_no, "amount": cmd.amount, "method": cmd.method},
            paid_at=cmd.paid_at,
            paid_amount=cmd.amount,
            payment_no=cmd.payment_no,
        )
        if order.coupon_code:
            coupons.use(conn, order.coupon_code, order.order_no)
        moves = deduct_stock(conn, order.order_no)
        uow.emit(
            Evt.ORDER_PAID,
            {
                "order_no": order.order_no,
                "status": status,
                "user_id": order.user_id,
                "payment_no": cmd.payment_no,
                "method": cmd.method,
                "amount": cmd.amount,
                "paid_at": cmd.paid_at.isoformat(),
            },
        )
        uow.emit(Evt.STOCK_DEDUCTED, {"order_no": order.order_no, "items": stock_items(moves)})
        paid = require_order(conn, order.order_no)  # the new version, for the next guarded write
        if paid.order_type == OrderType.VIRTUAL:
            completed = transition(
                uow, paid, OrderAction.COMPLETE_VIRTUAL, SYSTEM, None, completed_at=uow.now
            )
            uow.emit(
                Evt.ORDER_COMPLETED,
                {
                    "order_no": paid.order_no,
                    "status": completed,
                    "user_id": paid.user_id,
                    "completed_at": uow.now.isoformat(),
                },
            )
            return
        children = split_order(uow, paid, SYSTEM)
        uow.emit(
            Evt.ORDER_SPLIT,
            {"order_no": paid.order_no, "status": paid.status, "payable": paid.payable, "children": children},
        )

    def _refund_unwanted_payment(self, cmd: PaymentNotify, uow: UnitOfWork, order: Row[Any]) -> None:
        # Cancelled, or paid already by another payment: money is never kept, the order stays as it is.
        self._record_payment(uow, cmd, PaymentOutcome.LATE_REFUNDED)
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
    def _record_payment(uow: UnitOfWork, cmd: PaymentNotify, outcome: str) -> None:
        uow.conn.execute(
            insert(t.payments).values(
                payment_no=cmd.payment_no,
                order_no=cmd.order_no,
                method=cmd.method,
                amount=cmd.amount,
                paid_at=cmd.paid_at,
                outcome=outcome,
                refundable=cmd.amount,
                raw=dict(uow.envelope.body),
                received_at=uow.now,
            )
        )

    @staticmethod
    def refuse_payment(cmd: PaymentNotify, refusal: Refusal, uow: UnitOfWork) -> None:
        """Announce payment.rejected; a signed payment of the wrong amount was still taken from
        the buyer, so it is recorded and refunded in full (PAYMENT_REJECTED)."""
        if refusal.reason == Reason.AMOUNT_MISMATCH:
            recorded = uow.conn.execute(
                pg_insert(t.payments)
                .values(
                    payment_no=cmd.payment_no,
                    order_no=cmd.order_no,
                    method=cmd.method,
                    amount=cmd.amount,
                    paid_at=cmd.paid_at,
                    outcome=PaymentOutcome.REJECTED,
                    refundable=cmd.amount,
                    raw=dict(uow.envelope.body),
                    received_at=uow.now,
                )
                .on_conflict_do_nothing()
            ).rowcount
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
            Evt.PAYMENT_REJECTED,
            {
                "order_no": cmd.order_no,
                "payment_no": cmd.payment_no,
                "amount": cmd.amount,
                "reason": refusal.reason,
                "detail": refusal.detail,
            },
        )

    # -- order.cancel ---------------------------------------------------------------------------

    def cancel(self, cmd: OrderCancel, uow: UnitOfWork) -> None:
        """Cancel an unpaid order at once; for a paid, unshipped one, request the refund that closes it."""
        conn = uow.conn
        found = require_order(conn, cmd.order_no, lock=False)
        if found.parent_no is not None:
            raise Refusal(
                Reason.INVALID_STATE,
                f"{found.order_no} is a child order; cancel its parent {found.parent_no}",
            )
        if found.user_id != cmd.user_id:
            raise Refusal(Reason.NOT_YOUR_ORDER, f"order {found.order_no} belongs to another user")
        children = children_of(conn, found.order_no, lock=True)  # children before their parent
        order = require_order(conn, found.order_no)
        actor = user(cmd.user_id)
        if can(ORDER_TRANSITIONS, order.status, OrderAction.USER_CANCEL):
            cancel_unpaid(uow, order, OrderAction.USER_CANCEL, Reason.USER, actor)
            return
        # Once goods have left a warehouse the order can no longer be cancelled, even if that
        # child was closed later (its units stay sold): after-sales take it from there.
        shipped = [c.order_no for c in children if c.shipped_at is not None]
        if order.shipped_at is not None or shipped:
            raise Refusal(Reason.ALREADY_SHIPPED, f"already shipped: {', '.join(shipped) or order.order_no}")
        if order.status != OrderStatus.PAID or order.order_type == OrderType.VIRTUAL:
            raise Refusal(Reason.INVALID_STATE, f"order {order.order_no} is {order.status}")
        pending = [
            r
            for r in open_refunds(uow, [order.order_no, *(c.order_no for c in children)])
            if r.payment_no == order.payment_no  # a late payment's refund returns another payment
        ]
        if pending:
            raise Refusal(
                Reason.INVALID_STATE, f"refund {pending[0].refund_no} of this order is still under way"
            )
        # After-sales not yet behind a refund are void: the cancellation refunds everything left.
        for claim in store_aftersales.open_unrefunded(conn, [c.order_no for c in children]):
            store_aftersales.move_aftersale(uow, claim, AfterSaleAction.CLOSE, actor)
        # What remains of the payment: whatever a child already had back (an after-sale, a
        # merchant cancel) is not refunded twice.
        amount = refundable_balance(conn, order.payment_no, lock=True)
        if amount <= 0:
            raise Refusal(Reason.INVALID_STATE, f"nothing left to refund on {order.order_no}")
        uow.record(
            order.order_no,
            CANCEL_REQUESTED,
            order.status,
            order.status,
            actor,
            {"reason": cmd.reason, "amount": amount},
        )
        request_refund(
            uow,
            order.order_no,
            amount,
            Reason.USER_CANCEL,
            order.order_no,
            actor,
            payment_no=order.payment_no,
        )

    @staticmethod
    def refuse_cancel(cmd: OrderCancel, refusal: Refusal, uow: UnitOfWork) -> None:
        """Announce order.rejected for a cancellation the order's state does not allow."""
        subject = refusal_subject(uow.conn, cmd.order_no)
        uow.emit(
            Evt.ORDER_REJECTED,
            {
                **subject,
                "order_no": cmd.order_no,
                "user_id": cmd.user_id,
                "command": Cmd.ORDER_CANCEL,
                "reason": refusal.reason,
                "detail": refusal.detail,
            },
        )

    # -- refund.result --------------------------------------------------------------------------

    def refund_result(self, cmd: RefundResult, uow: UnitOfWork) -> None:
        """Settle a refund from the provider's signed result; a repeated result changes nothing."""
        if not signing.verify(uow.envelope.body, self.secret):
            raise ParkCommand(Reason.BAD_SIGNATURE, "refund.result: the signature does not match the body")
        refund = load_refund(uow, cmd.refund_no)
        if refund is None:
            raise ParkCommand(Reason.UNKNOWN_REFUND, f"refund.result names no known refund ({cmd.refund_no})")
        action = RefundAction.SUCCEED if cmd.status == RefundStatus.SUCCEEDED else RefundAction.FAIL
        if not can(REFUND_TRANSITIONS, refund.status, action):
            return  # already settled this way (or succeeded, which a late failure cannot undo)
        try:
            status = settle(uow, refund, action, cmd.provider_refund_no)
        except Refusal as refusal:
            # The provider paid out a refund it had reported failed, after its amount went back
            # and was refunded another way: an operator must reconcile it with the provider.
            raise ParkCommand(
                Reason.REFUND_CONFLICT, f"refund.result {cmd.refund_no}: {refusal.detail}"
            ) from None
        body = {
            "refund_no": refund.refund_no,
            "order_no": refund.order_no,
            "amount": refund.amount,
            "reason": refund.source,
            # The refund's own state; `status` in events is kept for order and after-sale statuses.
            "refund_status": status,
            "provider_refund_no": cmd.provider_refund_no,
        }
        if action == RefundAction.FAIL:
            uow.record(refund.order_no, REFUND_FAILED, None, None, REFUND_PROVIDER, body)
            uow.emit(Evt.REFUND_FAILED, body)
            return
        children_of(uow.conn, refund.order_no, lock=True)  # children before their parent
        if refund.source not in UNAPPLIED_PAYMENT_REFUNDS:
            # A late or refused payment never paid the order: returning it refunds none of it.
            add_refunded(uow, refund.order_no, refund.amount)
        uow.record(refund.order_no, REFUND_SUCCEEDED, None, None, REFUND_PROVIDER, body)
        uow.emit(Evt.REFUND_SUCCEEDED, body)
        followup = self.followups.get(refund.source)
        if followup is not None:
            followup(uow, load_refund(uow, refund.refund_no))


# ---------------------------------------------------------------------------------------------
# Refund follow-ups of the refunds this module creates


def close_cancelled_order(uow: UnitOfWork, refund: Row[Any]) -> None:
    """A user-cancel refund succeeded: the order's sold stock goes back on sale, it and its children close."""
    conn = uow.conn
    children = children_of(conn, refund.order_no, lock=True)
    order = require_order(conn, refund.order_no)
    moves = restore_stock(conn, order.order_no)
    if moves:
        uow.emit(Evt.STOCK_RESTORED, {"order_no": order.order_no, "items": stock_items(moves)})
    for row in (order, *children):
        if not can(ORDER_TRANSITIONS, row.status, OrderAction.REFUND_CLOSE):
            continue  # a child closed on its own before (a merchant cancel)
        status = transition(
            uow,
            row,
            OrderAction.REFUND_CLOSE,
            REFUND_PROVIDER,
            {"refund_no": refund.refund_no, "reason": Reason.USER_CANCEL},
            closed_at=uow.now,
        )
        uow.emit(
            Evt.ORDER_CLOSED,
            {
                "order_no": row.order_no,
                "parent_no": row.parent_no,
                "status": status,
                "reason": Reason.USER_CANCEL,
                "refund_no": refund.refund_no,
                "closed_at": uow.now.isoformat(),
            },
        )


def note_late_payment_refunded(uow: UnitOfWork, refund: Row[Any]) -> None:
    """A late (or refused) payment went back to the payer: only the timeline needs to know."""
    uow.record(
        refund.order_no,
        LATE_PAYMENT_REFUNDED if refund.source == Reason.LATE_PAYMENT else REJECTED_PAYMENT_REFUNDED,
        None,
        None,
        REFUND_PROVIDER,
        {"refund_no": refund.refund_no, "payment_no": refund.source_ref, "amount": refund.amount},
    )


# ---------------------------------------------------------------------------------------------
# Wiring


def spec(settings: Settings, followups: Mapping[str, RefundFollowup]) -> ConsumerSpec:
    """The order.payment consumer: payment.notify, order.cancel and refund.result; `followups`
    (refund source -> what follows its success) come from every module that creates refunds."""
    flows = PaymentFlows(settings, followups)
    routes = {
        Cmd.PAYMENT_NOTIFY: Route(PaymentNotify, flows.notify, flows.refuse_payment),
        Cmd.ORDER_CANCEL: Route(OrderCancel, flows.cancel, flows.refuse_cancel),
        Cmd.REFUND_RESULT: Route(RefundResult, flows.refund_result),
    }
    return ConsumerSpec(PAYMENT_QUEUE, routes, tuple((COMMANDS_EXCHANGE, key) for key in routes))


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """The timers this module's flows start: the pay deadline of every placed order."""
    return [TimerKind(Timer.PAYMENT_TIMEOUT, fire_payment_timeout, overdue_unpaid, fire_payment_timeouts)]


def refund_followups(settings: Settings) -> dict[str, RefundFollowup]:
    """What happens after a refund of each source this module creates succeeds."""
    return {
        Reason.USER_CANCEL: close_cancelled_order,
        Reason.LATE_PAYMENT: note_late_payment_refunded,
        Reason.PAYMENT_REJECTED: note_late_payment_refunded,
    }
