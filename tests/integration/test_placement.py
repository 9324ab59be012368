"""Placing orders through the broker: pricing, stock locks, idempotency, no oversell."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from domain.pricing import FREIGHT_PER_PACKAGE
from testing.broker import EventListener
from testing.builders import RECEIVER, given_sku, place, stock_of
from testing.system import System, fresh_system, unique


def test_happy_path_two_merchants(system: System, events: EventListener) -> None:
    # Given two SKUs of two merchants with stock
    tea = given_sku(system, events, price=1200, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(system, events, price=15000, stock=5, merchant="M2", warehouse="W2")
    user = unique("user")
    # When the user orders 2 teas and 1 pot
    place(system, user, [{"sku": tea, "quantity": 2}, {"sku": pot, "quantity": 1}])
    # Then the order is created, priced server-side, and its stock locked
    created = events.one("order.created", user_id=user)
    assert created["goods_total"] == 2 * 1200 + 15000
    assert created["freight"] == FREIGHT_PER_PACKAGE  # the pot's package ships free (>= 99.00)
    assert created["discount_total"] == 0
    assert created["payable"] == created["goods_total"] + created["freight"]
    assert created["status"] == "PENDING_PAYMENT"
    assert len(created["items"]) == 2
    locked = events.one("stock.locked", order_no=created["order_no"])
    assert sorted((i["sku"], i["quantity"]) for i in locked["items"]) == sorted([(tea, 2), (pot, 1)])
    assert stock_of(system, tea)["locked"] == 2 and stock_of(system, tea)["available"] == 8


def test_coupon_discount_and_held_coupon(system: System, events: EventListener) -> None:
    # Given a SKU and a coupon of 5.00 off from 20.00
    sku = given_sku(system, events, price=1500, stock=10)
    user = unique("user")
    code = unique("coupon")
    system.send(
        "coupon.grant",
        {
            "code": code,
            "user_id": user,
            "amount": 500,
            "min_spend": 2000,
            "expires_at": "2099-01-01T00:00:00Z",
        },
    )
    events.one("coupon.granted", code=code)
    # When the user spends it on an order of 30.00
    place(system, user, [{"sku": sku, "quantity": 2}], coupon_code=code)
    created = events.one("order.created", user_id=user)
    # Then payable = goods + freight - discount
    assert created["discount_total"] == 500
    assert created["payable"] == 3000 + FREIGHT_PER_PACKAGE - 500
    # And the coupon cannot be used by a second order while the first is pending
    second = place(system, user, [{"sku": sku, "quantity": 2}], coupon_code=code)
    rejected = events.wait_for("order.rejected", user_id=user)[0].body
    assert rejected["reason"] == "COUPON_INVALID"
    assert events.for_correlation(second)[0].routing_key == "order.rejected"


def test_coupon_below_min_spend_is_refused_with_nothing_locked(system: System, events: EventListener) -> None:
    sku = given_sku(system, events, price=100, stock=10)
    user, code = unique("user"), unique("coupon")
    system.send(
        "coupon.grant",
        {
            "code": code,
            "user_id": user,
            "amount": 50,
            "min_spend": 10_000,
            "expires_at": "2099-01-01T00:00:00Z",
        },
    )
    events.one("coupon.granted", code=code)
    place(system, user, [{"sku": sku, "quantity": 1}], coupon_code=code)
    assert events.one("order.rejected", user_id=user)["reason"] == "COUPON_INVALID"
    assert stock_of(system, sku)["locked"] == 0


def test_same_message_five_times_gives_one_order(system: System, events: EventListener) -> None:
    sku = given_sku(system, events, price=100, stock=10)
    user = unique("user")
    message_id = str(uuid.uuid4())
    body = {
        "request_id": unique("req"),
        "user_id": user,
        "order_type": "physical",
        "items": [{"sku": sku, "quantity": 1}],
        "receiver": RECEIVER,
    }
    # When the very same message is delivered five times
    for _ in range(5):
        system.send("order.place", body, message_id=message_id)
    events.one("order.created", user_id=user)
    # Then one order exists, one unit is locked, and no refusal was needed
    system.send("stock.restock", {"sku": sku, "warehouse_id": "W1", "quantity": 1})  # a marker behind them
    events.wait_for("stock.restocked", sku=sku, count=2)
    assert system.db.scalar("SELECT count(*) FROM orders WHERE user_id = %s", user) == 1
    assert len(events.matching("order.created", user_id=user)) == 1
    assert len(events.matching("order.rejected", user_id=user)) == 0
    assert stock_of(system, sku)["locked"] == 1


def test_one_request_id_under_three_message_ids_gives_one_order(
    system: System, events: EventListener
) -> None:
    sku = given_sku(system, events, price=100, stock=10)
    user, request_id = unique("user"), unique("req")
    for _ in range(3):
        place(system, user, [{"sku": sku, "quantity": 1}], request_id=request_id)
    created = events.one("order.created", user_id=user)
    duplicates = events.wait_for("order.rejected", user_id=user, count=2)
    assert {d.body["reason"] for d in duplicates} == {"DUPLICATE_REQUEST"}
    assert {d.body["order_no"] for d in duplicates} == {created["order_no"]}
    assert system.db.scalar("SELECT count(*) FROM orders WHERE user_id = %s", user) == 1
    assert stock_of(system, sku)["locked"] == 1
    # And another user may use the same request_id
    other = unique("user")
    place(system, other, [{"sku": sku, "quantity": 1}], request_id=request_id)
    events.one("order.created", user_id=other)


def test_ten_in_stock_fifty_concurrent_orders() -> None:
    # A long payment timeout: no order may be cancelled (and its stock freed) while this runs.
    with fresh_system(ORDER_PAYMENT_TIMEOUT="10m") as system:
        # Given two placement consumers competing, and 10 units of one SKU
        system.start("order.catalog")
        system.start("order.placement")
        second = system.start_another("order.placement")
        events = EventListener(system.amqp_url).start()
        try:
            sku = given_sku(system, events, price=100, stock=10)
            users = [unique("user") for _ in range(50)]
            # When 50 users order one unit each at the same time
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda u: place(system, u, [{"sku": sku, "quantity": 1}]), users))
            events.wait_for("order.rejected", where=lambda b: b["user_id"] in users, count=40, timeout=30)
            # Then exactly 10 orders were made and 40 refused as out of stock
            created = [e for e in events.matching("order.created") if e.body["user_id"] in users]
            rejected = [e for e in events.matching("order.rejected") if e.body["user_id"] in users]
            assert len(created) == 10
            assert len(rejected) == 40 and {r.body["reason"] for r in rejected} == {"OUT_OF_STOCK"}
            # And the stock adds up, with the 10 units locked by exactly those orders
            counts = stock_of(system, sku)
            assert (counts["available"], counts["locked"], counts["sold"], counts["restocked"]) == (
                0,
                10,
                0,
                10,
            )
            assert system.db.scalar("SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'") == 10
        finally:
            events.stop()
            second.terminate()
            second.wait(timeout=30)


def test_unknown_sku_is_a_business_refusal(system: System, events: EventListener) -> None:
    user = unique("user")
    place(system, user, [{"sku": unique("nosuch"), "quantity": 1}])
    assert events.one("order.rejected", user_id=user)["reason"] == "UNKNOWN_SKU"


def test_refused_multi_line_orders_lock_nothing(system: System, events: EventListener) -> None:
    # Given one SKU in stock and one sold out
    plenty = given_sku(system, events, price=100, stock=50)
    none_left = given_sku(system, events, price=100, stock=0)
    users = [unique("user") for _ in range(20)]
    # When 20 orders (delivered together, so they share windows) each want one of both
    with system.publisher() as pub:
        for user in users:
            pub.send(
                "order.place",
                {
                    "request_id": unique("req"),
                    "user_id": user,
                    "order_type": "physical",
                    "items": [{"sku": plenty, "quantity": 1}, {"sku": none_left, "quantity": 1}],
                    "receiver": RECEIVER,
                },
            )
    refused = events.wait_for("order.rejected", count=20, where=lambda b: b["user_id"] in users)
    # Then all are refused and the first line's stock is not held by any of them
    assert {r.body["reason"] for r in refused} == {"OUT_OF_STOCK"}
    assert stock_of(system, plenty)["locked"] == 0 and stock_of(system, plenty)["available"] == 50
