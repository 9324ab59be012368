"""Refunds as the handlers see them: requesting one (every flow that returns money calls
`request_refund`), submitting a failed one again (`retry_refund`), and settling one from the
provider's signed `refund.result`, then running the follow-up its source names.

What may be refunded is kept by `uow.refunds` (store/refunds.py): every refund claims its amount
from its payment's refundable balance, so refunds of one payment never add up to more than it.
Follow-ups of a successful refund (closing the order, completing the after-sale, ...) are chosen
by the refund's source: each module that creates refunds names its own, and consumers/registry.py
hands them all to the payment consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, Final

from consumers.events import RefundFailed, RefundRequested, RefundSucceeded
from consumers.schemas import RefundResult
from domain import signing
from domain.actors import REFUND_PROVIDER
from domain.errors import ParkCommand, Reason, Refusal
from domain.status import REFUND_TRANSITIONS, RefundAction, RefundStatus, can
from settings import Settings
from store.ports import Record, UnitOfWork

# What follows a refund's success, by its source (USER_CANCEL, AFTERSALE, ...): (uow, refund row).
RefundFollowup = Callable[[UnitOfWork, Record], None]

# Refunds of a payment that never paid the order: they return none of the order's paid amount.
UNAPPLIED_PAYMENT_REFUNDS: Final = frozenset({Reason.LATE_PAYMENT, Reason.PAYMENT_REJECTED})

# Timeline actions.
REFUND_REQUESTED: Final = "REFUND_REQUESTED"
REFUND_RETRIED: Final = "REFUND_RETRIED"
REFUND_SUCCEEDED: Final = "REFUND_SUCCEEDED"
REFUND_FAILED: Final = "REFUND_FAILED"
LATE_PAYMENT_REFUNDED: Final = "LATE_PAYMENT_REFUNDED"
REJECTED_PAYMENT_REFUNDED: Final = "REJECTED_PAYMENT_REFUNDED"


def refund_requested(
    refund_no: str,
    order_no: str,
    amount: int,
    source: str,
    payment_no: str | None,
    attempt: int | None = None,
) -> RefundRequested:
    """The one builder of refund.requested (`attempt` only when a failed refund is resubmitted)."""
    event = RefundRequested(
        refund_no=refund_no,
        order_no=order_no,
        amount=amount,
        reason=source,
        payment_no=payment_no,
        refund_status=RefundStatus.REQUESTED,
    )
    return event if attempt is None else event.model_copy(update={"attempt": attempt})


def request_refund(
    uow: UnitOfWork,
    order_no: str,
    amount: int,
    source: str,
    source_ref: str,
    actor: str,
    payment_no: str | None,
) -> str:
    """Create the refund of this source (once), claiming its amount from the payment's
    refundable balance (Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when short), log it and announce
    `refund.requested`; returns its refund number (the existing one for a source asked again,
    which announces nothing)."""
    requested = uow.refunds.request(order_no, amount, source, source_ref, payment_no)
    if requested.created:
        refund_no = requested.refund_no
        uow.record(
            order_no,
            REFUND_REQUESTED,
            None,
            None,
            actor,
            {"refund_no": refund_no, "amount": amount, "reason": source, "payment_no": payment_no},
        )
        uow.emit(refund_requested(refund_no, order_no, amount, source, payment_no))
    return requested.refund_no


def retry_refund(uow: UnitOfWork, refund_no: str, actor: str) -> bool:
    """Submit a FAILED refund again (`refund.requested` once more); False when it is not failed.

    Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when its amount was meanwhile refunded another way.
    """
    refund = uow.refunds.load(refund_no)
    if refund is None or refund.status != RefundStatus.FAILED:
        return False
    uow.refunds.settle(refund, RefundAction.RETRY, None)
    uow.record(refund.order_no, REFUND_RETRIED, None, None, actor, {"refund_no": refund_no})
    uow.emit(
        refund_requested(
            refund_no, refund.order_no, refund.amount, refund.source, refund.payment_no, refund.attempts + 1
        )
    )
    return True


class RefundResults:
    """refund.result: settle a refund from the provider's signed result, then its follow-up."""

    def __init__(self, settings: Settings, followups: Mapping[str, RefundFollowup]) -> None:
        self.settings = settings
        self.followups = followups

    @cached_property
    def secret(self) -> str:
        """The HMAC key (see PaymentFlows.secret)."""
        return self.settings.webhook_secret()

    def refund_result(self, cmd: RefundResult, uow: UnitOfWork) -> None:
        """Settle a refund from the provider's signed result; a repeated result changes nothing."""
        if not signing.verify(uow.envelope.body, self.secret):
            raise ParkCommand(Reason.BAD_SIGNATURE, "refund.result: the signature does not match the body")
        refund = uow.refunds.load(cmd.refund_no)
        if refund is None:
            raise ParkCommand(Reason.UNKNOWN_REFUND, f"refund.result names no known refund ({cmd.refund_no})")
        action = RefundAction.SUCCEED if cmd.status == RefundStatus.SUCCEEDED else RefundAction.FAIL
        if not can(REFUND_TRANSITIONS, refund.status, action):
            return  # already settled this way (or succeeded, which a late failure cannot undo)
        try:
            status = uow.refunds.settle(refund, action, cmd.provider_refund_no)
        except Refusal as refusal:
            # The provider paid out a refund it had reported failed, after its amount went back
            # and was refunded another way: an operator must reconcile it with the provider.
            raise ParkCommand(
                Reason.REFUND_CONFLICT, f"refund.result {cmd.refund_no}: {refusal.detail}"
            ) from None
        settled: dict[str, Any] = {
            "refund_no": refund.refund_no,
            "order_no": refund.order_no,
            "amount": refund.amount,
            "reason": refund.source,
            # The refund's own state; `status` in events is kept for order and after-sale statuses.
            "refund_status": status,
            "provider_refund_no": cmd.provider_refund_no,
        }
        if action == RefundAction.FAIL:
            uow.record(refund.order_no, REFUND_FAILED, None, None, REFUND_PROVIDER, settled)
            uow.emit(RefundFailed(**settled))
            return
        uow.orders.children(refund.order_no, lock=True)  # children before their parent
        if refund.source not in UNAPPLIED_PAYMENT_REFUNDS:
            # A late or refused payment never paid the order: returning it refunds none of it.
            uow.orders.add_refunded(refund.order_no, refund.amount)
        uow.record(refund.order_no, REFUND_SUCCEEDED, None, None, REFUND_PROVIDER, settled)
        uow.emit(RefundSucceeded(**settled))
        followup = self.followups.get(refund.source)
        if followup is not None:
            followup(uow, uow.refunds.load(refund.refund_no))


def note_unapplied_payment_refunded(uow: UnitOfWork, refund: Record) -> None:
    """A late (or refused) payment went back to the payer: only the timeline needs to know."""
    uow.record(
        refund.order_no,
        LATE_PAYMENT_REFUNDED if refund.source == Reason.LATE_PAYMENT else REJECTED_PAYMENT_REFUNDED,
        None,
        None,
        REFUND_PROVIDER,
        {"refund_no": refund.refund_no, "payment_no": refund.source_ref, "amount": refund.amount},
    )
