"""The broker side shared by the consumer, the relay and the CLI: connection parameters, and
copies of a delivered message sent to a retry queue or the parking lot (with the service's
bookkeeping headers)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from consumers import wire
from consumers.delivery import SERVICE_HEADERS, Delivery
from consumers.outcomes import Park, Retry
from domain import names as n
from settings import Settings, format_duration

log = logging.getLogger("consumer")

# Headers the service itself writes on a retried or parked copy.
SERVICE_WRITTEN = SERVICE_HEADERS | {n.PARKING_REASON_HEADER, n.PARKING_CODE_HEADER, n.PARKED_AT_HEADER}


# pika decodes a header table with two Python frames per level: a table nested as deep as a
# 128 KiB frame allows (about 18,000 levels) must not stop a consumer, or the CLI reading the
# parking lot, with a RecursionError. Python-to-Python calls take no C stack in 3.11, and the
# JSON parser is guarded by a depth pre-scan (consumers/wire.py).
HEADER_DECODE_RECURSION = 50_000


def allow_deep_headers() -> None:
    """Raise this process's recursion limit so that any header a frame can carry decodes."""
    if sys.getrecursionlimit() < HEADER_DECODE_RECURSION:
        sys.setrecursionlimit(HEADER_DECODE_RECURSION)


def connection_parameters(settings: Settings, name: str) -> pika.URLParameters:
    """Broker parameters with heartbeats (a dead peer is noticed in seconds) and a readable name."""
    params = pika.URLParameters(settings.amqp_url)
    params.heartbeat = settings.heartbeat
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.client_properties = {"connection_name": name}
    return params


def copy_properties(props: pika.BasicProperties, headers: dict[str, Any]) -> pika.BasicProperties:
    """The message's properties with new headers; persistent; no user_id (the broker checks it)."""
    return pika.BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.type,
        app_id=props.app_id,
    )


def settle_parked(channel: BlockingChannel, delivery_tag: int, replayed: bool) -> None:
    """A parked message taken for a replay: acked once its new copy is confirmed, else put back."""
    if replayed:
        channel.basic_ack(delivery_tag)
    else:
        channel.basic_nack(delivery_tag, requeue=True)


def parked_headers(delivery: Delivery, queue: str, code: str, reason: str) -> dict[str, Any]:
    """The parked copy's headers: the message's own, and the service's record of why and where.

    The routing key recorded here is the one the service saw the message delivered with
    (`make_delivery`: never a producer's x-original-* header), and it is the only key a replay
    uses (`cli.format.replay_target`); replays always go to order.commands.
    """
    return copy_headers(
        delivery,
        queue,
        {
            n.PARKING_REASON_HEADER: reason[:2000],
            n.PARKING_CODE_HEADER: code,
            n.PARKED_AT_HEADER: datetime.now(UTC).isoformat(),
        },
    )


def copy_headers(delivery: Delivery, queue: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A retried or parked copy's headers: the message's own, where it was first delivered, one
    more attempt, and `extra`."""
    headers = delivery.headers
    headers.update(
        {
            n.ORIGINAL_ROUTING_KEY_HEADER: delivery.routing_key,
            n.ORIGINAL_EXCHANGE_HEADER: delivery.exchange,
            n.ORIGINAL_QUEUE_HEADER: queue,
            n.ATTEMPTS_HEADER: delivery.attempts + 1,
            **extra,
        }
    )
    return headers


def publish_parked(publisher: BlockingChannel, delivery: Delivery, queue: str, outcome: Park) -> None:
    """A copy of a message of `queue` to the parking lot, saying why it was parked."""
    headers = parked_headers(delivery, queue, outcome.code, outcome.reason)
    publish_copy(publisher, "", n.PARKING_LOT_QUEUE, delivery, headers)


def publish_retry(
    publisher: BlockingChannel,
    delivery: Delivery,
    queue: str,
    outcome: Retry,
    retry_steps: Sequence[timedelta],
) -> None:
    """A copy of a message of `queue` to the retry queue of its next step (the last one, again
    and again, should attempts outnumber the steps)."""
    step = retry_steps[min(delivery.attempts, len(retry_steps) - 1)]
    headers = copy_headers(delivery, queue, {n.LAST_ERROR_HEADER: outcome.error[:1000]})
    publish_copy(publisher, n.RETRY_EXCHANGE, f"{format_duration(step)}.{queue}", delivery, headers)


def publish_copy(
    publisher: BlockingChannel,
    exchange: str,
    routing_key: str,
    delivery: Delivery,
    headers: dict[str, Any],
) -> None:
    """Republish the message as delivered (confirmed, mandatory) with these headers.

    A header the broker delivered that pika cannot encode again is dropped (named in
    x-dropped-headers), never the message: a parked or retried copy must always go out.
    """

    def publish(with_headers: dict[str, Any]) -> None:
        publisher.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=delivery.body,
            properties=copy_properties(delivery.properties, with_headers),
            mandatory=True,
        )

    try:
        publish(headers)
    except (pika.exceptions.UnsupportedAMQPFieldException, ValueError, TypeError, OverflowError) as exc:
        theirs = set(delivery.headers) - SERVICE_WRITTEN
        log.warning("headers dropped from a republished copy", extra={"error": repr(exc)})
        kept = {key: value for key, value in headers.items() if key not in theirs}
        kept[n.DROPPED_HEADERS_HEADER] = wire.printable(", ".join(sorted(map(str, theirs))), 1000)
        publish(kept)
