"""A delivery as the service sees it, and everything decided about it before any I/O.

Pure: reading the service's own headers (`make_delivery`), picking the due deliveries of the
buffer (`due_window`), how to ack a window (`ack_plan`) and checking a delivery against the
contract (`validate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pika
from pydantic import ValidationError

from consumers import wire
from consumers.schemas import Command, describe_errors
from domain import names as n
from domain.errors import RejectCode


@dataclass
class Delivery:
    """A message as delivered, with the routing key and exchange it originally had."""

    tag: int
    routing_key: str
    exchange: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool = False
    due: datetime | None = None  # not to be applied before this (ConsumerSpec.due_at)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def attempts(self) -> int:
        value = self.headers.get(n.ATTEMPTS_HEADER, 0)
        return value if isinstance(value, int) else 0

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id or None


@dataclass
class Parsed:
    delivery: Delivery
    command: Command | None = None
    raw: dict[str, Any] | None = None
    rejection: tuple[str, str] | None = None  # (code, readable reason)


def _from_retry(method_exchange: str) -> bool:
    """Whether a delivery came back through the service's own retry queues.

    Only those carry x-original-* headers the service wrote itself (`amqp.publish_retry`
    overwrites them before the retry queue dead-letters the message to RETRY_RETURN_EXCHANGE).
    On any other delivery the headers are the producer's, and a producer never chooses the
    routing key or exchange a command is handled (or parked, or replayed) under.
    """
    return method_exchange == n.RETRY_RETURN_EXCHANGE


def _original_routing_key(method_exchange: str, method_key: str, headers: Mapping[str, Any]) -> str:
    """The routing key the message was first delivered with: the delivery's own key, or for a
    message back from a retry queue, the key the service recorded when it sent it there."""
    value = headers.get(n.ORIGINAL_ROUTING_KEY_HEADER)
    return value if _from_retry(method_exchange) and isinstance(value, str) else method_key


def _original_exchange(method_exchange: str, headers: Mapping[str, Any]) -> str:
    """The exchange the message was first delivered from (as for `_original_routing_key`)."""
    value = headers.get(n.ORIGINAL_EXCHANGE_HEADER)
    return value if _from_retry(method_exchange) and isinstance(value, str) else method_exchange


# Bookkeeping headers only the service writes (on its way to a retry queue or the parking lot).
SERVICE_HEADERS = frozenset(
    {
        n.ORIGINAL_ROUTING_KEY_HEADER,
        n.ORIGINAL_EXCHANGE_HEADER,
        n.ORIGINAL_QUEUE_HEADER,
        n.ATTEMPTS_HEADER,
        n.LAST_ERROR_HEADER,
    }
)


def make_delivery(method: Any, properties: pika.BasicProperties, body: bytes) -> Delivery:
    headers = properties.headers or {}
    if not _from_retry(method.exchange) and not SERVICE_HEADERS.isdisjoint(headers):
        # A producer's copy of the service's bookkeeping means nothing (a forged x-attempts
        # would skip retries, a forged x-original-* would be kept on a retried or parked copy).
        headers = {key: value for key, value in headers.items() if key not in SERVICE_HEADERS}
        properties.headers = headers
    return Delivery(
        tag=method.delivery_tag,
        routing_key=_original_routing_key(method.exchange, method.routing_key, headers),
        exchange=_original_exchange(method.exchange, headers),
        properties=properties,
        body=body,
        redelivered=bool(method.redelivered),
    )


def due_window(buffer: Sequence[Delivery], now: datetime, limit: int) -> tuple[list[int], float | None]:
    """The positions in `buffer` of the deliveries that are due (at most `limit`, in buffer
    order), and, when none is, the seconds until the first one will be.

    Timers reach the buffer roughly in due order, but not exactly: each delay queue expires
    only at its head, so a timer due a little earlier can arrive behind a later one. Every due
    delivery is taken, wherever it is, so that none waits for a later one (see `ack_plan`).
    """
    picked: list[int] = []
    next_due: datetime | None = None
    for position, delivery in enumerate(buffer):
        if len(picked) == limit:
            break
        if delivery.due is None or delivery.due <= now:
            picked.append(position)
        elif next_due is None or delivery.due < next_due:
            next_due = delivery.due
    if picked or next_due is None:
        return picked, None
    return [], (next_due - now).total_seconds()


def ack_plan(window_tags: Sequence[int], first_held: int | None) -> tuple[int | None, list[int]]:
    """How to ack a window while deliveries from tag `first_held` on stay in the buffer, unacked.

    One `basic_ack(multiple=True)` settles every window tag below the first held delivery
    (the others before it were acked with earlier windows); each window tag after it is acked
    alone, so that the held deliveries stay unacked. Returns (multiple-ack tag or None, singles).
    """
    below = [tag for tag in window_tags if first_held is None or tag < first_held]
    singles = [tag for tag in window_tags if first_held is not None and tag > first_held]
    return (max(below) if below else None), singles


class Routed(Protocol):
    """What validation needs of a route (consumers.routes.Route): the schema of its commands."""

    @property
    def schema(self) -> type[Command]: ...


def _message_id_problem(delivery: Delivery) -> wire.Problem | None:
    if not delivery.message_id:
        return RejectCode.MISSING_MESSAGE_ID, "the message has no message_id property"
    return None


def _wire_problem(delivery: Delivery) -> wire.Problem | None:
    """The wire limits on the properties, the headers, the routing key and the exchange."""
    return (
        wire.properties_problem(delivery.properties)
        or wire.check_text(delivery.routing_key, "routing key")
        or wire.check_text(delivery.exchange, "exchange")
    )


def _size_problem(delivery: Delivery) -> wire.Problem | None:
    if len(delivery.body) > n.MAX_BODY_BYTES:
        return (
            RejectCode.BODY_TOO_LARGE,
            f"body is {len(delivery.body)} bytes, over the limit of {n.MAX_BODY_BYTES}",
        )
    return None


def _content_type_problem(delivery: Delivery) -> wire.Problem | None:
    content_type = delivery.properties.content_type
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        return (
            RejectCode.UNSUPPORTED_CONTENT_TYPE,
            f"content_type {content_type!r} is not application/json",
        )
    return None


def _schema_version_problem(delivery: Delivery) -> wire.Problem | None:
    version = delivery.headers.get(n.SCHEMA_VERSION_HEADER, n.SCHEMA_VERSION)
    if type(version) is not int or version != n.SCHEMA_VERSION:
        return (
            RejectCode.UNSUPPORTED_SCHEMA_VERSION,
            f"{n.SCHEMA_VERSION_HEADER} is {wire.printable(repr(version), 80)}; "
            f"only {n.SCHEMA_VERSION} is supported",
        )
    return None


# What is checked of a delivery before its routing key and body, in order of precedence.
_ENVELOPE_CHECKS: tuple[Callable[[Delivery], wire.Problem | None], ...] = (
    _message_id_problem,
    _wire_problem,
    _size_problem,
    _content_type_problem,
    _schema_version_problem,
)


def _envelope_problem(delivery: Delivery) -> wire.Problem | None:
    """The first problem `_ENVELOPE_CHECKS` find, if any."""
    for check in _ENVELOPE_CHECKS:
        problem = check(delivery)
        if problem:
            return problem
    return None


def _object_body(body: bytes) -> tuple[dict[str, Any] | None, wire.Problem | None]:
    """The body as a JSON object within the wire limits, or the problem with it."""
    raw, problem = wire.parse_body(body)
    if problem:
        return None, problem
    if not isinstance(raw, dict):
        return None, (RejectCode.INVALID_JSON, f"body is JSON {type(raw).__name__}, not an object")
    return raw, None


def _command(
    route: Routed, routing_key: str, raw: dict[str, Any]
) -> tuple[Command | None, wire.Problem | None]:
    """The command `raw` is by the route's schema, or the problem with it."""
    try:
        return route.schema.model_validate(raw), None
    except ValidationError as exc:
        return None, (RejectCode.SCHEMA_INVALID, f"{routing_key}: {describe_errors(exc)}")


def validate(delivery: Delivery, routes: Mapping[str, Routed]) -> Parsed:
    """Check a delivery against the contract; a failure carries a code and a readable reason.

    Everything here comes before any database work: the wire limits (consumers/wire.py:
    control characters, nesting, message ids) included, so that nothing PostgreSQL would
    refuse reaches it. Hostile text quoted in a reason is escaped. The checks, in order of
    precedence: `_ENVELOPE_CHECKS`, the routing key, the body (`_object_body`), the schema.
    """
    problem = _envelope_problem(delivery)
    if problem:
        return Parsed(delivery, rejection=problem)
    route = routes.get(delivery.routing_key)
    if route is None:
        reason = f"no command is named {delivery.routing_key!r}"
        return Parsed(delivery, rejection=(RejectCode.UNKNOWN_ROUTING_KEY, reason))
    raw, problem = _object_body(delivery.body)
    if raw is None:
        return Parsed(delivery, rejection=problem)
    command, problem = _command(route, delivery.routing_key, raw)
    if command is None:
        return Parsed(delivery, rejection=problem)
    return Parsed(delivery, command=command, raw=raw)
