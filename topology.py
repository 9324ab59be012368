"""Declare every exchange, queue and binding of the service, idempotently.

Run `python topology.py` (twice changes nothing). A queue that already exists with other
arguments is left as it is (never deleted) and reported. Delay queues are named after their
duration (`order.timer.payment-timeout.15m`), so a new timeout gets a new queue and the old one
drains into the same consumer.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

import logs
from consumers.registry import consumer_specs, timer_kinds
from domain import names as n
from domain.names import Timer
from settings import Settings, format_duration, load_settings

log = logging.getLogger("topology")


@dataclass(frozen=True)
class QueueDecl:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[tuple[str, str, dict[str, Any]], ...]
    queues: tuple[QueueDecl, ...]


def timer_durations(settings: Settings) -> dict[str, timedelta]:
    """The delay of each timer kind under the current settings (from the composition root)."""
    return {kind.kind: kind.delay for kind in timer_kinds(settings)}


def delay_queue_name(kind: str, delay: timedelta) -> str:
    return f"{n.TIMER_QUEUE_PREFIX}{kind}.{format_duration(delay)}"


def _ms(delay: timedelta) -> int:
    return round(delay.total_seconds() * 1000)


# Delay queues are quorum queues so that dead-lettering is at-least-once: an expired message
# stays in its queue until the target queue has confirmed it.
_SAFE_DEAD_LETTERING = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def build(settings: Settings, consumer_bindings: dict[str, tuple[tuple[str, str], ...]]) -> Topology:
    """The whole topology for these settings and consumers (pure: no I/O)."""
    exchanges: tuple[tuple[str, str, dict[str, Any]], ...] = (
        (n.UNROUTED_EXCHANGE, "fanout", {}),
        (n.COMMANDS_EXCHANGE, "topic", {"alternate-exchange": n.UNROUTED_EXCHANGE}),
        (n.EVENTS_EXCHANGE, "topic", {}),
        (n.TIMERS_EXCHANGE, "direct", {}),
        (n.TIMERS_FIRED_EXCHANGE, "topic", {}),
        (n.RETRY_EXCHANGE, "topic", {}),
        (n.RETRY_RETURN_EXCHANGE, "topic", {}),
    )
    consumer_args = {"x-queue-type": settings.queue_type}
    queues = [
        QueueDecl(
            name,
            consumer_args,
            (*bindings, (n.RETRY_RETURN_EXCHANGE, f"*.{name}")),
        )
        for name, bindings in consumer_bindings.items()
    ]
    queues.append(QueueDecl(n.PARKING_LOT_QUEUE, {"x-queue-type": settings.queue_type}))
    for step in settings.retry_steps:
        label = format_duration(step)
        queues.append(
            QueueDecl(
                f"{n.RETRY_QUEUE_PREFIX}{label}",
                {
                    **_SAFE_DEAD_LETTERING,
                    "x-message-ttl": _ms(step),
                    "x-dead-letter-exchange": n.RETRY_RETURN_EXCHANGE,
                },
                ((n.RETRY_EXCHANGE, f"{label}.#"),),
            )
        )
    for kind, delay in timer_durations(settings).items():
        queues.append(
            QueueDecl(
                delay_queue_name(kind, delay),
                {
                    **_SAFE_DEAD_LETTERING,
                    "x-message-ttl": _ms(delay),
                    "x-dead-letter-exchange": n.TIMERS_FIRED_EXCHANGE,
                    "x-dead-letter-routing-key": Timer.fired_key(kind),
                },
                ((n.TIMERS_EXCHANGE, f"{kind}.{format_duration(delay)}"),),
            )
        )
    return Topology(exchanges, tuple(queues))


def declare(connection: pika.BlockingConnection, topology: Topology) -> list[str]:
    """Declare everything; returns warnings for queues kept with arguments other than ours."""
    warnings: list[str] = []
    channel = connection.channel()
    for name, kind, arguments in topology.exchanges:
        channel.exchange_declare(name, kind, durable=True, arguments=arguments or None)
    for queue in topology.queues:
        try:
            channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            # Exists with other arguments: keep it (it may hold messages) and say so.
            warnings.append(
                f"queue {queue.name} exists with other arguments; left unchanged: {exc.reply_text}"
            )
            channel = connection.channel()
        for exchange, key in queue.bindings:
            channel.queue_bind(queue.name, exchange, routing_key=key)
    if channel.is_open:
        channel.close()
    for warning in warnings:
        log.warning(warning)
    return warnings


def declarer(settings: Settings) -> Any:
    """A function that declares the topology on an open channel's connection (used by consumers)."""
    topology = build(settings, {q: s.bindings for q, s in consumer_specs(settings).items()})

    def declare_on(channel: BlockingChannel) -> None:
        declare(channel.connection, topology)

    return declare_on


