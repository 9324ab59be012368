"""After-sales through the broker: refund-only and return-refund, approved, rejected, auto-approved.

The session system runs with AFTERSALE_REVIEW_TIMEOUT=4s: tests that want the merchant to answer
send the answer right after the request is seen.
"""

from __future__ import annotations

from domain.errors import Reason
from domain.names import Cmd, Evt
from domain.status import AfterSaleStatus, OrderStatus
from testing.broker import EventListener
from testing.builders import one_child_order, refund_result, request, status_of
from testing.system import System, unique


def test_refund_only_partial_then_amount_too_big(system: System, events: EventListener) -> None:
    # Given a paid child
    order, child, merchant, paid = one_child_order(system, events)

    # When the user asks for part of it back and the merchant approves (after a wrong merchant tried)
    asked = request(system, events, order, child, "REFUND_ONLY", paid // 2)
    aftersale_no = asked["aftersale_no"]
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": unique("M")})
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})

    # Then the stranger is refused, the approval requests the refund at once
    mismatch = events.one(Evt.ORDER_REJECTED, aftersale_no=aftersale_no)
    assert mismatch["reason"] == Reason.MERCHANT_MISMATCH and mismatch["command"] == Cmd.AFTERSALE_APPROVE
    assert asked["status"] == AfterSaleStatus.PENDING_REVIEW and asked["kind"] == "REFUND_ONLY"
    approved = events.one(Evt.AFTERSALE_APPROVED, aftersale_no=aftersale_no)
    assert approved["status"] == AfterSaleStatus.AWAITING_REFUND
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.AFTERSALE)
    assert refund["amount"] == paid // 2

    # When the refund succeeds
    refund_result(system, refund["refund_no"])

    # Then the after-sale succeeded and the order goes on (a partial refund does not close it)
    completed = events.one(Evt.AFTERSALE_COMPLETED, aftersale_no=aftersale_no)
    assert completed["status"] == AfterSaleStatus.SUCCEEDED and completed["amount"] == paid // 2
    assert status_of(system, child) == OrderStatus.PAID

    # When the user asks for more than is left
    left = paid - paid // 2
    system.send(
        Cmd.AFTERSALE_REQUEST,
        {
            "order_no": child,
            "user_id": order.user_id,
            "kind": "REFUND_ONLY",
            "amount": left + 1,
            "reason": "",
        },
    )

    # Then it is refused as exceeding the refundable amount
    too_big = events.one(Evt.ORDER_REJECTED, order_no=child, command=Cmd.AFTERSALE_REQUEST)
    assert too_big["reason"] == Reason.AMOUNT_EXCEEDS_REFUNDABLE and too_big["refundable"] == left


def test_open_after_sales_count_against_the_refundable_amount(system: System, events: EventListener) -> None:
    # Given a paid child with an after-sale for 60% of it still under review
    order, child, _, paid = one_child_order(system, events)
    request(system, events, order, child, "REFUND_ONLY", paid * 6 // 10)

    # When the user asks for another 60%
    system.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": order.user_id, "kind": "REFUND_ONLY", "amount": paid * 6 // 10},
    )

    # Then it is refused: the open claim holds its amount
    refused = events.one(Evt.ORDER_REJECTED, order_no=child, command=Cmd.AFTERSALE_REQUEST)
    assert refused["reason"] == Reason.AMOUNT_EXCEEDS_REFUNDABLE
    assert system.db.scalar("SELECT count(*) FROM aftersales WHERE order_no = %s", child) == 1


