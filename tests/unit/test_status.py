"""The state-machine tables and the parent status derived from children (pure, no I/O)."""

from __future__ import annotations

import pytest

from domain.errors import Reason, Refusal
from domain.status import (
    AFTERSALE_TRANSITIONS,
    ORDER_TRANSITIONS,
    AfterSaleAction,
    AfterSaleStatus,
    OrderAction,
    OrderStatus,
    can,
    next_aftersale_status,
    next_order_status,
    parent_status,
)

S, A = OrderStatus, OrderAction
AS, AA = AfterSaleStatus, AfterSaleAction


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    [
        (S.PENDING_PAYMENT, A.PAY, S.PAID),
        (S.PAID, A.SHIP, S.SHIPPED),
        (S.SHIPPED, A.CONFIRM_RECEIPT, S.COMPLETED),
        (S.PAID, A.REFUND_CLOSE, S.CLOSED),
        (S.SHIPPED, A.REFUND_CLOSE, S.CLOSED),
        (S.COMPLETED, A.REFUND_CLOSE, S.CLOSED),
        (S.PENDING_PAYMENT, A.UPDATE_ADDRESS, S.PENDING_PAYMENT),
        (S.PAID, A.UPDATE_ADDRESS, S.PAID),
    ],
)
def test_forward_and_refund_transitions(
    status: OrderStatus, action: OrderAction, expected: OrderStatus
) -> None:
    # Given an order in `status`, When `action` is applied, Then it moves to `expected`
    assert next_order_status(status, action) == expected


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (S.PENDING_PAYMENT, A.SHIP),  # unpaid orders do not ship
        (S.SHIPPED, A.SHIP),  # shipping twice
        (S.PAID, A.CONFIRM_RECEIPT),  # receipt before shipping
        (S.COMPLETED, A.CONFIRM_RECEIPT),  # confirming twice (user and timer)
        (S.CANCELLED, A.REFUND_CLOSE),  # nothing was paid
        (S.CLOSED, A.REFUND_CLOSE),  # closing twice
        (S.SHIPPED, A.UPDATE_ADDRESS),  # the parcel is on its way
        (S.COMPLETED, A.UPDATE_ADDRESS),
    ],
)
def test_forbidden_order_transitions_are_refused_as_invalid_state(
    status: OrderStatus, action: OrderAction
) -> None:
    # Given a status the table has no row for, When the action is applied, Then it is refused
    with pytest.raises(Refusal) as refused:
        next_order_status(status, action)
    assert refused.value.reason == Reason.INVALID_STATE
    assert not can(ORDER_TRANSITIONS, status, action)


def test_only_unshipped_orders_take_an_address_change() -> None:
    # Given every order status, Then exactly the unshipped, still-open ones allow an address change
    allowed = {s for s in S if can(ORDER_TRANSITIONS, s, A.UPDATE_ADDRESS)}
    assert allowed == {S.PENDING_PAYMENT, S.PAID}
    # And it never changes the status
    assert all(next_order_status(s, A.UPDATE_ADDRESS) == s for s in allowed)


def test_only_paid_orders_can_be_refunded_and_closed() -> None:
    # Given every order status, Then after-sales and refunds apply to paid, shipped and completed ones
    assert {s for s in S if can(ORDER_TRANSITIONS, s, A.REFUND_CLOSE)} == {S.PAID, S.SHIPPED, S.COMPLETED}


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([AA.APPROVE_REFUND, AA.REFUND_SUCCEEDED], AS.SUCCEEDED),  # refund only
        ([AA.APPROVE_RETURN, AA.RETURN_RECEIVED, AA.REFUND_SUCCEEDED], AS.SUCCEEDED),  # return and refund
        ([AA.REJECT], AS.REJECTED),
        ([AA.CLOSE], AS.CLOSED),
        ([AA.APPROVE_RETURN, AA.CLOSE], AS.CLOSED),
    ],
)
def test_aftersale_paths(path: list[AfterSaleAction], end: AfterSaleStatus) -> None:
    # Given a new after-sale pending review
    status = AS.PENDING_REVIEW
    # When the actions are applied in turn
    for action in path:
        status = next_aftersale_status(status, action)
    # Then it ends where the flow says
    assert status == end


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (AS.PENDING_REVIEW, AA.RETURN_RECEIVED),  # goods before approval
        (AS.PENDING_REVIEW, AA.REFUND_SUCCEEDED),  # money before approval
        (AS.AWAITING_RETURN, AA.REFUND_SUCCEEDED),  # refund before the goods came back
        (AS.REJECTED, AA.APPROVE_REFUND),  # a rejection is final
        (AS.SUCCEEDED, AA.REFUND_SUCCEEDED),  # the same refund result twice
        (AS.AWAITING_REFUND, AA.REJECT),  # approved is approved
        (AS.AWAITING_REFUND, AA.CLOSE),  # a refund is on its way
    ],
)
def test_forbidden_aftersale_transitions(status: AfterSaleStatus, action: AfterSaleAction) -> None:
    # Given an after-sale in `status`, When `action` is applied, Then it is refused
    with pytest.raises(Refusal) as refused:
        next_aftersale_status(status, action)
    assert refused.value.reason == Reason.INVALID_STATE
    assert not can(AFTERSALE_TRANSITIONS, status, action)


