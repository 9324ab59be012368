"""Fulfillment handlers on the fake unit of work: address changes, shipping, tracking, receipt and
the auto-confirm timer (virtual clock), with every refusal. No broker, no database."""

from __future__ import annotations

from datetime import timedelta

import pytest

from domain.errors import Reason
from domain.names import Cmd, Evt, Timer
from domain.status import OrderStatus
from testing.fakes.service import InProcessService
from testing.shop import (
    RECEIVER,
    advance,
    given_sku,
    last,
    new_service,
    one_child_order,
    order,
    refund_result,
    rejected,
    ship,
    signed,
    two_merchant_order,
    unique,
)

AUTO_CONFIRM = timedelta(days=10)
NEW_RECEIVER = {"name": "Han Meimei", "phone": "13900000000", "address": "2 River Street, Suzhou"}


@pytest.fixture
def svc() -> InProcessService:
    return new_service()


def timeline(svc: InProcessService, order_no: str, action: str) -> list:
    return [line for line in svc.db.timeline(order_no) if line.action == action]


# -- order.ship ---------------------------------------------------------------------------------


def test_ship_marks_the_child_shipped_and_starts_its_auto_confirm_timer(svc: InProcessService) -> None:
    # Given a paid order of two merchants
    paid, m1, _ = two_merchant_order(svc)
    child = paid.child_of(m1)
    now = svc.clock.now()

    # When the first child ships
    svc.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": "SF1"})

    # Then order.shipped says so, with the auto-confirm deadline, and only for the child
    assert svc.answers[-1].names() == [Evt.ORDER_SHIPPED]
    assert last(svc, Evt.ORDER_SHIPPED, order_no=child) == {
        "order_no": child,
        "parent_no": paid.parent_no,
        "user_id": paid.user_id,
        "merchant_id": m1,
        "status": OrderStatus.SHIPPED,
        "carrier": "SF",
        "tracking_no": "SF1",
        "shipped_at": now.isoformat(),
        "auto_confirm_at": (now + AUTO_CONFIRM).isoformat(),
    }
    row = order(svc, child)
    assert (row.status, row.carrier, row.tracking_no, row.shipped_at) == (
        OrderStatus.SHIPPED,
        "SF",
        "SF1",
        now,
    )
    assert order(svc, paid.parent_no).status == OrderStatus.PAID
    (line,) = timeline(svc, child, "SHIP")
    assert line.actor == f"merchant:{m1}" and line.detail == {"carrier": "SF", "tracking_no": "SF1"}
    (timer,) = svc.pending_timers(Timer.AUTO_CONFIRM)
    assert timer["ref"] == child and timer["due_at"] == now + AUTO_CONFIRM


def test_the_parent_ships_when_its_last_child_does(svc: InProcessService) -> None:
    # Given a paid order of two merchants, one child shipped
    paid, m1, m2 = two_merchant_order(svc)
    ship(svc, paid.child_of(m1))

    # When the other child ships
    ship(svc, paid.child_of(m2))

    # Then the parent is derived SHIPPED and announced as such
    assert svc.answers[-1].names() == [Evt.ORDER_SHIPPED, Evt.ORDER_SHIPPED]
    assert last(svc, Evt.ORDER_SHIPPED, order_no=paid.parent_no) == {
        "order_no": paid.parent_no,
        "status": OrderStatus.SHIPPED,
        "derived_from_children": True,
    }
    assert order(svc, paid.parent_no).status == OrderStatus.SHIPPED


def test_shipping_twice_a_parent_or_an_unknown_order_is_refused(svc: InProcessService) -> None:
    # Given a paid order of one merchant, shipped once
    paid, child, _ = one_child_order(svc)
    ship(svc, child, "SF1")

    # When it ships again
    svc.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": "SF2"})
    # Then it is refused as a wrong state, naming the order's user and the command
    again = rejected(svc)
    assert again["reason"] == Reason.INVALID_STATE and again["command"] == Cmd.ORDER_SHIP
    assert (again["order_no"], again["user_id"]) == (child, paid.user_id)
    assert order(svc, child).tracking_no == "SF1"
    assert len(svc.pending_timers(Timer.AUTO_CONFIRM)) == 1

    # When the parent is named, and an order nobody made
    svc.send(Cmd.ORDER_SHIP, {"order_no": paid.parent_no, "carrier": "SF", "tracking_no": "SF3"})
    parent = rejected(svc)
    ghost = unique("O-none")
    svc.send(Cmd.ORDER_SHIP, {"order_no": ghost, "carrier": "SF", "tracking_no": "SF4"})
    unknown = rejected(svc)

    # Then both are refused
    assert parent["reason"] == Reason.INVALID_STATE and parent["order_no"] == paid.parent_no
    assert unknown == {
        "order_no": ghost,
        "user_id": None,
        "request_id": None,
        "reason": Reason.UNKNOWN_ORDER,
        "detail": f"no order {ghost}",
        "command": Cmd.ORDER_SHIP,
    }


