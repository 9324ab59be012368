"""Queue order.aftersale: after-sale requests and reviews, merchant cancels, and their refund follow-ups."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from consumers.common import derive_parent, stock_items
from consumers.events import (
    AftersaleApproved,
    AftersaleCompleted,
    AftersaleRejected,
    AftersaleRequested,
    OrderClosed,
    OrderRejected,
    StockRestored,
)
from consumers.refunds import RefundFollowup, request_refund, retry_refund
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import (
    AftersaleApprove,
    AftersaleReject,
    AftersaleRequest,
    AftersaleReturnReceived,
    Command,
    MerchantCancel,
)
from consumers.timers import TimerKind
from domain.actors import SYSTEM, merchant, user
from domain.errors import Reason, Refusal
from domain.names import AFTERSALE_QUEUE, Cmd, Timer
from domain.status import (
    AFTERSALE_TRANSITIONS,
    ORDER_TRANSITIONS,
    AfterSaleAction,
    AfterSaleStatus,
    OrderAction,
    OrderType,
    can,
)
from settings import Settings
from store.aftersales import STEP_CLOSED, STEP_REFUND_REQUESTED, STEP_REFUNDED, overdue_reviews
from store.ports import Record, UnitOfWork

log = logging.getLogger("aftersale")

REFUND_ONLY = "REFUND_ONLY"
RETURN_REFUND = "RETURN_REFUND"
# How a merchant's approval moves an after-sale, by kind.
APPROVAL = {REFUND_ONLY: AfterSaleAction.APPROVE_REFUND, RETURN_REFUND: AfterSaleAction.APPROVE_RETURN}


def merchant_of(uow: UnitOfWork, order: Record) -> str:
    """The merchant answerable for an order: a child's own, or a virtual order's seller."""
    if order.merchant_id:
        return str(order.merchant_id)
    items = uow.orders.items(order)
    return str(items[0].merchant_id) if items else ""


def require_merchant(aftersale_or_order: Record, merchant_id: str, expected: str) -> None:
    """Refusal(MERCHANT_MISMATCH) unless the command comes from the merchant answerable."""
    if merchant_id != expected:
        raise Refusal(
            Reason.MERCHANT_MISMATCH,
            f"merchant {merchant_id} does not sell order {aftersale_or_order.order_no}",
            order_no=aftersale_or_order.order_no,
        )


def require_open_for_aftersales(order: Record) -> None:
    """Refusal(INVALID_STATE) unless the order's status still takes after-sales (the table's
    OPEN_AFTERSALE)."""
    if not can(ORDER_TRANSITIONS, order.status, OrderAction.OPEN_AFTERSALE):
        raise Refusal(
            Reason.INVALID_STATE, f"order {order.order_no} is {order.status}", order_no=order.order_no
        )


def lock_claim(uow: UnitOfWork, aftersale_no: str) -> tuple[Record, Record]:
    """The after-sale and its order, both locked, the order first (the lock order every flow uses)."""
    peek = uow.aftersales.load(aftersale_no, lock=False)
    if peek is None:
        raise Refusal(Reason.UNKNOWN_AFTERSALE, f"no after-sale {aftersale_no}", aftersale_no=aftersale_no)
    order = uow.orders.require(peek.order_no)
    return uow.aftersales.require(aftersale_no), order


class AfterSales:
    """The reverse flow: after-sale requests, the merchant's review, returns and merchant cancels."""

    def __init__(self, settings: Settings) -> None:
        self.review_timeout: timedelta = settings.aftersale_review_timeout

    # -- aftersale.request ----------------------------------------------------------------------

    def request(self, cmd: AftersaleRequest, uow: UnitOfWork) -> None:
        """Open an after-sale on a child (or virtual) order for at most what is still refundable."""
        order = uow.orders.require(cmd.order_no)
        if order.user_id != cmd.user_id:
            raise Refusal(
                Reason.NOT_YOUR_ORDER,
                f"order {order.order_no} belongs to another user",
                order_no=order.order_no,
            )
        if order.parent_no is None and order.order_type != OrderType.VIRTUAL:
            raise Refusal(
                Reason.INVALID_STATE,
                f"order {order.order_no} is a parent order; name one of its children",
                order_no=order.order_no,
            )
        require_open_for_aftersales(order)
        if uow.aftersales.load_cancellation(order.order_no) is not None:
            raise Refusal(
                Reason.INVALID_STATE,
                f"order {order.order_no} is being cancelled by its merchant",
                order_no=order.order_no,
            )
        left = uow.aftersales.refundable(order)
        if cmd.amount > left:
            raise Refusal(
                Reason.AMOUNT_EXCEEDS_REFUNDABLE,
                f"{cmd.amount} asked, {left} refundable",
                order_no=order.order_no,
                refundable=left,
            )
        aftersale_no = uow.aftersales.next_number()
        merchant_id = merchant_of(uow, order)
        deadline = uow.now + self.review_timeout
        uow.aftersales.create(aftersale_no, order, merchant_id, cmd.kind, cmd.amount, cmd.reason, deadline)
        uow.record(
            order.order_no,
            "AFTERSALE_REQUESTED",
            None,
            None,
            user(cmd.user_id),
            {"aftersale_no": aftersale_no, "kind": cmd.kind, "amount": cmd.amount, "reason": cmd.reason},
        )
        uow.emit(
            AftersaleRequested(
                aftersale_no=aftersale_no,
                order_no=order.order_no,
                status=AfterSaleStatus.PENDING_REVIEW,
                kind=cmd.kind,
                amount=cmd.amount,
                user_id=cmd.user_id,
                merchant_id=merchant_id,
                reason=cmd.reason,
                review_deadline=deadline.isoformat(),
            )
        )
        uow.start_timer(Timer.AFTERSALE_REVIEW, aftersale_no, self.review_timeout)

    # -- the merchant's review --------------------------------------------------------------------

    def approve(self, cmd: AftersaleApprove, uow: UnitOfWork) -> None:
        """The merchant approves: wait for the goods (RETURN_REFUND) or refund now (REFUND_ONLY)."""
        aftersale, order = lock_claim(uow, cmd.aftersale_no)
        require_merchant(aftersale, cmd.merchant_id, aftersale.merchant_id)
        require_open_for_aftersales(order)
        self._approve(uow, aftersale, order, merchant(cmd.merchant_id))

    def _approve(self, uow: UnitOfWork, aftersale: Record, order: Record, actor: str) -> None:
        status = uow.aftersales.move(aftersale, APPROVAL[aftersale.kind], actor)
        uow.emit(
            AftersaleApproved(
                aftersale_no=aftersale.aftersale_no,
                order_no=aftersale.order_no,
                status=status,
                kind=aftersale.kind,
                amount=aftersale.amount,
                by=actor,
            )
        )
        if status == AfterSaleStatus.AWAITING_REFUND:
            self._refund(uow, aftersale, order, actor)

    def _refund(self, uow: UnitOfWork, aftersale: Record, order: Record, actor: str) -> None:
        """Request the after-sale's refund, claimed from what remains of the order's payment."""
        refund_no = request_refund(
            uow,
            aftersale.order_no,
            aftersale.amount,
            Reason.AFTERSALE,
            aftersale.aftersale_no,
            actor,
            payment_no=order.payment_no,
        )
        uow.aftersales.set_refund_no(aftersale.aftersale_no, refund_no)

    def reject(self, cmd: AftersaleReject, uow: UnitOfWork) -> None:
        """The merchant turns the request down: REJECTED (aftersale.rejected)."""
        aftersale, _ = lock_claim(uow, cmd.aftersale_no)
        require_merchant(aftersale, cmd.merchant_id, aftersale.merchant_id)
        status = uow.aftersales.move(
            aftersale, AfterSaleAction.REJECT, merchant(cmd.merchant_id), reject_reason=cmd.reason
        )
        uow.emit(
            AftersaleRejected(
                aftersale_no=aftersale.aftersale_no,
                order_no=aftersale.order_no,
                status=status,
                kind=aftersale.kind,
                amount=aftersale.amount,
                reason=cmd.reason,
            )
        )

    def return_received(self, cmd: AftersaleReturnReceived, uow: UnitOfWork) -> None:
        """The returned goods arrived at the merchant: AWAITING_REFUND and the refund is requested."""
        aftersale, order = lock_claim(uow, cmd.aftersale_no)
        require_merchant(aftersale, cmd.merchant_id, aftersale.merchant_id)
        actor = merchant(cmd.merchant_id)
        uow.aftersales.move(aftersale, AfterSaleAction.RETURN_RECEIVED, actor)
        self._refund(uow, aftersale, order, actor)

    def review_timeout_fired(self, uow: UnitOfWork, aftersale_no: str) -> None:
        """Timer AFTERSALE_REVIEW: the merchant did not answer in time, so the system approves."""
        try:
            aftersale, order = lock_claim(uow, aftersale_no)
        except Refusal:
            return  # unknown: nothing to do
        if not can(AFTERSALE_TRANSITIONS, aftersale.status, APPROVAL[aftersale.kind]):
            return  # answered or closed: nothing to do
        if aftersale.review_deadline > uow.now:
            return  # a timer before the stored deadline (forged or misrouted) changes nothing
        short = aftersale.kind == REFUND_ONLY and aftersale.amount > uow.refunds.balance(order.payment_no)
        if short or not can(ORDER_TRANSITIONS, order.status, OrderAction.OPEN_AFTERSALE):
            # The order was closed, or its money refunded another way, meanwhile: the claim lapses.
            uow.aftersales.move(aftersale, AfterSaleAction.CLOSE, SYSTEM)
            return
        self._approve(uow, aftersale, order, SYSTEM)

    def aftersale_refunded(self, uow: UnitOfWork, refund: Record) -> None:
        """Refund follow-up AFTERSALE: SUCCEEDED, and the order closed if it is now fully refunded."""
        uow.orders.load(refund.order_no)  # lock the order before its after-sale, as every flow does
        aftersale = uow.aftersales.load(refund.source_ref)
        if aftersale is None or not can(
            AFTERSALE_TRANSITIONS, aftersale.status, AfterSaleAction.REFUND_SUCCEEDED
        ):
            log.warning("refund of an after-sale not awaiting one", extra={"refund_no": refund.refund_no})
            return
        status = uow.aftersales.move(aftersale, AfterSaleAction.REFUND_SUCCEEDED, SYSTEM)
        uow.emit(
            AftersaleCompleted(
                aftersale_no=aftersale.aftersale_no,
                order_no=aftersale.order_no,
                status=status,
                kind=aftersale.kind,
                amount=aftersale.amount,
                refund_no=refund.refund_no,
            )
        )
        order = uow.orders.load(aftersale.order_no)
        if (
            order is not None
            and order.refunded_amount >= order.paid_amount
            and can(ORDER_TRANSITIONS, order.status, OrderAction.REFUND_CLOSE)
        ):
            close_refunded(uow, order, Reason.AFTERSALE)

    # -- merchant.cancel --------------------------------------------------------------------------

    def merchant_cancel(self, cmd: MerchantCancel, uow: UnitOfWork) -> None:
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

    def merchant_cancel_refunded(self, uow: UnitOfWork, refund: Record) -> None:
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


