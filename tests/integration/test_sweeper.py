"""The backstop sweeper's events carry a correlation id (and unique message ids)."""

from __future__ import annotations

from domain.errors import Reason
from domain.names import CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE, Evt
from testing.broker import purge_queue, queue_counts
from testing.builders import given_sku, place_order
from testing.system import own_system, unique, wait_until


def test_the_events_of_a_swept_timer_carry_a_correlation_id() -> None:
    with own_system(
        CATALOG_QUEUE, PLACEMENT_QUEUE, TIMEOUTS_QUEUE, ORDER_PAYMENT_TIMEOUT="3s", SWEEPER_GRACE="1s"
    ) as (system, events):
        # Given two unpaid orders whose timer messages are lost
        sku = given_sku(system, events, price=1000, stock=5)
        orders = [
            place_order(system, events, unique("user"), [{"sku": sku, "quantity": 1}])["order_no"]
            for _ in range(2)
        ]
        delay_queue = "order.timer.payment-timeout.3s"
        wait_until(lambda: queue_counts(system.amqp_url, delay_queue)[0] >= 1, 10, "the timers to be queued")
        purge_queue(system.amqp_url, delay_queue)
        # When the sweeper cancels them
        for order_no in orders:
            events.one(Evt.ORDER_CANCELLED, order_no=order_no, timeout=20)
            events.one(Evt.STOCK_RELEASED, order_no=order_no)
        for order_no in orders:
            line = system.db.one(
                "SELECT * FROM order_timeline WHERE order_no = %s AND to_status = 'CANCELLED'", order_no
            )
            assert line["message_id"] is None  # the sweeper's doing, not a timer message's
            # Then every event it caused for the order carries the order's sweep correlation id
            cancelled = events.wait_for(Evt.ORDER_CANCELLED, order_no=order_no)[0]
            released = events.wait_for(Evt.STOCK_RELEASED, order_no=order_no)[0]
            assert cancelled.body["reason"] == Reason.PAYMENT_TIMEOUT
            expected = f"sweeper:payment-timeout:{order_no}"
            assert cancelled.properties.correlation_id == expected
            assert released.properties.correlation_id == expected
        # And each event still has a message id of its own
        swept = [e for e in events.events if (e.properties.correlation_id or "").startswith("sweeper:")]
        ids = [e.properties.message_id for e in swept]
        assert len(swept) >= 4 and all(ids) and len(set(ids)) == len(ids)