def test_a_virtual_order_never_ships(svc: InProcessService) -> None:
    # Given a paid virtual order (completed when paid)
    sku = given_sku(svc, price=900, stock=5, merchant=unique("M"))
    user, request_id = unique("user"), unique("req")
    svc.send(
        Cmd.ORDER_PLACE,
        {
            "request_id": request_id,
            "user_id": user,
            "order_type": "virtual",
            "items": [{"sku": sku, "quantity": 1}],
        },
    )
    created = last(svc, Evt.ORDER_CREATED, request_id=request_id)
    svc.send(
        Cmd.PAYMENT_NOTIFY,
        signed(
            {
                "order_no": created["order_no"],
                "payment_no": unique("pay"),
                "method": "card",
                "amount": created["payable"],
                "paid_at": svc.clock.now().isoformat(),
            }
        ),
    )

    # When the warehouse ships it
    svc.send(Cmd.ORDER_SHIP, {"order_no": created["order_no"], "carrier": "SF", "tracking_no": "SF1"})

    # Then it is refused as virtual
    assert rejected(svc)["reason"] == Reason.VIRTUAL_ORDER


def test_a_child_its_merchant_is_cancelling_does_not_ship(svc: InProcessService) -> None:
    # Given a paid child its merchant cancelled (the refund not settled yet)
    _, child, merchant = one_child_order(svc)
    svc.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": merchant, "reason": "no stock"})

    # When the warehouse ships it
    svc.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": "SF1"})

    # Then it is refused, and the child is still paid
    refused = rejected(svc)
    assert refused["reason"] == Reason.INVALID_STATE and "cancelled by its merchant" in refused["detail"]
    assert order(svc, child).status == OrderStatus.PAID


def test_an_order_its_user_is_cancelling_does_not_ship_until_the_refund_fails(svc: InProcessService) -> None:
    # Given a paid order its user cancelled: the refund is under way
    paid, child, _ = one_child_order(svc)
    svc.send(
        Cmd.ORDER_CANCEL, {"order_no": paid.parent_no, "user_id": paid.user_id, "reason": "changed mind"}
    )
    refund = last(svc, Evt.REFUND_REQUESTED, order_no=paid.parent_no)

    # When the child ships
    svc.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": "SF1"})

    # Then it is refused, naming the refund
    refused = rejected(svc)
    assert refused["reason"] == Reason.INVALID_STATE and refund["refund_no"] in refused["detail"]

    # And once the refund has succeeded the order is closed: it still cannot ship
    refund_result(svc, refund["refund_no"])
    svc.send(Cmd.ORDER_SHIP, {"order_no": child, "carrier": "SF", "tracking_no": "SF1"})
    assert rejected(svc)["reason"] == Reason.INVALID_STATE
    assert order(svc, child).status == OrderStatus.CLOSED


# -- logistics.update ---------------------------------------------------------------------------


def test_logistics_updates_are_kept_once_and_only_a_newer_one_becomes_current(svc: InProcessService) -> None:
    # Given a shipped child
    _, child, _ = one_child_order(svc)
    ship(svc, child, "SF1")
    t0 = svc.clock.now()

    def track(status: str, minutes: int) -> list[str]:
        at = (t0 + timedelta(minutes=minutes)).isoformat()
        svc.send(
            Cmd.LOGISTICS_UPDATE,
            {"order_no": child, "tracking_no": "SF1", "status": status, "at": at, "detail": f"{status}!"},
        )
        return svc.answers[-1].names()

    # When the carrier reports in order, an exact duplicate, a late older update, then a newer one
    assert track("PICKED_UP", 1) == [Evt.ORDER_LOGISTICS_UPDATED]
    assert track("IN_TRANSIT", 2) == [Evt.ORDER_LOGISTICS_UPDATED]
    assert track("IN_TRANSIT", 2) == []  # the repeat says nothing
    assert track("ACCEPTED", 0) == [Evt.ORDER_LOGISTICS_UPDATED]
    assert track("DELIVERED", 3) == [Evt.ORDER_LOGISTICS_UPDATED]

    # Then four updates are kept, the late one not current, and the newest is the order's status
    kept = timeline(svc, child, "LOGISTICS_UPDATE")
    assert [k.detail["status"] for k in kept] == ["PICKED_UP", "IN_TRANSIT", "ACCEPTED", "DELIVERED"]
    assert [k.detail["current"] for k in kept] == [True, True, False, True]
    assert kept[0].actor == "carrier:SF"
    assert last(svc, Evt.ORDER_LOGISTICS_UPDATED, logistics_status="ACCEPTED") == {
        "order_no": child,
        "status": OrderStatus.SHIPPED,
        "tracking_no": "SF1",
        "logistics_status": "ACCEPTED",
        "at": t0.isoformat(),
        "detail": "ACCEPTED!",
        "current": False,
        "current_logistics_status": "IN_TRANSIT",
    }
    row = order(svc, child)
    assert (row.logistics_status, row.logistics_at) == ("DELIVERED", t0 + timedelta(minutes=3))


