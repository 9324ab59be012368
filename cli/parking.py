"""The parking lot from the operator's side: list what is parked, replay it once fixed.

Both take every parked message with `basic_get` without acking it, so nothing leaves the
queue unless it was replayed: a replayed copy is acked only after the broker confirmed the
republished command; everything else is nacked back (or returns when the channel closes).
At most the queue's depth at the start is taken, so a replayed command that is parked again
is not seen a second time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from cli.format import parked_summary, replay_headers, replay_target
from consumers.amqp import allow_deep_headers, connection_parameters, copy_properties, settle_parked
from domain.names import COMMANDS_EXCHANGE, PARKING_LOT_QUEUE
from settings import Settings


@dataclass
class Parked:
    """One parked message as taken from the queue (still unacked)."""

    delivery_tag: int
    delivered_key: str
    properties: pika.BasicProperties
    body: bytes

    @property
    def message_id(self) -> str | None:
        message_id: str | None = self.properties.message_id
        return message_id

    def summary(self, now: datetime) -> dict[str, Any]:
        return parked_summary(
            self.properties.message_id,
            self.properties.type,
            self.properties.timestamp,
            self.properties.headers,
            self.delivered_key,
            now,
        )


def _connect(settings: Settings) -> pika.BlockingConnection:
    allow_deep_headers()  # a parked message may carry the hostile header it was parked for
    return pika.BlockingConnection(connection_parameters(settings, "orders-cli parking-lot"))


def _take_all(channel: BlockingChannel, limit: int | None) -> list[Parked]:
    depth = channel.queue_declare(PARKING_LOT_QUEUE, passive=True).method.message_count
    wanted = depth if limit is None else min(depth, limit)
    taken: list[Parked] = []
    while len(taken) < wanted:
        method, props, body = channel.basic_get(PARKING_LOT_QUEUE, auto_ack=False)
        if method is None:
            break
        taken.append(Parked(method.delivery_tag, method.routing_key, props, body))
    return taken


def list_parked(settings: Settings, limit: int | None = None) -> list[dict[str, Any]]:
    """What is parked and why, oldest first; the messages stay in the parking lot."""
    connection = _connect(settings)
    try:
        now = datetime.now(UTC)
        return [p.summary(now) for p in _take_all(connection.channel(), limit)]
    finally:
        connection.close()  # every unacked message goes back to the queue


def replay(settings: Settings, message_ids: Collection[str] | None) -> list[dict[str, Any]]:
    """Send parked commands (those ids, or all with None) back through order.commands, with the
    routing key the service recorded when it parked them (never where a header points).

    Returns one entry per replayed (or failed) message with where it went.
    """
    connection = _connect(settings)
    try:
        channel = connection.channel()
        publisher = connection.channel()
        publisher.confirm_delivery()
        now = datetime.now(UTC)
        results: list[dict[str, Any]] = []
        for parked in _take_all(channel, None):
            if message_ids is not None and parked.message_id not in message_ids:
                settle_parked(channel, parked.delivery_tag, replayed=False)
                continue
            props = parked.properties
            _, routing_key = replay_target(props.headers, props.type, parked.delivered_key)
            entry = {**parked.summary(now), "exchange": COMMANDS_EXCHANGE, "routing_key": routing_key}
            try:
                publisher.basic_publish(
                    COMMANDS_EXCHANGE,  # only ever order.commands (contract v1.1)
                    routing_key,
                    parked.body,
                    properties=copy_properties(props, replay_headers(props.headers)),
                    mandatory=True,
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                settle_parked(channel, parked.delivery_tag, replayed=False)
                results.append({**entry, "replayed": False, "error": type(exc).__name__})
                continue
            settle_parked(channel, parked.delivery_tag, replayed=True)  # the broker holds the new copy
            results.append({**entry, "replayed": True, "error": None})
        return results
    finally:
        if connection.is_open:
            connection.close()
