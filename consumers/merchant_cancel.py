"""merchant.cancel (queue order.aftersale): a merchant cancels a paid, unshipped child order; the
refund is requested once, and when it succeeds the stock goes back on sale and the child closes.

Each step is recorded in merchant_cancellations, so a repeated command resumes (a failed refund
is submitted again) instead of starting over.
"""

from __future__ import annotations

import logging

from consumers.common import close_refunded, merchant_of, require_merchant, stock_items
from consumers.events import StockRestored
from consumers.refunds import request_refund, retry_refund
from consumers.schemas import MerchantCancel
from domain.actors import SYSTEM, merchant
from domain.errors import Reason, Refusal
from domain.status import ORDER_TRANSITIONS, AfterSaleAction, OrderAction, can
from store.aftersales import STEP_CLOSED, STEP_REFUND_REQUESTED, STEP_REFUNDED
from store.ports import Record, UnitOfWork

log = logging.getLogger("aftersale")


def cancel(cmd: MerchantCancel, uow: UnitOfWork) -> None:
    """The merchant cancels a paid, unshipped child: the operation record and the refund (once)."""
    order = uow.orders.require(cmd.order_no)
    if order.parent_no is None:
        raise Refusal(
            Reason.INVALID_STATE,
            f"order {order.order_no} is not a child order; name the child to cancel",
            order_no=order.order_no,
        )
    require_merchant(order, cmd.merchant_id, merchant_of(uow, order))
    actor = merchant(cmd.merchant_id)
    existing = uow.aftersales.load_cancellation(order.order_no)
    if existing is not None and existing.refund_no:
        # A repeat: resume rather than start again (a failed refund is submitted once more).
        retried = retry_refund(uow, existing.refund_no, actor)
        uow.record(
            order.order_no,
            "MERCHANT_CANCEL_REPEATED",
            order.status,
            order.status,
            actor,
            {"step": existing.step, "refund_no": existing.refund_no, "refund_retried": retried},
        )
        return
    if order.shipped_at is not None:
        raise Refusal(
            Reason.ALREADY_SHIPPED, f"order {order.order_no} has shipped", order_no=order.order_no
        )
    if not can(ORDER_TRANSITIONS, order.status, OrderAction.MERCHANT_CANCEL):
        raise Refusal(
            Reason.INVALID_STATE, f"order {order.order_no} is {order.status}", order_no=order.order_no
        )
    # Claims not yet behind a refund are void: the whole remainder is refunded now.
    for claim in uow.aftersales.open_unrefunded([order.order_no]):
        uow.aftersales.move(claim, AfterSaleAction.CLOSE, actor)
    amount = uow.aftersales.refundable(order)
    if amount <= 0:
        raise Refusal(
            Reason.INVALID_STATE,
            f"order {order.order_no} has nothing left to refund",
            order_no=order.order_no,
        )
    uow.aftersales.create_cancellation(order.order_no, cmd.merchant_id, cmd.reason)
    uow.record(
        order.order_no,
        "MERCHANT_CANCEL_REQUESTED",
        order.status,
        order.status,
        actor,
        {"reason": cmd.reason, "amount": amount},
    )
    refund_no = request_refund(
        uow,
        order.order_no,
        amount,
        Reason.MERCHANT_CANCEL,
        order.order_no,
        actor,
        payment_no=order.payment_no,
    )
    uow.aftersales.advance_cancellation(order.order_no, STEP_REFUND_REQUESTED, actor, refund_no=refund_no)

def refunded(uow: UnitOfWork, refund: Record) -> None:
    """Refund follow-up MERCHANT_CANCEL: refunded -> stock restored -> closed, each step once."""
    order = uow.orders.load(refund.source_ref)
    record = uow.aftersales.load_cancellation(refund.source_ref)
    if record is None or order is None:
        log.warning("refund of a merchant cancel with no record", extra={"refund_no": refund.refund_no})
        return
    if record.step == STEP_REFUND_REQUESTED:
        uow.aftersales.advance_cancellation(order.order_no, STEP_REFUNDED, SYSTEM)
    # The ledger guards the restore: a line already restored is never restored twice.
    moves = uow.stock.restore(
        order.parent_no or order.order_no, order.order_no if order.parent_no else None
    )
    if moves:
        items = stock_items(moves)
        uow.record(order.order_no, "STOCK_RESTORED", order.status, order.status, SYSTEM, {"items": items})
        uow.emit(
            StockRestored(
                order_no=order.order_no,
                parent_no=order.parent_no,
                reason=Reason.MERCHANT_CANCEL,
                items=items,
            )
        )
    if can(ORDER_TRANSITIONS, order.status, OrderAction.REFUND_CLOSE):
        close_refunded(uow, order, Reason.MERCHANT_CANCEL)
    if record.step != STEP_CLOSED:
        uow.aftersales.advance_cancellation(order.order_no, STEP_CLOSED, SYSTEM)