def close_refunded(uow: UnitOfWork, order: Record, reason: str) -> None:
    """REFUND_CLOSE an order (order.closed) and derive its parent."""
    status = uow.orders.transition(
        order, OrderAction.REFUND_CLOSE, SYSTEM, {"reason": reason}, closed_at=uow.now
    )
    uow.emit(
        OrderClosed(
            order_no=order.order_no,
            parent_no=order.parent_no,
            user_id=order.user_id,
            status=status,
            reason=reason,
            refunded_amount=order.refunded_amount,
            closed_at=uow.now.isoformat(),
        )
    )
    derive_parent(uow, order.parent_no, SYSTEM)


def announce_refusal(cmd: Command, refusal: Refusal, uow: UnitOfWork) -> None:
    """order.rejected for a refused after-sale or merchant-cancel command, naming the command."""
    aftersale_no = getattr(cmd, "aftersale_no", None)
    order_no = refusal.fields.get("order_no") or getattr(cmd, "order_no", None)
    if order_no is None and aftersale_no is not None:
        found = uow.aftersales.load(aftersale_no, lock=False)
        order_no = found.order_no if found is not None else None
    subject = uow.orders.refusal_subject(str(order_no) if order_no else None)
    sender = getattr(cmd, "user_id", None)
    if sender is not None and sender != subject["user_id"]:
        # Answer the sender; never hand them another user's identifiers.
        subject.update(user_id=sender, request_id=None)
    fields: dict[str, Any] = {
        **subject,
        "reason": refusal.reason,
        "detail": refusal.detail,
        "command": uow.envelope.routing_key,
        **{k: v for k, v in refusal.fields.items() if k != "order_no"},
    }
    if aftersale_no is not None:
        fields["aftersale_no"] = aftersale_no
    merchant_id = getattr(cmd, "merchant_id", None)
    if merchant_id is not None:
        fields["merchant_id"] = merchant_id
    uow.emit(OrderRejected(**fields))


