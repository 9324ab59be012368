"""The state machines: one table per aggregate of allowed (status, action) -> status."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from domain.errors import Reason, Refusal


class OrderStatus(StrEnum):
    PENDING_PAYMENT = "PENDING_PAYMENT"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    CLOSED = "CLOSED"


class OrderType(StrEnum):
    PHYSICAL = "physical"
    VIRTUAL = "virtual"  # no children, never ships: completed when paid


class OrderAction(StrEnum):
    PAY = "PAY"
    USER_CANCEL = "USER_CANCEL"
    PAYMENT_TIMEOUT = "PAYMENT_TIMEOUT"
    SHIP = "SHIP"
    CONFIRM_RECEIPT = "CONFIRM_RECEIPT"
    COMPLETE_VIRTUAL = "COMPLETE_VIRTUAL"
    REFUND_CLOSE = "REFUND_CLOSE"
    UPDATE_ADDRESS = "UPDATE_ADDRESS"  # no status change: allowed only while nothing has shipped
    # No status change either: whether an after-sale may be opened (or approved) on the order,
    # and whether its merchant may still cancel it.
    OPEN_AFTERSALE = "OPEN_AFTERSALE"
    MERCHANT_CANCEL = "MERCHANT_CANCEL"


class AfterSaleStatus(StrEnum):
    PENDING_REVIEW = "PENDING_REVIEW"
    AWAITING_RETURN = "AWAITING_RETURN"
    AWAITING_REFUND = "AWAITING_REFUND"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    CLOSED = "CLOSED"


class AfterSaleAction(StrEnum):
    APPROVE_RETURN = "APPROVE_RETURN"  # RETURN_REFUND: wait for the goods
    APPROVE_REFUND = "APPROVE_REFUND"  # REFUND_ONLY: refund at once
    REJECT = "REJECT"
    RETURN_RECEIVED = "RETURN_RECEIVED"
    REFUND_SUCCEEDED = "REFUND_SUCCEEDED"
    CLOSE = "CLOSE"


class RefundStatus(StrEnum):
    REQUESTED = "REQUESTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class RefundAction(StrEnum):
    SUCCEED = "SUCCEED"
    FAIL = "FAIL"
    RETRY = "RETRY"


S, A = OrderStatus, OrderAction
ORDER_TRANSITIONS: dict[tuple[OrderStatus, OrderAction], OrderStatus] = {
    (S.PENDING_PAYMENT, A.PAY): S.PAID,
    (S.PENDING_PAYMENT, A.USER_CANCEL): S.CANCELLED,
    (S.PENDING_PAYMENT, A.PAYMENT_TIMEOUT): S.CANCELLED,
    (S.PAID, A.SHIP): S.SHIPPED,
    (S.PAID, A.COMPLETE_VIRTUAL): S.COMPLETED,
    (S.SHIPPED, A.CONFIRM_RECEIPT): S.COMPLETED,
    (S.PAID, A.REFUND_CLOSE): S.CLOSED,
    (S.SHIPPED, A.REFUND_CLOSE): S.CLOSED,
    (S.COMPLETED, A.REFUND_CLOSE): S.CLOSED,
    (S.PENDING_PAYMENT, A.UPDATE_ADDRESS): S.PENDING_PAYMENT,
    (S.PAID, A.UPDATE_ADDRESS): S.PAID,
    # An order a refund may still close takes after-sales: paid, shipped or completed.
    (S.PAID, A.OPEN_AFTERSALE): S.PAID,
    (S.SHIPPED, A.OPEN_AFTERSALE): S.SHIPPED,
    (S.COMPLETED, A.OPEN_AFTERSALE): S.COMPLETED,
    # Only an order still waiting to ship may be cancelled by its merchant.
    (S.PAID, A.MERCHANT_CANCEL): S.PAID,
}

AS, AA = AfterSaleStatus, AfterSaleAction
AFTERSALE_TRANSITIONS: dict[tuple[AfterSaleStatus, AfterSaleAction], AfterSaleStatus] = {
    (AS.PENDING_REVIEW, AA.APPROVE_RETURN): AS.AWAITING_RETURN,
    (AS.PENDING_REVIEW, AA.APPROVE_REFUND): AS.AWAITING_REFUND,
    (AS.PENDING_REVIEW, AA.REJECT): AS.REJECTED,
    (AS.PENDING_REVIEW, AA.CLOSE): AS.CLOSED,
    (AS.AWAITING_RETURN, AA.RETURN_RECEIVED): AS.AWAITING_REFUND,
    (AS.AWAITING_RETURN, AA.CLOSE): AS.CLOSED,
    (AS.AWAITING_REFUND, AA.REFUND_SUCCEEDED): AS.SUCCEEDED,
}

RS, RA = RefundStatus, RefundAction
REFUND_TRANSITIONS: dict[tuple[RefundStatus, RefundAction], RefundStatus] = {
    (RS.REQUESTED, RA.SUCCEED): RS.SUCCEEDED,
    (RS.REQUESTED, RA.FAIL): RS.FAILED,
    (RS.FAILED, RA.SUCCEED): RS.SUCCEEDED,  # a late success after a reported failure still counts
    (RS.FAILED, RA.RETRY): RS.REQUESTED,
}


def next_order_status(status: str, action: OrderAction) -> OrderStatus:
    """The order status after `action`, or a Refusal(INVALID_STATE) when the table forbids it."""
    return _next(ORDER_TRANSITIONS, OrderStatus(status), action)


def next_aftersale_status(status: str, action: AfterSaleAction) -> AfterSaleStatus:
    """The after-sale status after `action`, or a Refusal(INVALID_STATE)."""
    return _next(AFTERSALE_TRANSITIONS, AfterSaleStatus(status), action)


def next_refund_status(status: str, action: RefundAction) -> RefundStatus:
    """The refund status after `action`, or a Refusal(INVALID_STATE)."""
    return _next(REFUND_TRANSITIONS, RefundStatus(status), action)


def can(table: dict, status: str, action: object) -> bool:  # type: ignore[type-arg]
    """Whether the table allows `action` from `status`."""
    return (status, action) in table


St = TypeVar("St")
Ac = TypeVar("Ac")


def _next(table: dict[tuple[St, Ac], St], status: St, action: Ac) -> St:
    try:
        return table[(status, action)]
    except KeyError:
        raise Refusal(Reason.INVALID_STATE, f"cannot {action} an order in status {status}") from None


def parent_status(child_statuses: list[str]) -> OrderStatus:
    """A parent's status derived from its children: shipped when all are, completed when all are.

    Closed children (merchant-cancelled, fully refunded) do not hold the others back; a parent
    whose children are all closed is closed.
    """
    live = [OrderStatus(s) for s in child_statuses if s != OrderStatus.CLOSED]
    if not live:
        return OrderStatus.CLOSED
    if all(s == OrderStatus.COMPLETED for s in live):
        return OrderStatus.COMPLETED
    if all(s in (OrderStatus.SHIPPED, OrderStatus.COMPLETED) for s in live):
        return OrderStatus.SHIPPED
    return OrderStatus.PAID
