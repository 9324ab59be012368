"""Payments, cancellation and refunds through the broker: split, late payments, refund results."""

from __future__ import annotations

import time
from typing import Any

from domain.errors import Reason
from domain.names import PAYMENT_QUEUE, Cmd, Evt
from domain.pricing import FREIGHT_PER_PACKAGE
from testing.broker import EventListener
from testing.builders import (
    RECEIVER,
    assert_stock_adds_up,
    cancel,
    given_coupon,
    given_sku,
    notify_body,
    order_row,
    pay,
    place_order,
    refund_result,
)
from testing.system import System, unique

# --------------------------------------------------------------------------------------------
# Helpers only these tests use (the shared Given/When steps are in testing/builders.py)


def wait_processed(
    system: System, message_id: str, consumer: str = PAYMENT_QUEUE, timeout: float = 15
) -> None:
    """Wait until the consumer has committed this message (its dedup row exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if system.db.scalar(
            "SELECT count(*) FROM processed_messages WHERE consumer = %s AND message_id = %s",
            consumer,
            message_id,
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"{consumer} never processed {message_id}")


def caused(system: System, message_id: str) -> list[str]:
    """Routing keys of every message the service wrote to its outbox because of this command."""
    rows = system.db.query("SELECT routing_key FROM outbox WHERE correlation_id = %s ORDER BY id", message_id)
    return [r["routing_key"] for r in rows]


def given_paid_two_package_order(
    system: System, events: EventListener
) -> tuple[str, dict[str, Any], str, str]:
    """A paid order of two packages; returns (user, order.created, tea sku, pot sku)."""
    tea = given_sku(system, events, price=1200, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(system, events, price=2500, stock=10, merchant="M2", warehouse="W2")
    user = unique("user")
    created = place_order(system, events, user, [{"sku": tea, "quantity": 2}, {"sku": pot, "quantity": 1}])
    pay(system, created["order_no"], created["payable"])
    events.one(Evt.ORDER_SPLIT, order_no=created["order_no"])
    return user, created, tea, pot


# --------------------------------------------------------------------------------------------
# payment.notify


def test_payment_deducts_stock_and_splits_per_merchant_and_warehouse(
    system: System, events: EventListener
) -> None:
    # Given two lines of merchant M1 (one warehouse), one of M2, and a coupon of 7.77
    tea = given_sku(system, events, price=1200, stock=10, merchant="M1", warehouse="W1")
    cup = given_sku(system, events, price=333, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(system, events, price=15000, stock=5, merchant="M2", warehouse="W2")
    user = unique("user")
    code = given_coupon(system, events, user, amount=777)
    created = place_order(
        system,
        events,
        user,
        [{"sku": tea, "quantity": 2}, {"sku": pot, "quantity": 1}, {"sku": cup, "quantity": 3}],
        coupon_code=code,
    )
    order_no, payable = created["order_no"], created["payable"]
    # When the exact payable is paid
    _, payment_no = pay(system, order_no, payable)
    # Then the order is paid, its stock sold, and it is split into one child per (merchant, warehouse)
    paid = events.one(Evt.ORDER_PAID, order_no=order_no)
    assert (paid["status"], paid["payment_no"], paid["amount"]) == ("PAID", payment_no, payable)
    deducted = events.one(Evt.STOCK_DEDUCTED, order_no=order_no)
    assert sorted((i["sku"], i["quantity"]) for i in deducted["items"]) == sorted(
        [(tea, 2), (pot, 1), (cup, 3)]
    )
    split = events.one(Evt.ORDER_SPLIT, order_no=order_no)
    children = {c["merchant_id"]: c for c in split["children"]}
    assert set(children) == {"M1", "M2"}
    assert sorted(i["sku"] for i in children["M1"]["items"]) == sorted([tea, cup])
    assert [i["sku"] for i in children["M2"]["items"]] == [pot]
    # And the children's money adds up exactly to the parent's
    assert sum(c["payable"] for c in split["children"]) == payable
    assert sum(c["discount_total"] for c in split["children"]) == 777
    assert children["M1"]["freight"] == FREIGHT_PER_PACKAGE and children["M2"]["freight"] == 0
    # And the database agrees: children, lines and stock locks tied to them, coupon spent, payment kept
    parent = order_row(system, order_no)
    assert (parent["status"], parent["paid_amount"], parent["payment_no"]) == ("PAID", payable, payment_no)
    rows = system.db.query("SELECT * FROM orders WHERE parent_no = %s ORDER BY order_no", order_no)
    assert [r["order_no"] for r in rows] == [f"{order_no}-01", f"{order_no}-02"]
    assert all(r["status"] == "PAID" and r["paid_amount"] == r["payable"] for r in rows)
    assert all(r["receiver"] == RECEIVER for r in rows)
    assert (
        system.db.scalar(
            "SELECT count(*) FROM order_items WHERE order_no = %s AND child_order_no IS NULL", order_no
        )
        == 0
    )
    assert (
        system.db.scalar(
            "SELECT count(*) FROM stock_locks WHERE order_no = %s AND child_order_no IS NULL "
            "OR order_no = %s AND state <> 'DEDUCTED'",
            order_no,
            order_no,
        )
        == 0
    )
    assert system.db.scalar("SELECT state FROM coupons WHERE code = %s", code) == "USED"
    payment = system.db.one("SELECT * FROM payments WHERE payment_no = %s", payment_no)
    assert payment["outcome"] == "APPLIED" and payment["raw"]["signature"]
    assert assert_stock_adds_up(system, tea, cup, pot)["sold"] == 1


def test_virtual_order_completes_on_payment_without_children(system: System, events: EventListener) -> None:
    # Given a virtual order (no freight, no receiver)
    card = given_sku(system, events, price=5000, stock=100)
    created = place_order(
        system, events, unique("user"), [{"sku": card, "quantity": 2}], order_type="virtual"
    )
    assert created["freight"] == 0
    # When it is paid
    message_id, _ = pay(system, created["order_no"], created["payable"])
    # Then it is paid and completed at once, and never split
    assert events.one(Evt.ORDER_COMPLETED, order_no=created["order_no"])["status"] == "COMPLETED"
    assert caused(system, message_id) == [Evt.ORDER_PAID, Evt.STOCK_DEDUCTED, Evt.ORDER_COMPLETED]
    assert order_row(system, created["order_no"])["status"] == "COMPLETED"
    assert system.db.scalar("SELECT count(*) FROM orders WHERE parent_no = %s", created["order_no"]) == 0
    assert assert_stock_adds_up(system, card)["sold"] == 2


def test_bad_signature_is_rejected_and_nothing_recorded(system: System, events: EventListener) -> None:
    # Given an unpaid order
    sku = given_sku(system, events, price=1000, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    # When a payment arrives signed with another secret
    body = notify_body(system, created["order_no"], created["payable"])
    system.send(Cmd.PAYMENT_NOTIFY, {**body, "signature": "0" * 64})
    # Then it is rejected as BAD_SIGNATURE, the order stays unpaid and the payment is not kept
    rejected = events.one(Evt.PAYMENT_REJECTED, payment_no=body["payment_no"])
    assert (rejected["order_no"], rejected["reason"]) == (created["order_no"], Reason.BAD_SIGNATURE)
    assert order_row(system, created["order_no"])["status"] == "PENDING_PAYMENT"
    assert system.db.scalar("SELECT count(*) FROM payments WHERE payment_no = %s", body["payment_no"]) == 0
    assert assert_stock_adds_up(system, sku)["locked"] == 1


def test_wrong_amount_is_rejected_and_kept_for_reconciliation(system: System, events: EventListener) -> None:
    # Given an unpaid order
    sku = given_sku(system, events, price=1000, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    # When a signed payment of one cent less arrives
    _, payment_no = pay(system, created["order_no"], created["payable"] - 1)
    # Then it is rejected as AMOUNT_MISMATCH, the order stays unpaid, and the payment row says REJECTED
    assert events.one(Evt.PAYMENT_REJECTED, payment_no=payment_no)["reason"] == Reason.AMOUNT_MISMATCH
    assert order_row(system, created["order_no"])["status"] == "PENDING_PAYMENT"
    payment = system.db.one("SELECT * FROM payments WHERE payment_no = %s", payment_no)
    assert (payment["outcome"], payment["amount"]) == ("REJECTED", created["payable"] - 1)
    # And the right amount still pays the order
    pay(system, created["order_no"], created["payable"])
    events.one(Evt.ORDER_PAID, order_no=created["order_no"])
    assert_stock_adds_up(system, sku)


def test_payment_for_an_unknown_order_is_rejected(system: System, events: EventListener) -> None:
    # Given no order of this number
    order_no = unique("O-nosuch")
    # When a signed payment names it
    _, payment_no = pay(system, order_no, 1000)
    # Then it is rejected as UNKNOWN_ORDER
    rejected = events.one(Evt.PAYMENT_REJECTED, payment_no=payment_no)
    assert (rejected["order_no"], rejected["reason"]) == (order_no, Reason.UNKNOWN_ORDER)


def test_the_same_payment_twice_changes_nothing(system: System, events: EventListener) -> None:
    # Given an order paid once
    sku = given_sku(system, events, price=1000, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    body = notify_body(system, created["order_no"], created["payable"])
    system.send(Cmd.PAYMENT_NOTIFY, body)
    events.one(Evt.ORDER_SPLIT, order_no=created["order_no"])
    # When the provider notifies the same payment again, under a new message id
    again = system.send(Cmd.PAYMENT_NOTIFY, body)
    wait_processed(system, again)
    # Then it causes no event at all and the order is paid once
    assert caused(system, again) == []
    assert system.db.scalar("SELECT count(*) FROM payments WHERE order_no = %s", created["order_no"]) == 1
    assert system.db.scalar("SELECT count(*) FROM orders WHERE parent_no = %s", created["order_no"]) == 1
    assert assert_stock_adds_up(system, sku)["sold"] == 1


def test_a_second_payment_of_a_paid_order_is_refunded(system: System, events: EventListener) -> None:
    # Given a paid order
    sku = given_sku(system, events, price=1000, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    pay(system, created["order_no"], created["payable"])
    events.one(Evt.ORDER_SPLIT, order_no=created["order_no"])
    # When the user pays it again with another payment
    message_id, payment_no = pay(system, created["order_no"], created["payable"])
    # Then that money goes back (refund.requested LATE_PAYMENT) and nothing else happens
    refund = events.one(Evt.REFUND_REQUESTED, order_no=created["order_no"])
    assert (refund["reason"], refund["amount"]) == (Reason.LATE_PAYMENT, created["payable"])
    assert caused(system, message_id) == [Evt.REFUND_REQUESTED]
    assert (
        system.db.scalar("SELECT outcome FROM payments WHERE payment_no = %s", payment_no) == "LATE_REFUNDED"
    )
    assert order_row(system, created["order_no"])["status"] == "PAID"


# --------------------------------------------------------------------------------------------
# order.cancel of an unpaid order, and payments that come too late


def test_user_cancel_releases_stock_returns_coupon_and_refunds_a_late_payment(
    system: System, events: EventListener
) -> None:
    # Given an unpaid order that holds a coupon
    sku = given_sku(system, events, price=3000, stock=5)
    user = unique("user")
    code = given_coupon(system, events, user, amount=500)
    created = place_order(system, events, user, [{"sku": sku, "quantity": 2}], coupon_code=code)
    order_no = created["order_no"]
    # When the user cancels it
    cancel(system, order_no, user)
    # Then it is cancelled (USER), its stock released and its coupon free again
    cancelled = events.one(Evt.ORDER_CANCELLED, order_no=order_no)
    assert (cancelled["status"], cancelled["reason"], cancelled["user_id"]) == (
        "CANCELLED",
        Reason.USER,
        user,
    )
    released = events.one(Evt.STOCK_RELEASED, order_no=order_no)
    assert [(i["sku"], i["quantity"]) for i in released["items"]] == [(sku, 2)]
    assert system.db.scalar("SELECT state FROM coupons WHERE code = %s", code) == "AVAILABLE"
    assert assert_stock_adds_up(system, sku)["available"] == 5
    # When the payment arrives afterwards
    message_id, payment_no = pay(system, order_no, created["payable"])
    # Then the order stays cancelled, is not paid, and the money is refunded
    refund = events.one(Evt.REFUND_REQUESTED, order_no=order_no)
    assert (refund["reason"], refund["amount"]) == (Reason.LATE_PAYMENT, created["payable"])
    assert caused(system, message_id) == [Evt.REFUND_REQUESTED]
    assert order_row(system, order_no)["status"] == "CANCELLED"
    assert (
        system.db.scalar("SELECT outcome FROM payments WHERE payment_no = %s", payment_no) == "LATE_REFUNDED"
    )
    # And when that refund succeeds, the order still stays cancelled and the timeline says so
    refund_result(system, refund["refund_no"], "SUCCEEDED")
    events.one(Evt.REFUND_SUCCEEDED, refund_no=refund["refund_no"])
    assert order_row(system, order_no)["status"] == "CANCELLED"
    assert (
        system.db.scalar(
            "SELECT count(*) FROM order_timeline WHERE order_no = %s AND action = %s",
            order_no,
            "LATE_PAYMENT_REFUNDED",
        )
        == 1
    )
    assert assert_stock_adds_up(system, sku)["available"] == 5


def test_only_the_owner_may_cancel(system: System, events: EventListener) -> None:
    # Given someone's unpaid order
    sku = given_sku(system, events, price=1000, stock=5)
    created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    stranger = unique("user")
    # When another user tries to cancel it
    cancel(system, created["order_no"], stranger)
    # Then it is refused and stays pending
    rejected = events.one(Evt.ORDER_REJECTED, user_id=stranger)
    assert (rejected["order_no"], rejected["reason"]) == (created["order_no"], Reason.NOT_YOUR_ORDER)
    assert "request_id" in rejected
    assert order_row(system, created["order_no"])["status"] == "PENDING_PAYMENT"


# --------------------------------------------------------------------------------------------
# order.cancel of a paid order, and refund.result


def test_cancel_after_payment_refunds_then_restores_stock_and_closes(
    system: System, events: EventListener
) -> None:
    # Given a paid order of two packages
    user, created, tea, pot = given_paid_two_package_order(system, events)
    order_no = created["order_no"]
    # When the user cancels it
    cancel(system, order_no, user)
    # Then a refund of the full amount is requested, and the order waits for it
    refund = events.one(Evt.REFUND_REQUESTED, order_no=order_no)
    assert (refund["reason"], refund["amount"]) == (Reason.USER_CANCEL, created["payable"])
    assert order_row(system, order_no)["status"] == "PAID"
    # When the provider reports the refund succeeded
    refund_result(system, refund["refund_no"], "SUCCEEDED")
    # Then the stock is back on sale and the parent and both children are closed
    assert events.one(Evt.REFUND_SUCCEEDED, refund_no=refund["refund_no"])["amount"] == created["payable"]
    restored = events.one(Evt.STOCK_RESTORED, order_no=order_no)
    assert sorted((i["sku"], i["quantity"]) for i in restored["items"]) == sorted([(tea, 2), (pot, 1)])
    closed = events.wait_for(Evt.ORDER_CLOSED, count=3, where=lambda b: b["order_no"].startswith(order_no))
    assert {c.body["order_no"] for c in closed} == {order_no, f"{order_no}-01", f"{order_no}-02"}
    assert {(c.body["status"], c.body["reason"]) for c in closed} == {("CLOSED", Reason.USER_CANCEL)}
    assert order_row(system, order_no)["refunded_amount"] == created["payable"]
    for sku in (tea, pot):
        counts = assert_stock_adds_up(system, sku)
        assert (counts["sold"], counts["locked"], counts["available"]) == (0, 0, 10)
        assert system.db.scalar("SELECT sales_count FROM skus WHERE sku = %s", sku) == 0
    # When the same result arrives again
    again = refund_result(system, refund["refund_no"], "SUCCEEDED")
    wait_processed(system, again)
    # Then nothing changes
    assert caused(system, again) == []
    assert order_row(system, order_no)["refunded_amount"] == created["payable"]


def test_a_failed_refund_stays_open_and_a_later_success_still_closes(
    system: System, events: EventListener
) -> None:
    # Given a paid order the user cancelled
    user, created, tea, pot = given_paid_two_package_order(system, events)
    order_no = created["order_no"]
    cancel(system, order_no, user)
    refund_no = events.one(Evt.REFUND_REQUESTED, order_no=order_no)["refund_no"]
    # When the provider reports the refund failed, twice
    refund_result(system, refund_no, "FAILED")
    failed = events.one(Evt.REFUND_FAILED, refund_no=refund_no)
    again = refund_result(system, refund_no, "FAILED")
    wait_processed(system, again)
    # Then refund.failed is said once, the refund is FAILED (retryable) and the order still paid
    assert (failed["order_no"], failed["amount"], failed["refund_status"]) == (
        order_no,
        created["payable"],
        "FAILED",
    )
    assert caused(system, again) == []
    assert system.db.scalar("SELECT status FROM refunds WHERE refund_no = %s", refund_no) == "FAILED"
    assert order_row(system, order_no)["status"] == "PAID"
    # And cancelling again does not ask for a second refund
    second = cancel(system, order_no, user)
    assert events.one(Evt.ORDER_REJECTED, order_no=order_no)["reason"] == Reason.INVALID_STATE
    assert caused(system, second) == [Evt.ORDER_REJECTED]
    # When the provider later reports success
    refund_result(system, refund_no, "SUCCEEDED")
    # Then the order closes and its stock is restored
    events.one(Evt.REFUND_SUCCEEDED, refund_no=refund_no)
    events.one(Evt.ORDER_CLOSED, order_no=order_no)
    assert order_row(system, order_no)["status"] == "CLOSED"
    assert assert_stock_adds_up(system, tea, pot)["sold"] == 0


def test_cancel_is_refused_once_a_child_shipped(system: System, events: EventListener) -> None:
    # Given a paid order of two packages, one of which shipped
    user, created, _tea, _pot = given_paid_two_package_order(system, events)
    order_no = created["order_no"]
    system.send(Cmd.ORDER_SHIP, {"order_no": f"{order_no}-01", "carrier": "SF", "tracking_no": unique("t")})
    events.one(Evt.ORDER_SHIPPED, order_no=f"{order_no}-01")
    # When the user cancels the order
    cancel(system, order_no, user)
    # Then it is refused as ALREADY_SHIPPED and no refund is requested
    assert events.one(Evt.ORDER_REJECTED, order_no=order_no)["reason"] == Reason.ALREADY_SHIPPED
    assert system.db.scalar("SELECT count(*) FROM refunds WHERE order_no = %s", order_no) == 0


def test_refund_results_with_bad_signature_or_unknown_refund_are_parked(
    system: System, events: EventListener
) -> None:
    # Given a paid order the user cancelled
    user, created, _tea, _pot = given_paid_two_package_order(system, events)
    cancel(system, created["order_no"], user)
    refund_no = events.one(Evt.REFUND_REQUESTED, order_no=created["order_no"])["refund_no"]
    # When a forged result and a result for an unknown refund arrive
    forged = system.send(
        Cmd.REFUND_RESULT, {"refund_no": refund_no, "status": "SUCCEEDED", "signature": "f" * 64}
    )
    unknown = refund_result(system, unique("R-nosuch"), "SUCCEEDED")
    # Then both are parked with a readable reason and answered with command.rejected
    assert system.wait_parked(forged).headers["x-parking-code"] == Reason.BAD_SIGNATURE
    assert system.wait_parked(unknown).headers["x-parking-code"] == Reason.UNKNOWN_REFUND
    assert events.one(Evt.COMMAND_REJECTED, message_id=forged)["code"] == Reason.BAD_SIGNATURE
    # And the refund is untouched
    assert system.db.scalar("SELECT status FROM refunds WHERE refund_no = %s", refund_no) == "REQUESTED"
    assert order_row(system, created["order_no"])["status"] == "PAID"


def test_nothing_ships_while_a_user_cancel_refund_is_under_way(system: System, events: EventListener) -> None:
    # Given a paid order the user cancelled, its refund requested but not settled
    user, created, _tea, _pot = given_paid_two_package_order(system, events)
    order_no = created["order_no"]
    cancel(system, order_no, user)
    events.one(Evt.REFUND_REQUESTED, order_no=order_no)
    # When the merchant tries to ship a child
    system.send("order.ship", {"order_no": f"{order_no}-01", "carrier": "SF", "tracking_no": unique("sf")})
    # Then it is refused and the child stays unshipped
    refused = events.one(Evt.ORDER_REJECTED, order_no=f"{order_no}-01")
    assert refused["reason"] == Reason.INVALID_STATE
    assert order_row(system, f"{order_no}-01")["status"] == "PAID"
