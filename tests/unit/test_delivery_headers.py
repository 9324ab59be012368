"""make_delivery: x-original-* headers count only on deliveries back from the retry queues."""

from __future__ import annotations

from types import SimpleNamespace

import pika

from consumers.amqp import parked_headers
from consumers.delivery import make_delivery
from domain import names as n

FORGED = {
    "x-schema-version": 1,
    "x-original-routing-key": "timer.payment-timeout",
    "x-original-exchange": "order.timers.fired",
    "x-original-queue": "order.timeouts",
    "x-attempts": 99,
    "x-last-error": "forged",
    "x-trace": "kept",
}


def method(exchange: str, routing_key: str) -> SimpleNamespace:
    return SimpleNamespace(delivery_tag=1, exchange=exchange, routing_key=routing_key, redelivered=False)


def test_a_producers_original_headers_choose_nothing() -> None:
    props = pika.BasicProperties(message_id="m1", headers=dict(FORGED))
    delivery = make_delivery(method(n.COMMANDS_EXCHANGE, "order.cancel"), props, b"{}")
    assert (delivery.exchange, delivery.routing_key) == ("order.commands", "order.cancel")
    assert delivery.attempts == 0
    assert delivery.headers == {"x-schema-version": 1, "x-trace": "kept"}
    parked = parked_headers(delivery, "order.payment", "C", "r")
    assert parked[n.ORIGINAL_ROUTING_KEY_HEADER] == "order.cancel"
    assert parked[n.ORIGINAL_EXCHANGE_HEADER] == "order.commands"
    assert parked[n.ORIGINAL_QUEUE_HEADER] == "order.payment"
    assert parked[n.ATTEMPTS_HEADER] == 1
    assert "x-last-error" not in parked


def test_a_timer_keeps_the_key_it_was_dead_lettered_with() -> None:
    props = pika.BasicProperties(message_id="m1", headers=dict(FORGED))
    delivery = make_delivery(method(n.TIMERS_FIRED_EXCHANGE, "timer.auto-confirm"), props, b"{}")
    assert (delivery.exchange, delivery.routing_key) == ("order.timers.fired", "timer.auto-confirm")


def test_a_message_back_from_a_retry_queue_keeps_what_the_service_recorded() -> None:
    headers = {
        "x-original-routing-key": "stock.restock",
        "x-original-exchange": "order.commands",
        "x-original-queue": "order.catalog",
        "x-attempts": 2,
    }
    props = pika.BasicProperties(message_id="m1", headers=headers)
    delivery = make_delivery(method(n.RETRY_RETURN_EXCHANGE, "1s.order.catalog"), props, b"{}")
    assert (delivery.exchange, delivery.routing_key) == ("order.commands", "stock.restock")
    assert delivery.attempts == 2
