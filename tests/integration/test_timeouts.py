"""The payment timeout: TTL + dead-letter timers, the backstop sweeper, races with payments, restarts."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from domain.errors import Reason
from domain.names import CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE, Cmd, Evt, Timer
from testing.broker import EventListener, purge_queue, queue_counts, queue_info
from testing.builders import (
    RECEIVER,
    assert_stock_adds_up,
    given_coupon,
    given_sku,
    notify_body,
    order_row,
    pay,
    place_order,
)
from testing.system import System, fresh_system, own_system, unique, wait_until

TIMER_QUEUE_2S = "order.timer.payment-timeout.2s"


def test_an_unpaid_order_is_cancelled_with_its_stock_and_coupon_given_back(
    system: System, events: EventListener
) -> None:
    # Given an unpaid order holding a coupon and 3 units (ORDER_PAYMENT_TIMEOUT is 2s here)
    sku = given_sku(system, events, price=2000, stock=5)
    user = unique("user")
    code = given_coupon(system, events, user, amount=300)
    created = place_order(system, events, user, [{"sku": sku, "quantity": 3}], coupon_code=code)
    order_no = created["order_no"]
    # When its deadline passes
    cancelled = events.one(Evt.ORDER_CANCELLED, order_no=order_no, timeout=15)
    # Then it is cancelled for PAYMENT_TIMEOUT, no earlier than its deadline, by the fired timer
    assert (cancelled["status"], cancelled["reason"]) == ("CANCELLED", Reason.PAYMENT_TIMEOUT)
    row = order_row(system, order_no)
    assert row["status"] == "CANCELLED" and row["cancelled_at"] >= row["pay_deadline"]
    line = system.db.one(
        "SELECT * FROM order_timeline WHERE order_no = %s AND to_status = 'CANCELLED'", order_no
    )
    assert (
        line["action"] == "PAYMENT_TIMEOUT" and line["message_id"] is not None
    )  # a timer message, not the sweeper
    # And its stock is released and the coupon can be spent again
    released = events.one(Evt.STOCK_RELEASED, order_no=order_no)
    assert [(i["sku"], i["quantity"]) for i in released["items"]] == [(sku, 3)]
    counts = assert_stock_adds_up(system, sku)
    assert (counts["available"], counts["locked"]) == (5, 0)
    assert system.db.scalar("SELECT state FROM coupons WHERE code = %s", code) == "AVAILABLE"
    again = place_order(system, events, user, [{"sku": sku, "quantity": 3}], coupon_code=code)
    assert again["discount_total"] == 300


def test_a_paid_order_is_not_cancelled_by_its_timer(system: System, events: EventListener) -> None:
    # Given two orders placed together, the first one paid at once
    sku = given_sku(system, events, price=1000, stock=5)
    paid = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    unpaid = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
    pay(system, paid["order_no"], paid["payable"])
    events.one(Evt.ORDER_PAID, order_no=paid["order_no"])
    # When both timers have run out (the second's fires after the first's: one queue, in order)
    events.one(Evt.ORDER_CANCELLED, order_no=unpaid["order_no"], timeout=15)
    # Then the paid order is untouched
    assert order_row(system, paid["order_no"])["status"] == "PAID"
    assert events.matching(Evt.ORDER_CANCELLED, order_no=paid["order_no"]) == []
    assert events.matching(Evt.STOCK_RELEASED, order_no=paid["order_no"]) == []
    counts = assert_stock_adds_up(system, sku)
    assert (counts["sold"], counts["locked"]) == (1, 0)


def offset_ms(index: int) -> int:
    """When the index-th order of the race is paid, relative to its deadline."""
    return (index % 10 - 3) * 50


def test_pay_at_the_deadline_each_order_is_either_paid_or_cancelled_and_refunded(
    system: System, events: EventListener
) -> None:
    # Given 30 unpaid orders of one unit each
    sku = given_sku(system, events, price=1000, stock=40)
    users = [unique("user") for _ in range(30)]
    with system.publisher() as publisher:  # all at once: placing them one by one takes longer than 2s
        for user in users:
            publisher.send(
                Cmd.ORDER_PLACE,
                {
                    "request_id": unique("req"),
                    "user_id": user,
                    "order_type": "physical",
                    "items": [{"sku": sku, "quantity": 1}],
                    "receiver": RECEIVER,
                },
            )
    orders = [events.one(Evt.ORDER_CREATED, user_id=user) for user in users]
    # When each is paid around its deadline (0.15s before to 0.3s after: its timer fires in there)
    schedule = sorted(
        (
            (datetime.fromisoformat(o["pay_deadline"]).timestamp() + offset_ms(i) / 1000, o)
            for i, o in enumerate(orders)
        ),
        key=lambda pair: pair[0],
    )
    with system.publisher() as publisher:
        for at, order in schedule:
            time.sleep(max(0.0, at - time.time()))
            publisher.send(Cmd.PAYMENT_NOTIFY, notify_body(system, order["order_no"], order["payable"]))
    numbers = [o["order_no"] for o in orders]

    def settled() -> bool:
        return all(
            events.matching(Evt.ORDER_PAID, order_no=n) or events.matching(Evt.REFUND_REQUESTED, order_no=n)
            for n in numbers
        )

    wait_until(settled, 30, "every payment to be answered")
    # Then every order is either paid (and kept) or cancelled with its payment refunded:
    # never both, never neither
    outcomes = {"PAID": 0, "CANCELLED": 0}
    by_offset: dict[int, list[str]] = {}
    for index, order_no in enumerate(numbers):
        status = order_row(system, order_no)["status"]
        payment = system.db.one("SELECT outcome FROM payments WHERE order_no = %s", order_no)["outcome"]
        refunds = system.db.query("SELECT source FROM refunds WHERE order_no = %s", order_no)
        paid_events = events.matching(Evt.ORDER_PAID, order_no=order_no)
        cancel_events = events.matching(Evt.ORDER_CANCELLED, order_no=order_no)
        if status == "PAID":
            assert (payment, refunds, len(paid_events), cancel_events) == ("APPLIED", [], 1, []), order_no
        else:
            assert status == "CANCELLED", (order_no, status)
            assert (payment, refunds, paid_events) == ("LATE_REFUNDED", [{"source": Reason.LATE_PAYMENT}], [])
            assert len(cancel_events) == 1 and cancel_events[0].body["reason"] == Reason.PAYMENT_TIMEOUT
        outcomes[status] += 1
        by_offset.setdefault(offset_ms(index), []).append(status[0])
    print(f"race outcome: {outcomes}; by offset: {by_offset}")
    # And the stock adds up: the paid units are sold, the rest are back on sale
    counts = assert_stock_adds_up(system, sku)
    assert (counts["sold"], counts["locked"], counts["available"]) == (
        outcomes["PAID"],
        0,
        40 - outcomes["PAID"],
    )


def test_the_sweeper_cancels_an_order_whose_timer_was_lost() -> None:
    with own_system(
        CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE, ORDER_PAYMENT_TIMEOUT="4s", SWEEPER_GRACE="1s"
    ) as (system, events):
        # Given an unpaid order whose timer message waits in its delay queue
        sku = given_sku(system, events, price=1000, stock=5)
        created = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 2}])
        delay_queue = "order.timer.payment-timeout.4s"
        wait_until(lambda: queue_counts(system.amqp_url, delay_queue)[0] == 1, 10, "the timer to be queued")
        # When the delay queue is purged (the timer is lost)
        assert purge_queue(system.amqp_url, delay_queue) == 1
        # Then the sweeper cancels the order once its deadline and the grace period have passed
        cancelled = events.one(Evt.ORDER_CANCELLED, order_no=created["order_no"], timeout=20)
        assert cancelled["reason"] == Reason.PAYMENT_TIMEOUT
        row = order_row(system, created["order_no"])
        assert (row["cancelled_at"] - row["pay_deadline"]).total_seconds() >= 1
        line = system.db.one(
            "SELECT * FROM order_timeline WHERE order_no = %s AND to_status = 'CANCELLED'",
            created["order_no"],
        )
        assert line["message_id"] is None  # applied by the sweeper, not by a timer message
        # And its stock is released
        events.one(Evt.STOCK_RELEASED, order_no=created["order_no"])
        counts = assert_stock_adds_up(system, sku)
        assert (counts["available"], counts["locked"]) == (5, 0)


def test_restarting_with_another_timeout_needs_no_broker_work() -> None:
    with fresh_system() as system:
        queues = (CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE)
        system.start(*queues, env={"ORDER_PAYMENT_TIMEOUT": "2s"})
        events = EventListener(system.amqp_url).start()
        try:
            # Given an order placed under a 2s timeout, its timer published to the 2s delay queue
            sku = given_sku(system, events, price=1000, stock=5)
            first = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
            assert system.stop(TIMEOUTS_QUEUE) == {TIMEOUTS_QUEUE: 0}  # so the first timer fires while down
            wait_until(
                lambda: system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0,
                10,
                "the timer to be published",
            )
            # When the service is stopped and started again with a 3s timeout, and nothing else is done
            assert set(system.stop().values()) == {0}
            assert order_row(system, first["order_no"])["status"] == "PENDING_PAYMENT"
            system.start(*queues, env={"ORDER_PAYMENT_TIMEOUT": "3s"})
            second = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])
            # Then the new order gets the new deadline, served by a new delay queue the consumers declared
            placed = order_row(system, second["order_no"])
            assert (placed["pay_deadline"] - placed["placed_at"]).total_seconds() == 3
            assert (
                queue_info(system.vhost, "order.timer.payment-timeout.3s")["arguments"]["x-message-ttl"]
                == 3000
            )
            # And both orders are cancelled: the old queue drains into the same consumer
            for order in (first, second):
                cancelled = events.one(Evt.ORDER_CANCELLED, order_no=order["order_no"], timeout=20)
                assert cancelled["reason"] == Reason.PAYMENT_TIMEOUT
            assert queue_counts(system.amqp_url, TIMER_QUEUE_2S)[0] == 0
            counts = assert_stock_adds_up(system, sku)
            assert (counts["available"], counts["locked"]) == (5, 0)
        finally:
            events.stop()


def test_a_window_of_timers_is_cancelled_together_with_the_same_effects() -> None:
    with own_system(
        CATALOG_QUEUE, PLACEMENT_QUEUE, "order.payment", ORDER_PAYMENT_TIMEOUT="2s", SWEEPER_GRACE="60s"
    ) as (system, events):
        # Given 30 unpaid orders of two lines, some with coupons, one paid in time, while the
        # timeouts consumer is down (so their timers wait together in its queue)
        tea = given_sku(system, events, price=1500, stock=100)
        pot = given_sku(system, events, price=500, stock=100)
        orders = []
        for i in range(30):
            user = unique("user")
            code = given_coupon(system, events, user, amount=100) if i % 3 == 0 else None
            orders.append(
                place_order(
                    system,
                    events,
                    user,
                    [{"sku": tea, "quantity": 1}, {"sku": pot, "quantity": 2}],
                    coupon_code=code,
                )
            )
        paid = orders.pop()
        pay(system, paid["order_no"], paid["payable"])
        events.one(Evt.ORDER_PAID, order_no=paid["order_no"])
        wait_until(lambda: queue_counts(system.amqp_url, TIMEOUTS_QUEUE)[0] >= 30, 20, "timers to fire")
        # When the timeouts consumer starts and takes them in one window
        system.start(TIMEOUTS_QUEUE)
        # Then every unpaid order is cancelled with its stock and coupon given back, exactly once
        cancelled = events.wait_for(
            Evt.ORDER_CANCELLED,
            count=29,
            timeout=30,
            where=lambda b: b["order_no"] in {o["order_no"] for o in orders},
        )
        assert {c.body["order_no"] for c in cancelled} == {o["order_no"] for o in orders}
        assert {(c.body["status"], c.body["reason"]) for c in cancelled} == {("CANCELLED", "PAYMENT_TIMEOUT")}
        for order in orders:
            released = events.one(Evt.STOCK_RELEASED, order_no=order["order_no"])
            assert sorted((i["sku"], i["quantity"]) for i in released["items"]) == sorted(
                [(tea, 1), (pot, 2)]
            )
            assert order_row(system, order["order_no"])["status"] == "CANCELLED"
            assert len(events.matching(Evt.ORDER_CANCELLED, order_no=order["order_no"])) == 1
        with_coupon = [c.body for c in cancelled if c.body["coupon_code"]]
        assert len(with_coupon) == 10
        assert system.db.scalar("SELECT count(*) FROM coupons WHERE state = 'HELD'") == 0
        assert (
            system.db.scalar(
                "SELECT count(*) FROM order_timeline "
                "WHERE action = 'PAYMENT_TIMEOUT' AND message_id IS NOT NULL"
            )
            == 29
        )
        # And the paid order is untouched, and the stock adds up
        assert order_row(system, paid["order_no"])["status"] == "PAID"
        for sku, sold in ((tea, 1), (pot, 2)):
            counts = assert_stock_adds_up(system, sku)
            assert (counts["locked"], counts["sold"]) == (0, sold)


def test_a_timer_that_leaves_its_queue_early_is_held_until_due_even_across_a_restart() -> None:
    # TIMER_LEAD_MS: timers leave their delay queue early and wait in the timeouts consumer
    with own_system(
        CATALOG_QUEUE,
        PLACEMENT_QUEUE,
        TIMEOUTS_QUEUE,
        ORDER_PAYMENT_TIMEOUT="6s",
        TIMER_LEAD_MS="5000",
        SWEEPER_GRACE="60s",
    ) as (system, events):
        # Given an unpaid order whose timer left its delay queue about 5 s before its deadline
        sku = given_sku(system, events, price=1000, stock=5)
        order_no = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])["order_no"]
        deadline = order_row(system, order_no)["pay_deadline"]
        wait_until(
            lambda: queue_counts(system.amqp_url, "order.timer.payment-timeout.6s")[0] == 0
            and queue_counts(system.amqp_url, TIMEOUTS_QUEUE)[0] == 0,
            10,
            "the timer to reach the timeouts consumer",
        )
        # When the consumer holding it stops before the deadline
        system.stop(TIMEOUTS_QUEUE)
        # Then the order was not cancelled early and the timer is back in the queue, unapplied
        assert datetime.now(deadline.tzinfo) < deadline
        assert order_row(system, order_no)["status"] == "PENDING_PAYMENT"
        assert queue_counts(system.amqp_url, TIMEOUTS_QUEUE)[0] == 1
        assert not events.matching(Evt.ORDER_CANCELLED, order_no=order_no)
        # And a new consumer holds it again and cancels the order at its deadline, not before
        system.start(TIMEOUTS_QUEUE)
        events.one(Evt.ORDER_CANCELLED, order_no=order_no, timeout=15)
        row = order_row(system, order_no)
        assert row["status"] == "CANCELLED" and row["cancelled_at"] >= deadline
        assert (row["cancelled_at"] - deadline).total_seconds() < 2  # the timer, not the sweeper
        assert system.db.scalar(
            "SELECT message_id FROM order_timeline WHERE order_no = %s AND to_status = 'CANCELLED'",
            order_no,
        )


def test_the_timers_of_one_window_travel_as_one_message_and_keep_each_orders_correlation() -> None:
    with own_system(
        CATALOG_QUEUE, TIMEOUTS_QUEUE, "order.payment", ORDER_PAYMENT_TIMEOUT="2s", SWEEPER_GRACE="60s"
    ) as (system, events):
        # Given 20 orders sent while placement is down, so that they are placed in one window
        sku = given_sku(system, events, price=1000, stock=100)
        sent: dict[str, str] = {}  # request_id -> the command's message id (its correlation id)
        with system.publisher() as pub:
            for _ in range(20):
                request_id = unique("req")
                body = {
                    "request_id": request_id,
                    "user_id": unique("user"),
                    "order_type": "physical",
                    "items": [{"sku": sku, "quantity": 1}],
                    "receiver": RECEIVER,
                }
                sent[request_id] = pub.send(Cmd.ORDER_PLACE, body)
        system.start(PLACEMENT_QUEUE)
        created = events.wait_for(
            Evt.ORDER_CREATED, count=20, timeout=20, where=lambda b: b["request_id"] in sent
        )
        order_of = {c.body["order_no"]: c.body["request_id"] for c in created}
        # Then their payment timers are fewer messages than orders, each naming several refs
        timers = system.db.query("SELECT body FROM outbox WHERE exchange = 'order.timers'")
        refs = [ref for t in timers for ref in t["body"].get("refs", [t["body"].get("ref")])]
        assert sorted(refs) == sorted(order_of)
        assert len(timers) < 20
        # When their deadline passes
        cancelled = events.wait_for(
            Evt.ORDER_CANCELLED, count=20, timeout=20, where=lambda b: b["order_no"] in order_of
        )
        # Then each order is cancelled once, on time, with its own command's correlation id
        for event in cancelled:
            order_no = event.body["order_no"]
            assert event.properties.correlation_id == sent[order_of[order_no]]
            assert len(events.matching(Evt.ORDER_CANCELLED, order_no=order_no)) == 1
            released = events.one(Evt.STOCK_RELEASED, order_no=order_no)
            assert [(i["sku"], i["quantity"]) for i in released["items"]] == [(sku, 1)]
            row = order_row(system, order_no)
            assert row["status"] == "CANCELLED" and row["cancelled_at"] >= row["pay_deadline"]
        counts = assert_stock_adds_up(system, sku)
        assert (counts["available"], counts["locked"]) == (100, 0)


def test_a_due_timer_is_not_held_back_by_a_later_one_ahead_of_it_in_the_queue() -> None:
    # Each delay queue expires only at its head, so a timer can reach the timeouts consumer
    # behind one due later. Long timeouts here: only the two timers sent below fire.
    with own_system(
        CATALOG_QUEUE,
        PLACEMENT_QUEUE,
        TIMEOUTS_QUEUE,
        ORDER_PAYMENT_TIMEOUT="60s",
        TIMER_LEAD_MS="5000",
        SWEEPER_GRACE="60s",
    ) as (system, events):
        sku = given_sku(system, events, price=1000, stock=5)
        late, early = (
            place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])["order_no"]
            for _ in range(2)
        )
        # Given a timer due in 4 s that reached the consumer ahead of one due in 1 s (the
        # orders' own deadlines moved to match: a timer never acts before the stored deadline)
        now = datetime.now(UTC)
        late_due, early_due = now + timedelta(seconds=4), now + timedelta(seconds=1)
        for order_no, due in ((late, late_due), (early, early_due)):
            system.db.query("UPDATE orders SET pay_deadline = %s WHERE order_no = %s", due, order_no)
            system.fire_timer(Timer.PAYMENT_TIMEOUT, {"ref": order_no, "due_at": due.isoformat()})
        # Then the earlier one is applied at its due time, without waiting for the later one
        events.one(Evt.ORDER_CANCELLED, order_no=early, timeout=10)
        early_row = order_row(system, early)
        assert early_due <= early_row["cancelled_at"] < late_due
        assert order_row(system, late)["status"] == "PENDING_PAYMENT"
        # And the later one, held unacked meanwhile, at its own
        events.one(Evt.ORDER_CANCELLED, order_no=late, timeout=10)
        assert order_row(system, late)["cancelled_at"] >= late_due
        # Both were acked: a stopped consumer leaves nothing behind to be delivered again
        system.stop(TIMEOUTS_QUEUE)
        assert queue_counts(system.amqp_url, TIMEOUTS_QUEUE)[0] == 0


def test_a_forged_timer_before_the_stored_deadline_changes_nothing() -> None:
    with own_system(
        CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE, ORDER_PAYMENT_TIMEOUT="60s", SWEEPER_GRACE="60s"
    ) as (system, events):
        sku = given_sku(system, events, price=1000, stock=5)
        order_no = place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])["order_no"]
        applied_before = system.db.scalar(
            "SELECT count(*) FROM processed_messages WHERE consumer = %s", TIMEOUTS_QUEUE
        )
        # When a timer message claiming to be due now names the order (its deadline is 60 s away)
        system.fire_timer(Timer.PAYMENT_TIMEOUT, {"ref": order_no, "due_at": datetime.now(UTC).isoformat()})
        deadline = time.monotonic() + 15
        while (
            system.db.scalar("SELECT count(*) FROM processed_messages WHERE consumer = %s", TIMEOUTS_QUEUE)
            == applied_before
        ):
            assert time.monotonic() < deadline, "the forged timer was never consumed"
            time.sleep(0.1)
        # Then the order is still waiting for its payment, its stock still locked
        assert order_row(system, order_no)["status"] == "PENDING_PAYMENT"
        assert not events.matching(Evt.ORDER_CANCELLED, order_no=order_no)
