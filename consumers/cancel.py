"""Ending an order before it ships: `order.cancel` and the pay deadline (queue order.payment and
the payment-timeout timer).

Unpaid, an order is cancelled at once (CANCELLED, its locked stock released, its coupon given
back). Paid and with nothing shipped, the user's cancellation requests the refund of what
remains of the payment; when that refund succeeds, the sold stock goes back on sale and the
order and its children close (`close_cancelled_order`, a refund follow-up).

Every flow that changes a parent order locks its row first, so a payment, a cancellation and
the payment timeout of the same order serialise: exactly one of them finds the order unpaid.
Where children exist they are locked before their parent, the order fulfillment uses too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from consumers.common import stock_items
from consumers.events import OrderCancelled, OrderClosed, OrderRejected, StockReleased, StockRestored
from consumers.refunds import request_refund
from consumers.schemas import OrderCancel
from consumers.timers import TimerKind
from domain.actors import REFUND_PROVIDER, user
from domain.errors import Reason, Refusal
from domain.names import Cmd, Timer
from domain.status import (
    ORDER_TRANSITIONS,
    AfterSaleAction,
    OrderAction,
    OrderStatus,
    OrderType,
    can,
    next_order_status,
)
from store.orders import overdue_unpaid
from store.ports import Record, TimerWindow, UnitOfWork
from store.windows import windowed

PAYMENT_TIMER: Final = f"timer:{Timer.PAYMENT_TIMEOUT}"

# Timeline actions that are not status transitions.
CANCEL_REQUESTED: Final = "CANCEL_REQUESTED"


def order_cancelled(
    order: Record, status: str, reason: str, coupon_returned: bool, now: datetime
) -> OrderCancelled:
    """The one builder of order.cancelled (user cancellation and payment timeout alike)."""
    return OrderCancelled(
        order_no=order.order_no,
        status=status,
        reason=reason,
        user_id=order.user_id,
        coupon_code=order.coupon_code if coupon_returned else None,
        cancelled_at=now.isoformat(),
    )


def cancel_unpaid(uow: UnitOfWork, order: Record, action: OrderAction, reason: str, actor: str) -> None:
    """Cancel an unpaid order: CANCELLED, locked stock released, coupon returned, both announced."""
    status = uow.orders.transition(order, action, actor, {"reason": reason}, cancelled_at=uow.now)
    moves = uow.stock.release(order.order_no)
    returned = uow.coupons.give_back(order.coupon_code, order.order_no)
    uow.emit(order_cancelled(order, status, reason, returned, uow.now))
    uow.emit(StockReleased(order_no=order.order_no, items=stock_items(moves)))


# ---------------------------------------------------------------------------------------------
# The payment timer


def payment_overdue(order: Record | None, now: datetime) -> bool:
    """Whether the pay deadline cancels this order now: an unpaid parent whose stored deadline
    has passed (a timer before it, forged or misrouted, changes nothing; nor one for an order
    paid or cancelled meanwhile)."""
    return (
        order is not None
        and order.parent_no is None
        and can(ORDER_TRANSITIONS, order.status, OrderAction.PAYMENT_TIMEOUT)
        and order.pay_deadline is not None
        and order.pay_deadline <= now
    )


def fire_payment_timeout(uow: UnitOfWork, order_no: str) -> None:
    """Cancel the order if it is still unpaid; a timer for a paid or cancelled order does nothing."""
    order = uow.orders.load(order_no)
    if payment_overdue(order, uow.now):
        cancel_unpaid(uow, order, OrderAction.PAYMENT_TIMEOUT, Reason.PAYMENT_TIMEOUT, PAYMENT_TIMER)


def fire_payment_timeouts(window: TimerWindow) -> None:
    """The payment timers of a whole window at once: the same effects as fire_payment_timeout
    for each order, in a handful of statements instead of a handful per order."""
    if not window.refs:
        return
    now = window.now
    repos = window.unit(window.refs[0])  # set-based reads and writes reach the whole window
    cancelled = [row for row in repos.orders.lock_for_timeout(window.refs) if payment_overdue(row, now)]
    if not cancelled:
        return
    to_status = next_order_status(OrderStatus.PENDING_PAYMENT, OrderAction.PAYMENT_TIMEOUT)
    order_nos = [row.order_no for row in cancelled]
    repos.orders.set_status_many(order_nos, to_status, cancelled_at=now)
    moves = repos.stock.release_many(order_nos)
    returned = set(repos.coupons.give_back_many(sorted(row.order_no for row in cancelled if row.coupon_code)))
    for order in cancelled:
        uow = window.unit(order.order_no)
        uow.record(
            order.order_no,
            OrderAction.PAYMENT_TIMEOUT.value,
            order.status,
            to_status,
            PAYMENT_TIMER,
            {"reason": Reason.PAYMENT_TIMEOUT},
        )
        uow.emit(
            order_cancelled(order, to_status, Reason.PAYMENT_TIMEOUT, order.coupon_code in returned, now)
        )
    # The stock events after all the cancellations: the relay publishes in outbox order, and
    # the cancellations are what a waiting user sees. Each order's own events keep their order.
    for order in cancelled:
        items = stock_items(moves.get(order.order_no, []))
        window.unit(order.order_no).emit(StockReleased(order_no=order.order_no, items=items))


def timer_kinds(payment_timeout: timedelta) -> list[TimerKind]:
    """The pay deadline of every placed order (started by placement)."""
    return [
        TimerKind(
            Timer.PAYMENT_TIMEOUT,
            fire_payment_timeout,
            overdue_unpaid,
            windowed(fire_payment_timeouts),
            delay=payment_timeout,
        )
    ]


# ---------------------------------------------------------------------------------------------
# order.cancel


def cancel(cmd: OrderCancel, uow: UnitOfWork) -> None:
    """Cancel an unpaid order at once; for a paid, unshipped one, request the refund that closes it."""
    found = uow.orders.require(cmd.order_no, lock=False)
    if found.parent_no is not None:
        raise Refusal(
            Reason.INVALID_STATE, f"{found.order_no} is a child order; cancel its parent {found.parent_no}"
        )
    if found.user_id != cmd.user_id:
        raise Refusal(Reason.NOT_YOUR_ORDER, f"order {found.order_no} belongs to another user")
    children = uow.orders.children(found.order_no, lock=True)  # children before their parent
    order = uow.orders.require(found.order_no)
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
        for r in uow.refunds.open_for([order.order_no, *(c.order_no for c in children)])
        if r.payment_no == order.payment_no  # a late payment's refund returns another payment
    ]
    if pending:
        raise Refusal(Reason.INVALID_STATE, f"refund {pending[0].refund_no} of this order is still under way")
    # After-sales not yet behind a refund are void: the cancellation refunds everything left.
    for claim in uow.aftersales.open_unrefunded([c.order_no for c in children]):
        uow.aftersales.move(claim, AfterSaleAction.CLOSE, actor)
    # What remains of the payment: whatever a child already had back (an after-sale, a
    # merchant cancel) is not refunded twice.
    amount = uow.refunds.balance(order.payment_no, lock=True)
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
        uow, order.order_no, amount, Reason.USER_CANCEL, order.order_no, actor, payment_no=order.payment_no
    )


def refuse_cancel(cmd: OrderCancel, refusal: Refusal, uow: UnitOfWork) -> None:
    """Announce order.rejected for a cancellation the order's state does not allow."""
    subject = uow.orders.refusal_subject(cmd.order_no)
    uow.emit(
        OrderRejected(
            **{
                **subject,
                "order_no": cmd.order_no,
                "user_id": cmd.user_id,
                "command": Cmd.ORDER_CANCEL,
                "reason": refusal.reason,
                "detail": refusal.detail,
            }
        )
    )


def close_cancelled_order(uow: UnitOfWork, refund: Record) -> None:
    """Refund follow-up USER_CANCEL: the order's sold stock goes back on sale, it and its
    children close."""
    children = uow.orders.children(refund.order_no, lock=True)
    order = uow.orders.require(refund.order_no)
    moves = uow.stock.restore(order.order_no)
    if moves:
        uow.emit(StockRestored(order_no=order.order_no, items=stock_items(moves)))
    for row in (order, *children):
        if not can(ORDER_TRANSITIONS, row.status, OrderAction.REFUND_CLOSE):
            continue  # a child closed on its own before (a merchant cancel)
        status = uow.orders.transition(
            row,
            OrderAction.REFUND_CLOSE,
            REFUND_PROVIDER,
            {"refund_no": refund.refund_no, "reason": Reason.USER_CANCEL},
            closed_at=uow.now,
        )
        uow.emit(
            OrderClosed(
                order_no=row.order_no,
                parent_no=row.parent_no,
                status=status,
                reason=Reason.USER_CANCEL,
                refund_no=refund.refund_no,
                closed_at=uow.now.isoformat(),
            )
        )