def test_logistics_of_an_unshipped_child_or_another_waybill_is_refused(svc: InProcessService) -> None:
    # Given a paid order of two merchants, one child shipped
    paid, m1, m2 = two_merchant_order(svc)
    shipped, waiting = paid.child_of(m1), paid.child_of(m2)
    ship(svc, shipped, "SF1")
    at = svc.clock.now().isoformat()

    # When the carrier reports on the unshipped child, on the shipped one with another waybill,
    # and on the parent
    refusals = []
    for order_no, tracking_no in ((waiting, "SF1"), (shipped, "SF9"), (paid.parent_no, "SF1")):
        svc.send(
            Cmd.LOGISTICS_UPDATE,
            {"order_no": order_no, "tracking_no": tracking_no, "status": "IN_TRANSIT", "at": at},
        )
        refusals.append(rejected(svc))

    # Then each is refused as a wrong state and nothing is kept
    assert [(r["order_no"], r["reason"]) for r in refusals] == [
        (waiting, Reason.INVALID_STATE),
        (shipped, Reason.INVALID_STATE),
        (paid.parent_no, Reason.INVALID_STATE),
    ]
    assert "has not shipped" in refusals[0]["detail"] and "SF9" in refusals[1]["detail"]
    assert not timeline(svc, waiting, "LOGISTICS_UPDATE") and not timeline(svc, shipped, "LOGISTICS_UPDATE")


# -- order.confirm-receipt ----------------------------------------------------------------------


def test_confirming_receipt_completes_the_child_then_the_parent(svc: InProcessService) -> None:
    # Given a paid order of two merchants, both children shipped
    paid, m1, m2 = two_merchant_order(svc)
    first, second = paid.child_of(m1), paid.child_of(m2)
    ship(svc, first)
    ship(svc, second)

    # When the user confirms the first
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": first, "user_id": paid.user_id})

    # Then it is completed by the user, and the parent waits for the other
    assert last(svc, Evt.ORDER_COMPLETED, order_no=first) == {
        "order_no": first,
        "parent_no": paid.parent_no,
        "user_id": paid.user_id,
        "status": OrderStatus.COMPLETED,
        "completed_at": svc.clock.now().isoformat(),
        "auto_confirmed": False,
    }
    (line,) = timeline(svc, first, "CONFIRM_RECEIPT")
    assert line.actor == f"user:{paid.user_id}" and line.detail == {"auto": False}
    assert order(svc, paid.parent_no).status == OrderStatus.SHIPPED

    # When the second is confirmed
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": second, "user_id": paid.user_id})

    # Then the parent is completed too
    assert svc.answers[-1].names() == [Evt.ORDER_COMPLETED, Evt.ORDER_COMPLETED]
    assert last(svc, Evt.ORDER_COMPLETED, order_no=paid.parent_no)["derived_from_children"] is True
    assert order(svc, paid.parent_no).status == OrderStatus.COMPLETED


def test_receipt_is_refused_for_a_stranger_before_shipping_and_twice(svc: InProcessService) -> None:
    # Given a paid child, not shipped
    paid, child, _ = one_child_order(svc)
    stranger = unique("user")

    # When a stranger confirms, then its owner before shipping
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": stranger})
    foreign = rejected(svc)
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": paid.user_id})
    early = rejected(svc)

    # Then both are refused; the stranger is answered without the owner's identifiers
    assert foreign["reason"] == Reason.NOT_YOUR_ORDER
    assert (foreign["user_id"], foreign["request_id"]) == (stranger, None)
    assert early["reason"] == Reason.INVALID_STATE and early["command"] == Cmd.ORDER_CONFIRM_RECEIPT
    assert early["request_id"] is not None  # the owner's own request, from the parent

    # When it ships, is confirmed, and is confirmed again
    ship(svc, child)
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": paid.user_id})
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": paid.user_id})

    # Then the repeat is refused and the child was completed once
    assert rejected(svc)["reason"] == Reason.INVALID_STATE
    assert len(timeline(svc, child, "CONFIRM_RECEIPT")) == 1


# -- the auto-confirm timer ---------------------------------------------------------------------