def queue_names(topology: Topology) -> Iterable[str]:
    return (q.name for q in topology.queues)


# Least privilege (regular expressions over exchange and queue names in the vhost).
# The producer may publish to order.commands (and its alternate exchange, which RabbitMQ checks
# for unroutable commands) and nothing else: it declares nothing and reads nothing.
PRODUCER_PERMISSIONS = {
    "configure": "^$",
    "write": r"^order\.commands(\.unrouted)?$",
    "read": "^$",
}
# The service declares, binds, consumes and publishes only its own order.* resources, plus the
# default exchange (amq.default) it parks messages through.
SERVICE_PERMISSIONS = {
    "configure": r"^order\..*",
    "write": r"^(order\..*|amq\.default)$",
    "read": r"^order\..*",
}


def management_call(api: str, user: str, password: str, method: str, path: str, body: Any = None) -> None:
    """One call to the RabbitMQ management HTTP API (admin credentials)."""
    request = urllib.request.Request(
        f"{api.rstrip('/')}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
    )
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10):
        pass


def create_users(settings: Settings, producer: str, service: str) -> str:
    """Create the vhost of AMQP_URL and its `producer` and `service` users; returns the vhost.

    Passwords come from PRODUCER_PASSWORD and SERVICE_PASSWORD (never printed); the admin
    credentials from RABBITMQ_ADMIN_USER/RABBITMQ_ADMIN_PASSWORD and the API address from
    RABBITMQ_API (default http://127.0.0.1:15672/api).
    """
    missing = [name for name in ("PRODUCER_PASSWORD", "SERVICE_PASSWORD") if not os.environ.get(name)]
    if missing:
        raise SystemExit(f"set {' and '.join(missing)} to create the users")
    api = os.environ.get("RABBITMQ_API", "http://127.0.0.1:15672/api")
    admin = (
        os.environ.get("RABBITMQ_ADMIN_USER", "guest"),
        os.environ.get("RABBITMQ_ADMIN_PASSWORD", "guest"),
    )
    vhost: str = pika.URLParameters(settings.amqp_url).virtual_host
    quoted = urllib.parse.quote(vhost, safe="")
    management_call(api, *admin, "PUT", f"/vhosts/{quoted}", {})
    for user, password_env, permissions in (
        (producer, "PRODUCER_PASSWORD", PRODUCER_PERMISSIONS),
        (service, "SERVICE_PASSWORD", SERVICE_PERMISSIONS),
    ):
        user_path = urllib.parse.quote(user, safe="")
        management_call(
            api, *admin, "PUT", f"/users/{user_path}", {"password": os.environ[password_env], "tags": ""}
        )
        management_call(api, *admin, "PUT", f"/permissions/{quoted}/{user_path}", permissions)
    return vhost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--users",
        action="store_true",
        help="also create the vhost and its least-privilege producer and service users",
    )
    parser.add_argument("--producer-user", default="producer")
    parser.add_argument("--service-user", default="service")
    args = parser.parse_args(argv)
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    if args.users:
        vhost = create_users(settings, args.producer_user, args.service_user)
        print(
            f"vhost {vhost!r}: users {args.producer_user!r} (may only publish commands) and "
            f"{args.service_user!r} (the consumers' own resources)"
        )
    topology = build(settings, {q: s.bindings for q, s in consumer_specs(settings).items()})
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        warnings = declare(connection, topology)
    finally:
        connection.close()
    print(
        f"declared {len(topology.exchanges)} exchanges and {len(topology.queues)} queues"
        + (f" ({len(warnings)} kept as they were)" if warnings else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
