"""Money under interleaved flows: one refundable balance per payment, no cancel after shipping,
a payment refused for its amount is refunded, a failed refund gives its amount back.

Each test is one of the interleavings that once refunded more than was paid, put shipped goods
back on sale or kept a buyer's money (issue 15). The session system runs with
AFTERSALE_REVIEW_TIMEOUT=4s: merchants answer right after the request is seen.
"""

from __future__ import annotations

import json
from typing import Any

from domain.errors import Reason
from domain.names import Cmd, Evt
from domain.status import AfterSaleStatus, OrderStatus, RefundStatus
from testing.broker import EventListener
from testing.builders import (
    cancel,
    given_sku,
    notify_body,
    one_child_order,
    place_order,
    refund_result,
    request,
    ship,
    status_of,
    two_merchant_order,
)
from testing.system import System, unique


def refunds_of_payment(system: System, payment_no: str) -> list[dict[str, Any]]:
    return system.db.query(
        "SELECT refund_no, source, amount, status FROM refunds WHERE payment_no = %s ORDER BY refund_no",
        payment_no,
    )


def payment_of(system: System, order_no: str) -> dict[str, Any]:
    return system.db.one(
        "SELECT pm.* FROM payments pm JOIN orders o ON o.payment_no = pm.payment_no WHERE o.order_no = %s",
        order_no,
    )


def requested_not_failed(system: System, payment_no: str) -> int:
    return sum(r["amount"] for r in refunds_of_payment(system, payment_no) if r["status"] != "FAILED")


def test_cancel_then_after_sale_then_merchant_cancel_refund_the_payment_once(
    system: System, events: EventListener
) -> None:
    # Given a paid order of one child, and the user's cancellation refunding all of it
    order, child, merchant, paid = one_child_order(system, events)
    cancelled = cancel(system, order.parent_no, order.user_id)
    first = events.one(Evt.REFUND_REQUESTED, order_no=order.parent_no, reason=Reason.USER_CANCEL)
    assert first["amount"] == paid
    assert events.for_correlation(cancelled)

    # When, while that refund is pending, the user asks the same money back on the child
    reason = unique("reason")
    system.send(
        Cmd.AFTERSALE_REQUEST,
        {
            "order_no": child,
            "user_id": order.user_id,
            "kind": "REFUND_ONLY",
            "amount": paid,
            "reason": reason,
        },
    )
    # and the merchant cancels the child
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "no stock"})

    # Then both are refused and only the first refund exists for the payment
    refused = events.wait_for(Evt.ORDER_REJECTED, count=2, order_no=child)
    assert {e.body["command"] for e in refused} == {Cmd.AFTERSALE_REQUEST, Cmd.MERCHANT_CANCEL}
    assert {e.body["reason"] for e in refused} <= {Reason.AMOUNT_EXCEEDS_REFUNDABLE, Reason.INVALID_STATE}
    payment = payment_of(system, order.parent_no)
    assert requested_not_failed(system, payment["payment_no"]) == paid
    assert payment["refundable"] == 0


def test_after_sale_open_when_the_user_cancels_is_voided(system: System, events: EventListener) -> None:
    # Given a paid child with an after-sale of half its amount waiting for the merchant
    order, child, merchant, paid = one_child_order(system, events)
    claim = request(system, events, order, child, "REFUND_ONLY", paid // 2)

    # When the user cancels the whole order
    cancel(system, order.parent_no, order.user_id)
    refund = events.one(Evt.REFUND_REQUESTED, order_no=order.parent_no, reason=Reason.USER_CANCEL)

    # Then the cancellation refunds everything, the after-sale is closed, and approving it refunds nothing
    assert refund["amount"] == paid
    status = system.db.scalar("SELECT status FROM aftersales WHERE aftersale_no = %s", claim["aftersale_no"])
    assert status == AfterSaleStatus.CLOSED
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": claim["aftersale_no"], "merchant_id": merchant})
    events.one(Evt.ORDER_REJECTED, aftersale_no=claim["aftersale_no"], reason=Reason.INVALID_STATE)
    assert requested_not_failed(system, payment_of(system, order.parent_no)["payment_no"]) == paid


def test_cancel_is_refused_once_a_child_shipped_even_if_it_was_closed_since(
    system: System, events: EventListener
) -> None:
    # Given two children; A ships, then a refund-only after-sale of all of A closes it
    order, m1, _m2 = two_merchant_order(system, events)
    child_a = order.child_of(m1)
    ship(system, events, child_a)
    paid_a = int(system.db.scalar("SELECT paid_amount FROM orders WHERE order_no = %s", child_a))
    claim = request(system, events, order, child_a, "REFUND_ONLY", paid_a)
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": claim["aftersale_no"], "merchant_id": m1})
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child_a, reason=Reason.AFTERSALE)
    refund_result(system, refund["refund_no"])
    events.one(Evt.ORDER_CLOSED, order_no=child_a)
    sku_a = system.db.scalar("SELECT sku FROM order_items WHERE child_order_no = %s", child_a)
    sold_before = system.db.scalar("SELECT sum(sold) FROM stock WHERE sku = %s", sku_a)

    # When the user cancels the parent
    cancel(system, order.parent_no, order.user_id)

    # Then it is refused ALREADY_SHIPPED and A's units stay sold
    events.one(Evt.ORDER_REJECTED, order_no=order.parent_no, reason=Reason.ALREADY_SHIPPED)
    assert system.db.scalar("SELECT sum(sold) FROM stock WHERE sku = %s", sku_a) == sold_before
    states = system.db.query("SELECT state FROM stock_locks WHERE child_order_no = %s", child_a)
    assert {s["state"] for s in states} == {"DEDUCTED"}
    assert status_of(system, order.parent_no) != OrderStatus.CLOSED


