"""Merchant cancel through the broker: one refund, stock restored once, the child closed, across crashes."""

from __future__ import annotations

from domain.errors import Reason
from domain.names import AFTERSALE_QUEUE, PAYMENT_QUEUE, Cmd, Evt
from domain.status import OrderStatus
from testing.broker import EventListener
from testing.builders import given_paid_order, given_sku, refund_result, status_of, stock_of
from testing.system import System, unique


def sales_count(system: System, sku: str) -> int:
    return int(system.db.scalar("SELECT sales_count FROM skus WHERE sku = %s", sku))


def assert_stock_adds_up(system: System, sku: str) -> dict[str, int]:
    counts = stock_of(system, sku)
    assert counts["available"] + counts["locked"] + counts["sold"] == counts["restocked"]
    return counts


def test_merchant_cancels_one_child_of_two(system: System, events: EventListener) -> None:
    # Given a paid order of two merchants
    m1, m2 = unique("M"), unique("M")
    tea = given_sku(system, events, price=1200, stock=10, merchant=m1, warehouse="W1")
    pot = given_sku(system, events, price=15000, stock=5, merchant=m2, warehouse="W2")
    order = given_paid_order(system, events, [(tea, 2), (pot, 1)])
    pot_child, tea_child = order.child_of(m2), order.child_of(m1)
    paid = int(system.db.scalar("SELECT paid_amount FROM orders WHERE order_no = %s", pot_child))
    assert stock_of(system, pot)["sold"] == 1 and sales_count(system, pot) == 1

    # When another merchant tries to cancel the pot's child, then its own merchant does, twice
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": pot_child, "merchant_id": m1, "reason": "not mine"})
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": pot_child, "merchant_id": m2, "reason": "out of stock"})
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": pot_child, "merchant_id": m2, "reason": "out of stock"})

    # Then the stranger is refused and exactly one refund of the child's paid amount is requested
    mismatch = events.one(Evt.ORDER_REJECTED, order_no=pot_child, command=Cmd.MERCHANT_CANCEL)
    assert mismatch["reason"] == Reason.MERCHANT_MISMATCH
    refund = events.one(Evt.REFUND_REQUESTED, order_no=pot_child, reason=Reason.MERCHANT_CANCEL)
    assert refund["amount"] == paid
    # (a marker behind them on the same queue: once it is answered, the repeat was handled)
    marker = unique("A-none")
    system.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": marker, "merchant_id": m2})
    assert events.one(Evt.ORDER_REJECTED, aftersale_no=marker)["reason"] == Reason.UNKNOWN_AFTERSALE
    assert system.db.scalar("SELECT count(*) FROM refunds WHERE order_no = %s", pot_child) == 1
    assert len(events.matching(Evt.REFUND_REQUESTED, order_no=pot_child)) == 1

    # When the refund succeeds
    refund_result(system, refund["refund_no"])

    # Then the pot goes back on sale, its sales count drops, and the child (only) is closed
    restored = events.one(Evt.STOCK_RESTORED, order_no=pot_child)
    assert [(i["sku"], i["quantity"]) for i in restored["items"]] == [(pot, 1)]
    closed = events.one(Evt.ORDER_CLOSED, order_no=pot_child)
    assert closed["status"] == OrderStatus.CLOSED and closed["reason"] == Reason.MERCHANT_CANCEL
    assert status_of(system, tea_child) == OrderStatus.PAID
    assert status_of(system, order.parent_no) == OrderStatus.PAID
    counts = assert_stock_adds_up(system, pot)
    assert counts["sold"] == 0 and counts["available"] == 5 and sales_count(system, pot) == 0
    assert assert_stock_adds_up(system, tea)["sold"] == 2
    record = system.db.one(
        "SELECT step, refund_no FROM merchant_cancellations WHERE order_no = %s", pot_child
    )
    assert record == {"step": "CLOSED", "refund_no": refund["refund_no"]}
    steps = [
        r["action"]
        for r in system.db.query(
            "SELECT action FROM order_timeline WHERE order_no = %s ORDER BY id", pot_child
        )
    ]
    for step in (
        "MERCHANT_CANCEL_REQUESTED",
        "REFUND_REQUESTED",
        "MERCHANT_CANCEL_REFUNDED",
        "STOCK_RESTORED",
        "REFUND_CLOSE",
        "MERCHANT_CANCEL_CLOSED",
    ):
        assert step in steps, f"{step} missing from {steps}"

    # And the tea's child can still ship
    system.send(Cmd.ORDER_SHIP, {"order_no": tea_child, "carrier": "SF", "tracking_no": unique("SF")})
    events.one(Evt.ORDER_SHIPPED, order_no=order.parent_no)


def test_shipped_child_cannot_be_cancelled_by_its_merchant(system: System, events: EventListener) -> None:
    # Given a paid child that shipped
    merchant = unique("M")
    sku = given_sku(system, events, price=800, stock=3, merchant=merchant)
    order = given_paid_order(system, events, [(sku, 1)])
    (child,) = order.children
    system.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": unique("SF")})
    events.one(Evt.ORDER_SHIPPED, order_no=child)

    # When the merchant cancels it
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "late"})

    # Then it is refused and no refund is made
    assert events.one(Evt.ORDER_REJECTED, order_no=child)["reason"] == Reason.ALREADY_SHIPPED
    assert system.db.scalar("SELECT count(*) FROM refunds WHERE order_no = %s", child) == 0


def test_merchant_cancel_survives_consumer_crashes(system: System, events: EventListener) -> None:
    # Given a paid child of one merchant
    merchant = unique("M")
    sku = given_sku(system, events, price=2500, stock=4, merchant=merchant)
    order = given_paid_order(system, events, [(sku, 2)])
    (child,) = order.children
    assert stock_of(system, sku)["sold"] == 2

    # When the merchant cancels and the after-sale consumer is killed -9 right away, then restarted
    system.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "damaged"})
    system.kill(AFTERSALE_QUEUE)
    system.start(AFTERSALE_QUEUE)
    refund = events.one(Evt.REFUND_REQUESTED, order_no=child, reason=Reason.MERCHANT_CANCEL, timeout=30)

    # And the refund result arrives (twice) while the payment consumer is killed -9 and restarted
    refund_result(system, refund["refund_no"])
    system.kill(PAYMENT_QUEUE)
    refund_result(system, refund["refund_no"])
    system.start(PAYMENT_QUEUE)

    # Then the child is closed with exactly one refund and its stock restored exactly once
    events.one(Evt.ORDER_CLOSED, order_no=child, timeout=30)
    events.one(Evt.ORDER_CLOSED, order_no=order.parent_no)
    assert system.db.scalar("SELECT count(*) FROM refunds WHERE order_no = %s", child) == 1
    assert system.db.scalar("SELECT status FROM refunds WHERE order_no = %s", child) == "SUCCEEDED"
    # (events are at least once: a relay killed mid-batch may publish one again, same message_id)
    assert len({e.properties.message_id for e in events.matching(Evt.STOCK_RESTORED, order_no=child)}) == 1
    counts = assert_stock_adds_up(system, sku)
    assert counts["sold"] == 0 and counts["available"] == 4 and sales_count(system, sku) == 0
    assert status_of(system, child) == OrderStatus.CLOSED
    assert system.db.scalar("SELECT step FROM merchant_cancellations WHERE order_no = %s", child) == "CLOSED"
    restored_lines = system.db.scalar(
        "SELECT count(*) FROM order_timeline WHERE order_no = %s AND action = 'STOCK_RESTORED'", child
    )
    assert restored_lines == 1