def test_terminal_aftersale_statuses_have_no_way_out() -> None:
    # Given the table, Then nothing leaves SUCCEEDED, REJECTED or CLOSED
    assert not [key for key in AFTERSALE_TRANSITIONS if key[0] in (AS.SUCCEEDED, AS.REJECTED, AS.CLOSED)]


@pytest.mark.parametrize(
    ("children", "expected"),
    [
        ([S.PAID, S.PAID], S.PAID),
        ([S.SHIPPED, S.PAID], S.PAID),  # one child still waits
        ([S.SHIPPED, S.SHIPPED], S.SHIPPED),
        ([S.COMPLETED, S.SHIPPED], S.SHIPPED),
        ([S.COMPLETED, S.COMPLETED], S.COMPLETED),
        ([S.CLOSED, S.PAID], S.PAID),  # a cancelled child does not hold the others back
        ([S.CLOSED, S.SHIPPED], S.SHIPPED),
        ([S.CLOSED, S.COMPLETED], S.COMPLETED),
        ([S.CLOSED], S.CLOSED),
        ([S.CLOSED, S.CLOSED], S.CLOSED),
    ],
)
def test_parent_status_follows_its_children(children: list[str], expected: OrderStatus) -> None:
    # Given children in these statuses, Then the parent's derived status is `expected`
    assert parent_status(children) == expected


def test_after_sales_open_exactly_where_a_refund_may_close_the_order() -> None:
    # Given every order status, Then an after-sale may be opened where REFUND_CLOSE is allowed
    allowed = {s for s in S if can(ORDER_TRANSITIONS, s, A.OPEN_AFTERSALE)}
    assert allowed == {s for s in S if can(ORDER_TRANSITIONS, s, A.REFUND_CLOSE)}
    assert allowed == {S.PAID, S.SHIPPED, S.COMPLETED}
    # And opening one never changes the order's status
    assert all(next_order_status(s, A.OPEN_AFTERSALE) == s for s in allowed)


def test_a_merchant_cancels_only_an_order_still_waiting_to_ship() -> None:
    # Given every order status, Then the merchant may cancel exactly where the order may ship
    allowed = {s for s in S if can(ORDER_TRANSITIONS, s, A.MERCHANT_CANCEL)}
    assert allowed == {s for s in S if can(ORDER_TRANSITIONS, s, A.SHIP)}
    assert allowed == {S.PAID}
    # And the cancellation itself does not change the status (the refund closes the order later)
    assert next_order_status(S.PAID, A.MERCHANT_CANCEL) == S.PAID


@pytest.mark.parametrize("status", [S.PENDING_PAYMENT, S.SHIPPED, S.COMPLETED, S.CANCELLED, S.CLOSED])
def test_merchant_cancel_is_refused_once_the_order_left_paid(status: OrderStatus) -> None:
    # Given an order no longer waiting to ship, When its merchant cancels, Then it is refused
    with pytest.raises(Refusal) as refused:
        next_order_status(status, A.MERCHANT_CANCEL)
    assert refused.value.reason == Reason.INVALID_STATE


@pytest.mark.parametrize("status", [S.PENDING_PAYMENT, S.CANCELLED, S.CLOSED])
def test_no_after_sale_on_an_unpaid_or_ended_order(status: OrderStatus) -> None:
    # Given an order never paid, or already ended, When an after-sale is opened, Then it is refused
    with pytest.raises(Refusal) as refused:
        next_order_status(status, A.OPEN_AFTERSALE)
    assert refused.value.reason == Reason.INVALID_STATE
