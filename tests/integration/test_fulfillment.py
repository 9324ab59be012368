"""Fulfillment through the broker: address changes, shipping, tracking, receipt and auto-confirm.

The session system runs with AUTO_CONFIRM_RECEIPT_AFTER=4s, so a manual confirmation is sent
right after the shipment is seen, and tracking updates come after it (a completed order still
takes them).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from domain.errors import Reason
from domain.names import Cmd, Evt, Timer
from domain.status import OrderStatus
from testing.broker import EventListener, purge_queue, queue_counts
from testing.builders import RECEIVER, given_paid_order, given_sku, ship, status_of, two_merchant_order
from testing.system import System, unique
from topology import delay_queue_name


def test_ship_confirm_and_track_two_children(system: System, events: EventListener) -> None:
    # Given a paid order split into two children
    order, m1, m2 = two_merchant_order(system, events)
    first, second = order.child_of(m1), order.child_of(m2)

    # When the first child ships and the user confirms it at once
    shipped = ship(system, events, first)
    system.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": first, "user_id": order.user_id})

    # Then it is completed by the user, and the parent waits for the other child
    assert shipped["status"] == OrderStatus.SHIPPED
    completed = events.one(Evt.ORDER_COMPLETED, order_no=first)
    assert completed["status"] == OrderStatus.COMPLETED and completed["auto_confirmed"] is False
    assert status_of(system, order.parent_no) == OrderStatus.PAID

    # When the carrier reports: in order, an exact duplicate, a late older update, then a newer one
    t0 = datetime.now(UTC).replace(microsecond=0)
    tracking_no = shipped["tracking_no"]

    def track(status: str, at: datetime) -> None:
        system.send(
            Cmd.LOGISTICS_UPDATE,
            {
                "order_no": first,
                "tracking_no": tracking_no,
                "status": status,
                "at": at.isoformat(),
                "detail": "",
            },
        )

    track("PICKED_UP", t0 + timedelta(minutes=1))
    track("IN_TRANSIT", t0 + timedelta(minutes=2))
    track("IN_TRANSIT", t0 + timedelta(minutes=2))
    track("ACCEPTED", t0)
    track("DELIVERED", t0 + timedelta(minutes=3))
    events.one(Evt.ORDER_LOGISTICS_UPDATED, order_no=first, logistics_status="DELIVERED")

    # Then four updates are kept (the duplicate adds nothing) and the newest one is current
    kept = system.db.query(
        "SELECT detail FROM order_timeline WHERE order_no = %s AND action = 'LOGISTICS_UPDATE' ORDER BY id",
        first,
    )
    assert [k["detail"]["status"] for k in kept] == ["PICKED_UP", "IN_TRANSIT", "ACCEPTED", "DELIVERED"]
    assert len(events.matching(Evt.ORDER_LOGISTICS_UPDATED, order_no=first)) == 4
    late = events.one(Evt.ORDER_LOGISTICS_UPDATED, order_no=first, logistics_status="ACCEPTED")
    assert late["current"] is False and late["current_logistics_status"] == "IN_TRANSIT"
    assert system.db.scalar("SELECT logistics_status FROM orders WHERE order_no = %s", first) == "DELIVERED"

    # When the second child ships and is confirmed
    ship(system, events, second)
    system.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": second, "user_id": order.user_id})

    # Then the parent was shipped when both were, and is completed now both are
    events.one(Evt.ORDER_SHIPPED, order_no=order.parent_no)
    parent_done = events.one(Evt.ORDER_COMPLETED, order_no=order.parent_no)
    assert parent_done["status"] == OrderStatus.COMPLETED
    assert status_of(system, order.parent_no) == OrderStatus.COMPLETED


def test_confirm_receipt_is_refused_for_another_user_and_for_an_unshipped_child(
    system: System, events: EventListener
) -> None:
    # Given a paid order of two merchants, nothing shipped yet
    order, m1, _ = two_merchant_order(system, events)
    child = order.child_of(m1)
    stranger = unique("user")

    # When a stranger confirms receipt, and then the owner confirms before shipping
    system.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": stranger})
    system.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": order.user_id})

    # Then both are refused, with the sender as user_id, and the child is still paid
    refused = events.one(Evt.ORDER_REJECTED, order_no=child, user_id=stranger)
    assert refused["reason"] == Reason.NOT_YOUR_ORDER
    early = events.one(Evt.ORDER_REJECTED, order_no=child, user_id=order.user_id)
    assert early["reason"] == Reason.INVALID_STATE and early["command"] == Cmd.ORDER_CONFIRM_RECEIPT
    assert status_of(system, child) == OrderStatus.PAID


def test_unshipped_order_cannot_be_tracked_and_unknown_order_cannot_ship(
    system: System, events: EventListener
) -> None:
    # Given a paid child that has not shipped, and an order number nobody made
    order, m1, _ = two_merchant_order(system, events)
    child, ghost = order.child_of(m1), unique("O-none")

    # When the carrier reports on the child and the warehouse ships the ghost
    system.send(
        Cmd.LOGISTICS_UPDATE,
        {"order_no": child, "tracking_no": "X1", "status": "IN_TRANSIT", "at": datetime.now(UTC).isoformat()},
    )
    system.send(Cmd.ORDER_SHIP, {"order_no": ghost, "carrier": "SF", "tracking_no": "X2"})

    # Then both are refused and nothing is kept
    assert events.one(Evt.ORDER_REJECTED, order_no=child)["reason"] == Reason.INVALID_STATE
    assert events.one(Evt.ORDER_REJECTED, order_no=ghost)["reason"] == Reason.UNKNOWN_ORDER
    assert (
        system.db.scalar(
            "SELECT count(*) FROM order_timeline WHERE order_no = %s AND action = 'LOGISTICS_UPDATE'", child
        )
        == 0
    )


def test_auto_confirm_completes_a_shipped_child(system: System, events: EventListener) -> None:
    # Given a paid order of one merchant (one child)
    sku = given_sku(system, events, price=500, stock=5, merchant=unique("M"))
    order = given_paid_order(system, events, [(sku, 1)])
    (child,) = order.children

    # When it ships and the user never confirms
    ship(system, events, child)

    # Then the AUTO_CONFIRM timer (4s) completes it, and its parent with it
    completed = events.one(Evt.ORDER_COMPLETED, order_no=child, timeout=20)
    assert completed["auto_confirmed"] is True
    events.one(Evt.ORDER_COMPLETED, order_no=order.parent_no)
    assert status_of(system, order.parent_no) == OrderStatus.COMPLETED
    actor = system.db.scalar(
        "SELECT actor FROM order_timeline WHERE order_no = %s AND action = 'CONFIRM_RECEIPT'", child
    )
    assert actor == "system"


def test_address_changes_before_shipping_and_is_refused_after(system: System, events: EventListener) -> None:
    # Given a paid order of two merchants
    order, m1, _ = two_merchant_order(system, events)
    new_receiver = {"name": "Han Meimei", "phone": "13900000000", "address": "2 River Street, Suzhou"}

    # When the user changes the address before anything shipped
    system.send(
        Cmd.ORDER_UPDATE_ADDRESS,
        {"order_no": order.parent_no, "user_id": order.user_id, "receiver": new_receiver},
    )

    # Then the parent and both children carry the new receiver
    updated = events.one(Evt.ORDER_ADDRESS_UPDATED, order_no=order.parent_no)
    assert sorted(updated["orders"]) == sorted([order.parent_no, *order.children])
    receivers = system.db.query(
        "SELECT receiver FROM orders WHERE order_no = %s OR parent_no = %s", order.parent_no, order.parent_no
    )
    assert [r["receiver"] for r in receivers] == [new_receiver] * 3

    # When another user tries, and then one child ships and the owner tries again
    stranger = unique("user")
    system.send(
        Cmd.ORDER_UPDATE_ADDRESS, {"order_no": order.parent_no, "user_id": stranger, "receiver": RECEIVER}
    )
    ship(system, events, order.child_of(m1))
    system.send(
        Cmd.ORDER_UPDATE_ADDRESS,
        {"order_no": order.parent_no, "user_id": order.user_id, "receiver": RECEIVER},
    )

    # Then both are refused and the address stays as it was
    assert events.one(Evt.ORDER_REJECTED, order_no=order.parent_no, user_id=stranger)["reason"] == (
        Reason.NOT_YOUR_ORDER
    )
    late = events.one(Evt.ORDER_REJECTED, order_no=order.parent_no, user_id=order.user_id)
    assert late["reason"] == Reason.ALREADY_SHIPPED
    assert (
        system.db.scalar("SELECT receiver FROM orders WHERE order_no = %s", order.parent_no) == new_receiver
    )


def test_lost_auto_confirm_timer_is_applied_by_the_sweeper(system: System, events: EventListener) -> None:
    # Given a shipped child whose auto-confirm timer message is lost (its delay queue purged)
    sku = given_sku(system, events, price=700, stock=5, merchant=unique("M"))
    order = given_paid_order(system, events, [(sku, 1)])
    (child,) = order.children
    ship(system, events, child)
    delay_queue = delay_queue_name(Timer.AUTO_CONFIRM, timedelta(seconds=4))
    deadline = time.monotonic() + 10
    while queue_counts(system.amqp_url, delay_queue)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the timer message follows order.shipped out of the outbox
    assert purge_queue(system.amqp_url, delay_queue) >= 1

    # When the deadline and the sweeper's grace (3s) have passed
    completed = events.one(Evt.ORDER_COMPLETED, order_no=child, timeout=30)

    # Then the backstop sweeper completed it all the same, once
    assert completed["auto_confirmed"] is True
    assert status_of(system, child) == OrderStatus.COMPLETED
    assert (
        system.db.scalar(
            "SELECT count(*) FROM order_timeline WHERE order_no = %s AND action = 'CONFIRM_RECEIPT'", child
        )
        == 1
    )


def test_one_fired_message_with_several_auto_confirm_timers_completes_each_child_once(
    system: System, events: EventListener
) -> None:
    # Given two shipped children whose own auto-confirm timers are lost (their delay queue purged)
    order, m1, m2 = two_merchant_order(system, events)
    children = [order.child_of(m1), order.child_of(m2)]
    for child in children:
        ship(system, events, child)
    delay_queue = delay_queue_name(Timer.AUTO_CONFIRM, timedelta(seconds=4))
    deadline = time.monotonic() + 10
    while queue_counts(system.amqp_url, delay_queue)[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert purge_queue(system.amqp_url, delay_queue) >= 2
    # and their deadlines passed (a timer never acts before the stored one); the sweeper steps
    # in only SWEEPER_GRACE (3 s) after a deadline
    system.db.query(
        "UPDATE orders SET shipped_at = shipped_at - interval '5 seconds' WHERE order_no = ANY(%s)", children
    )

    # When one fired timer message names both, and the parent (which has nothing to confirm)
    system.fire_timer(
        Timer.AUTO_CONFIRM,
        {
            "refs": [*children, order.parent_no],
            "correlation_ids": ["corr-a", "corr-b", "corr-c"],
            "due_at": datetime.now(UTC).isoformat(),
        },
    )

    # Then each child is completed once, its event carrying its own timer's correlation id
    for child, correlation_id in zip(children, ["corr-a", "corr-b"], strict=True):
        completed = events.wait_for(Evt.ORDER_COMPLETED, order_no=child, timeout=15)[0]
        assert completed.body["auto_confirmed"] is True
        assert completed.properties.correlation_id == correlation_id
        assert status_of(system, child) == OrderStatus.COMPLETED
        assert (
            system.db.scalar(
                "SELECT count(*) FROM order_timeline WHERE order_no = %s AND action = 'CONFIRM_RECEIPT'",
                child,
            )
            == 1
        )
    # And the parent completes with its last child, as it always does
    events.one(Evt.ORDER_COMPLETED, order_no=order.parent_no)