def spec(settings: Settings) -> ConsumerSpec:
    flows = AfterSales(settings)
    routes: dict[str, Route[Any]] = {
        Cmd.AFTERSALE_REQUEST: Route(AftersaleRequest, flows.request, announce_refusal),
        Cmd.AFTERSALE_APPROVE: Route(AftersaleApprove, flows.approve, announce_refusal),
        Cmd.AFTERSALE_REJECT: Route(AftersaleReject, flows.reject, announce_refusal),
        Cmd.AFTERSALE_RETURN_RECEIVED: Route(
            AftersaleReturnReceived, flows.return_received, announce_refusal
        ),
        Cmd.MERCHANT_CANCEL: Route(MerchantCancel, flows.merchant_cancel, announce_refusal),
    }
    return ConsumerSpec(AFTERSALE_QUEUE, routes)  # bound from order.commands by its routes' keys


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """The timers this module's flows start."""
    flows = AfterSales(settings)
    return [
        TimerKind(
            Timer.AFTERSALE_REVIEW, flows.review_timeout_fired, overdue_reviews, delay=flows.review_timeout
        )
    ]


def refund_followups(settings: Settings) -> dict[str, RefundFollowup]:
    """What happens after a refund of each source this module creates succeeds."""
    flows = AfterSales(settings)
    return {
        Reason.AFTERSALE: flows.aftersale_refunded,
        Reason.MERCHANT_CANCEL: flows.merchant_cancel_refunded,
    }
