"""Queue order.aftersale: after-sale requests and reviews, and their refund follow-ups (merchant
cancels, on the same queue, are consumers/merchant_cancel.py)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from consumers import merchant_cancel
from consumers.common import close_refunded, merchant_of, require_merchant
from consumers.events import (
    AftersaleApproved,
    AftersaleCompleted,
    AftersaleRejected,
    AftersaleRequested,
    OrderRejected,
)
from consumers.refunds import RefundFollowup, request_refund
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
from store.aftersales import overdue_reviews
from store.ports import Record, UnitOfWork

log = logging.getLogger("aftersale")

REFUND_ONLY = "REFUND_ONLY"
RETURN_REFUND = "RETURN_REFUND"
# How a merchant's approval moves an after-sale, by kind.
APPROVAL = {REFUND_ONLY: AfterSaleAction.APPROVE_REFUND, RETURN_REFUND: AfterSaleAction.APPROVE_RETURN}


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
    """The reverse flow: after-sale requests, the merchant's review and returns."""

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
        Cmd.MERCHANT_CANCEL: Route(MerchantCancel, merchant_cancel.cancel, announce_refusal),
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
        Reason.MERCHANT_CANCEL: merchant_cancel.refunded,
    }