def test_payment_refused_for_its_amount_is_refunded(system: System, events: EventListener) -> None:
    # Given an unpaid order
    sku = given_sku(system, events, price=4000, stock=5)
    user = unique("user")
    created = place_order(system, events, user, [{"sku": sku, "quantity": 1}])

    # When a correctly signed payment of the wrong amount arrives
    body = notify_body(system, created["order_no"], created["payable"] - 1)
    system.send(Cmd.PAYMENT_NOTIFY, body)

    # Then it is rejected AMOUNT_MISMATCH and the amount paid goes back to the buyer
    events.one(Evt.PAYMENT_REJECTED, payment_no=body["payment_no"], reason=Reason.AMOUNT_MISMATCH)
    refund = events.one(Evt.REFUND_REQUESTED, order_no=created["order_no"], reason=Reason.PAYMENT_REJECTED)
    assert refund["amount"] == created["payable"] - 1
    assert refund["payment_no"] == body["payment_no"]

    # And the same notification again refunds nothing more
    system.send(Cmd.PAYMENT_NOTIFY, body)
    system.send(Cmd.ORDER_CANCEL, {"order_no": "O-none", "user_id": user, "reason": "barrier"})
    events.one(Evt.ORDER_REJECTED, order_no="O-none")
    assert len(refunds_of_payment(system, body["payment_no"])) == 1

    # And once the refund succeeds, the order is still unpaid and the payment recorded as refused
    refund_result(system, refund["refund_no"])
    events.one(Evt.REFUND_SUCCEEDED, refund_no=refund["refund_no"])
    assert status_of(system, created["order_no"]) == OrderStatus.PENDING_PAYMENT
    payment = system.db.one("SELECT * FROM payments WHERE payment_no = %s", body["payment_no"])
    assert (payment["outcome"], payment["refundable"]) == ("REJECTED", 0)


def test_failed_refund_gives_its_amount_back(system: System, events: EventListener) -> None:
    # Given a paid child whose merchant cancels it, and the refund fails
    _order, child, merchant, paid = one_child_order(system, events)
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "no stock"})
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.MERCHANT_CANCEL)
    payment_no = payment_of(system, child)["payment_no"]
    assert payment_of(system, child)["refundable"] == 0

    refund_result(system, refund["refund_no"], "FAILED")
    events.one(Evt.REFUND_FAILED, refund_no=refund["refund_no"])

    # Then its amount is refundable again
    assert payment_of(system, child)["refundable"] == paid

    # And a repeated merchant cancel submits it again, claiming it once more
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "again"})
    events.wait_for(Evt.REFUND_REQUESTED, count=2, refund_no=refund["refund_no"])
    assert payment_of(system, child)["refundable"] == 0
    assert requested_not_failed(system, payment_no) == paid


def test_late_success_of_a_failed_refund_already_refunded_otherwise_is_parked(
    system: System, events: EventListener
) -> None:
    # Given a user cancellation whose refund failed, then the money refunded by a merchant cancel
    order, child, merchant, paid = one_child_order(system, events)
    cancel(system, order.parent_no, order.user_id)
    first = events.one(Evt.REFUND_REQUESTED, order_no=order.parent_no, reason=Reason.USER_CANCEL)
    refund_result(system, first["refund_no"], "FAILED")
    events.one(Evt.REFUND_FAILED, refund_no=first["refund_no"])
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "no stock"})
    second = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.MERCHANT_CANCEL)
    assert second["amount"] == paid

    # When the provider then reports the first refund succeeded after all
    message_id = refund_result(system, first["refund_no"], "SUCCEEDED")

    # Then it is parked for an operator to reconcile, and the payment is not refunded twice
    props = system.wait_parked(message_id)
    assert (props.headers or {}).get("x-parking-code") == Reason.REFUND_CONFLICT
    status = system.db.scalar("SELECT status FROM refunds WHERE refund_no = %s", first["refund_no"])
    assert status == RefundStatus.FAILED
    assert requested_not_failed(system, payment_of(system, child)["payment_no"]) == paid


def test_orders_check_reports_money_kept(system: System, events: EventListener) -> None:
    # Given a payment refused for its amount
    sku = given_sku(system, events, price=1500, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    body = notify_body(system, created["order_no"], created["payable"] + 7)
    system.send(Cmd.PAYMENT_NOTIFY, body)
    events.one(Evt.REFUND_REQUESTED, order_no=created["order_no"], reason=Reason.PAYMENT_REJECTED)
    assert system.orders("check", check=False).returncode == 0

    # When its balance no longer matches its refunds (a corruption the check exists to see)
    corrupt = "UPDATE payments SET refundable = refundable + %s WHERE payment_no = %s"
    system.db.query(corrupt, 1, body["payment_no"])
    try:
        # Then `orders check` fails naming the I4 and I5 checks of that payment
        result = system.orders("check", "--json", check=False)
    finally:
        system.db.query(corrupt, -1, body["payment_no"])
    assert result.returncode == 1
    failed = {c["name"] for c in json.loads(result.stdout)["checks"] if not c["ok"]}
    assert failed == {"refunds-within-payment", "unapplied-payment-refunded"}