def test_an_unconfirmed_child_is_completed_by_the_timer(svc: InProcessService) -> None:
    # Given a shipped child of a one-merchant order
    paid, child, _ = one_child_order(svc)
    ship(svc, child)
    shipped_at = svc.clock.now()

    # When a day less than AUTO_CONFIRM_RECEIPT_AFTER passes, nothing happens
    assert advance(svc, AUTO_CONFIRM - timedelta(days=1), Timer.AUTO_CONFIRM) == []
    assert order(svc, child).status == OrderStatus.SHIPPED

    # When the rest passes
    (fired,) = advance(svc, timedelta(days=1), Timer.AUTO_CONFIRM)

    # Then the timer completed the child, and its parent with it, as the system
    assert fired.names() == [Evt.ORDER_COMPLETED, Evt.ORDER_COMPLETED]
    completed = fired.of(Evt.ORDER_COMPLETED, order_no=child)[0]
    assert completed["auto_confirmed"] is True
    assert completed["completed_at"] == (shipped_at + AUTO_CONFIRM).isoformat()
    assert order(svc, paid.parent_no).status == OrderStatus.COMPLETED
    (line,) = timeline(svc, child, "CONFIRM_RECEIPT")
    assert line.actor == "system" and line.detail == {"auto": True}


def test_the_timer_of_a_child_already_confirmed_does_nothing(svc: InProcessService) -> None:
    # Given a shipped child the user confirmed
    paid, child, _ = one_child_order(svc)
    ship(svc, child)
    svc.send(Cmd.ORDER_CONFIRM_RECEIPT, {"order_no": child, "user_id": paid.user_id})
    events_before = len(svc.db.events)

    # When its timer runs out
    (fired,) = advance(svc, AUTO_CONFIRM, Timer.AUTO_CONFIRM)

    # Then it changes nothing and refuses nothing
    assert fired.names() == [] and len(svc.db.events) == events_before
    assert len(timeline(svc, child, "CONFIRM_RECEIPT")) == 1


def test_a_timer_before_the_stored_deadline_changes_nothing(svc: InProcessService) -> None:
    # Given a shipped child
    _, child, _ = one_child_order(svc)
    ship(svc, child)

    # When a timer for it arrives early (forged or misrouted)
    fired = svc.fire(
        {"kind": Timer.AUTO_CONFIRM, "ref": child, "due_at": svc.clock.now() + timedelta(hours=1)}
    )

    # Then nothing changes
    assert fired.names() == [] and order(svc, child).status == OrderStatus.SHIPPED


# -- order.update-address -----------------------------------------------------------------------


def test_the_address_changes_on_the_parent_and_every_child_before_shipping(svc: InProcessService) -> None:
    # Given a paid order of two merchants
    paid, _, _ = two_merchant_order(svc)

    # When the user changes the address
    svc.send(
        Cmd.ORDER_UPDATE_ADDRESS,
        {"order_no": paid.parent_no, "user_id": paid.user_id, "receiver": NEW_RECEIVER},
    )

    # Then the parent and both children carry it, and the event names them all
    assert last(svc, Evt.ORDER_ADDRESS_UPDATED) == {
        "order_no": paid.parent_no,
        "user_id": paid.user_id,
        "status": OrderStatus.PAID,
        "receiver": NEW_RECEIVER,
        "orders": [paid.parent_no, *sorted(paid.children)],
    }
    for order_no in (paid.parent_no, *paid.children):
        assert order(svc, order_no).receiver == NEW_RECEIVER
    (line,) = timeline(svc, paid.parent_no, "UPDATE_ADDRESS")
    assert line.detail == {"receiver": NEW_RECEIVER, "previous": RECEIVER}
    assert line.from_status == line.to_status == OrderStatus.PAID


def test_an_address_change_is_refused_for_a_stranger_a_child_and_once_shipped(svc: InProcessService) -> None:
    # Given a paid order of two merchants
    paid, m1, _ = two_merchant_order(svc)
    stranger = unique("user")

    def change(order_no: str, user_id: str) -> dict:
        svc.send(
            Cmd.ORDER_UPDATE_ADDRESS, {"order_no": order_no, "user_id": user_id, "receiver": NEW_RECEIVER}
        )
        return rejected(svc)

    # When a stranger changes it, and the owner names a child
    foreign = change(paid.parent_no, stranger)
    on_child = change(paid.child_of(m1), paid.user_id)

    # Then both are refused
    assert foreign["reason"] == Reason.NOT_YOUR_ORDER and foreign["user_id"] == stranger
    assert on_child["reason"] == Reason.INVALID_STATE and paid.parent_no in on_child["detail"]

    # When one child ships and the owner tries again
    ship(svc, paid.child_of(m1))
    late = change(paid.parent_no, paid.user_id)

    # Then it is refused as already shipped, and no order took the new address
    assert late["reason"] == Reason.ALREADY_SHIPPED and late["order_no"] == paid.parent_no
    assert paid.child_of(m1) in late["detail"]
    for order_no in (paid.parent_no, *paid.children):
        assert order(svc, order_no).receiver == RECEIVER
