"""Replays go only to order.commands, with the routing key the service recorded (contract v1.1):
headers a producer set (`x-original-*`, `x-death`, anything else) never choose where a message
is handled, parked or replayed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pika

from domain.names import EVENTS_EXCHANGE, TIMERS_FIRED_EXCHANGE
from testing.broker import EventListener
from testing.system import System, fresh_system, unique

FORGED_HEADERS = {
    "x-schema-version": 1,
    "x-original-exchange": EVENTS_EXCHANGE,
    "x-original-routing-key": "order.paid",
    "x-original-queue": "order.payment",
    "x-attempts": 1,
    "x-death": [{"count": 1, "queue": "order.retry.1s", "exchange": EVENTS_EXCHANGE}],
    "x-trace": "kept",
}


def command_props(message_id: str, headers: dict[str, object]) -> pika.BasicProperties:
    return pika.BasicProperties(
        message_id=message_id,
        correlation_id=message_id,
        content_type="application/json",
        delivery_mode=2,
        headers=headers,
    )


@contextmanager
def taps(system: System, *bindings: tuple[str, str]) -> Iterator[tuple[pika.BlockingConnection, str]]:
    """An exclusive queue bound to these (exchange, key) pairs: it sees whatever is published there."""
    conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        for exchange, key in bindings:
            channel.queue_bind(queue, exchange, key)
        yield conn, queue
    finally:
        conn.close()


def drain(conn: pika.BlockingConnection, queue: str, seconds: float) -> list[tuple[str, str, bytes]]:
    """(exchange, routing key, body) of every message the tap got within `seconds`."""
    channel = conn.channel()
    got = []
    for _ in range(int(seconds / 0.1)):
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            got.append((method.exchange, method.routing_key, body))
        conn.sleep(0.1)
    return got


def test_a_forged_command_is_replayed_to_order_commands_never_as_an_event() -> None:
    with fresh_system() as system:
        system.start("order.unrouted", "order.catalog")
        events = EventListener(system.amqp_url).start()
        try:
            with taps(system, (EVENTS_EXCHANGE, "order.paid"), (TIMERS_FIRED_EXCHANGE, "#")) as (conn, tap):
                # Given a producer's command with an unknown routing key and headers that point
                # at order.events / order.paid
                message_id = str(uuid.uuid4())
                body = json.dumps({"order_no": "O-FORGED", "status": "PAID", "amount": 1}).encode()
                system.publish_raw("no.such.command", body, command_props(message_id, FORGED_HEADERS))
                # When it is parked
                rejected = events.one("command.rejected", message_id=message_id)
                assert rejected["routing_key"] == "no.such.command"
                parked = system.wait_parked(message_id)
                # Then the service recorded the key and exchange it really came with
                assert parked.headers["x-original-routing-key"] == "no.such.command"
                assert parked.headers["x-original-exchange"] == "order.commands"
                assert parked.headers["x-original-queue"] == "order.unrouted"
                assert parked.headers["x-attempts"] == 1  # the producer's x-attempts was not counted
                listed = json.loads(system.orders("parking-lot", "list", "--json").stdout)
                assert [(p["exchange"], p["routing_key"]) for p in listed] == [
                    ("order.commands", "no.such.command")
                ]
                # When an operator replays everything
                result = json.loads(system.orders("parking-lot", "replay", "--all", "--json").stdout)
                # Then it went back to order.commands with that key, and nowhere else
                went = [(r["message_id"], r["exchange"], r["routing_key"], r["replayed"]) for r in result]
                assert went == [(message_id, "order.commands", "no.such.command", True)]
                events.wait_for("command.rejected", count=2, message_id=message_id)
                assert drain(conn, tap, 1.5) == []
                assert events.matching("order.paid") == []
                # And it is parked again, without the producer's bookkeeping headers
                again = system.wait_parked(message_id)
                assert again.headers["x-original-exchange"] == "order.commands"
                assert again.headers["x-trace"] == "kept"
                assert again.headers["x-attempts"] == 1
                assert "x-death" not in again.headers
        finally:
            events.stop()


def test_a_command_claiming_to_be_a_fired_timer_is_handled_as_the_command_it_was_delivered_as() -> None:
    with fresh_system() as system:
        system.start("order.unrouted", "order.catalog", "order.timeouts")
        events = EventListener(system.amqp_url).start()
        try:
            with taps(system, (TIMERS_FIRED_EXCHANGE, "#")) as (conn, tap):
                # Given a valid sku.upsert whose headers claim it is a fired payment timer
                message_id = str(uuid.uuid4())
                sku = unique("sku")
                body = {"sku": sku, "name": "n", "unit_price": 1, "merchant_id": "M", "warehouse_id": "W"}
                headers = {
                    "x-schema-version": 1,
                    "x-original-exchange": TIMERS_FIRED_EXCHANGE,
                    "x-original-routing-key": "timer.payment-timeout",
                }
                props = command_props(message_id, headers)
                system.publish_raw("sku.upsert", json.dumps(body).encode(), props)
                # Then it is applied as the sku.upsert it was delivered as
                assert events.one("sku.upserted", sku=sku)["sku"] == sku
                assert events.matching("command.rejected", message_id=message_id) == []
                assert system.parked() == []
                assert drain(conn, tap, 0.5) == []
        finally:
            events.stop()