def test_return_refund_of_everything_closes_the_order(system: System, events: EventListener) -> None:
    # Given a paid child that shipped
    order, child, merchant, paid = one_child_order(system, events)
    system.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": unique("SF")})
    events.one(Evt.ORDER_SHIPPED, order_no=child)

    # When the user returns it for the whole amount, the merchant approves and receives the goods
    asked = request(system, events, order, child, "RETURN_REFUND", paid)
    aftersale_no = asked["aftersale_no"]
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})
    approved = events.one(Evt.AFTERSALE_APPROVED, aftersale_no=aftersale_no)
    system.send(Cmd.AFTERSALE_RETURN_RECEIVED, {"aftersale_no": aftersale_no, "merchant_id": merchant})
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.AFTERSALE)
    refund_result(system, refund["refund_no"])

    # Then the after-sale waited for the goods, then succeeded, and the fully refunded order closed
    assert approved["status"] == AfterSaleStatus.AWAITING_RETURN
    assert refund["amount"] == paid
    events.one(Evt.AFTERSALE_COMPLETED, aftersale_no=aftersale_no)
    closed = events.one(Evt.ORDER_CLOSED, order_no=child)
    assert closed["status"] == OrderStatus.CLOSED and closed["reason"] == Reason.AFTERSALE
    events.one(Evt.ORDER_CLOSED, order_no=order.parent_no)
    row = system.db.one("SELECT status, refunded_amount, closed_at FROM orders WHERE order_no = %s", child)
    assert row["status"] == OrderStatus.CLOSED and row["refunded_amount"] == paid and row["closed_at"]
    steps = system.db.query(
        "SELECT action FROM order_timeline WHERE order_no = %s AND action LIKE 'AFTERSALE%%' ORDER BY id",
        child,
    )
    assert [s["action"] for s in steps] == [
        "AFTERSALE_REQUESTED",
        "AFTERSALE_APPROVE_RETURN",
        "AFTERSALE_RETURN_RECEIVED",
        "AFTERSALE_REFUND_SUCCEEDED",
    ]


def test_rejected_after_sale_frees_its_amount(system: System, events: EventListener) -> None:
    # Given a paid child with an after-sale for all of it
    order, child, merchant, paid = one_child_order(system, events)
    asked = request(system, events, order, child, "REFUND_ONLY", paid)

    # When the merchant rejects it, and rejects it again
    reason = unique("no")
    system.send(
        Cmd.AFTERSALE_REJECT,
        {"aftersale_no": asked["aftersale_no"], "merchant_id": merchant, "reason": reason},
    )
    system.send(
        Cmd.AFTERSALE_REJECT, {"aftersale_no": asked["aftersale_no"], "merchant_id": merchant, "reason": "x"}
    )

    # Then it is rejected once (the second is refused as a wrong state), with no refund
    rejected = events.one(Evt.AFTERSALE_REJECTED, aftersale_no=asked["aftersale_no"])
    assert rejected["status"] == AfterSaleStatus.REJECTED and rejected["reason"] == reason
    again = events.one(Evt.ORDER_REJECTED, aftersale_no=asked["aftersale_no"])
    assert again["reason"] == Reason.INVALID_STATE and again["command"] == Cmd.AFTERSALE_REJECT
    assert system.db.scalar("SELECT count(*) FROM refunds WHERE order_no = %s", child) == 0

    # And the user may ask again for the whole amount
    second = request(system, events, order, child, "REFUND_ONLY", paid)
    assert second["aftersale_no"] != asked["aftersale_no"]


def test_unanswered_after_sale_is_approved_by_the_system(system: System, events: EventListener) -> None:
    # Given a paid child with a refund-only after-sale
    order, child, _, paid = one_child_order(system, events)

    # When the merchant does not answer within AFTERSALE_REVIEW_TIMEOUT (4s)
    asked = request(system, events, order, child, "REFUND_ONLY", paid // 3)

    # Then the system approves it and requests the refund
    approved = events.one(Evt.AFTERSALE_APPROVED, aftersale_no=asked["aftersale_no"], timeout=20)
    assert approved["by"] == "system" and approved["status"] == AfterSaleStatus.AWAITING_REFUND
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.AFTERSALE)
    assert refund["amount"] == paid // 3
    row = system.db.one(
        "SELECT status, refund_no FROM aftersales WHERE aftersale_no = %s", asked["aftersale_no"]
    )
    assert row == {"status": AfterSaleStatus.AWAITING_REFUND, "refund_no": refund["refund_no"]}
