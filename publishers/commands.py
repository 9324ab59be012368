"""The command publisher that producer applications import (kombu, with publisher confirms).

    from publishers.commands import CommandPublisher

    with CommandPublisher("amqp://guest:guest@127.0.0.1:5672/%2F") as publisher:
        message_id = publisher.send("order.place", {...})

Every message carries the contract's properties: a UUID `message_id`, `correlation_id`,
`type` (the routing key), JSON content type, persistent delivery, a timestamp and the header
`x-schema-version: 1`. `send` returns once the broker has confirmed the message, retrying a
lost connection a few times first.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any

import kombu

from domain.names import COMMANDS_EXCHANGE, SCHEMA_VERSION, SCHEMA_VERSION_HEADER

RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}


class CommandPublisher:
    """Publishes commands to `order.commands`; one broker connection, reused across sends."""

    def __init__(self, amqp_url: str, app_id: str = "order-producer") -> None:
        self.connection = kombu.Connection(amqp_url, transport_options={"confirm_publish": True})
        self.exchange = kombu.Exchange(COMMANDS_EXCHANGE, type="topic", durable=True)
        self.app_id = app_id
        self._producer: kombu.Producer | None = None

    @property
    def producer(self) -> kombu.Producer:
        if self._producer is None:
            # No declaring: a least-privilege producer may only publish to order.commands.
            self._producer = kombu.Producer(self.connection, exchange=self.exchange, auto_declare=False)
        return self._producer

    def send(
        self,
        routing_key: str,
        body: dict[str, Any] | bytes | str,
        message_id: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Publish one command and wait for the broker's confirm; returns its message_id."""
        message_id = message_id or str(uuid.uuid4())
        options: dict[str, Any] = {}
        if isinstance(body, dict):
            options["serializer"] = "json"
        else:
            options.update(content_type="application/json", content_encoding="utf-8")
        self.producer.publish(
            body,
            exchange=self.exchange,
            routing_key=routing_key,
            message_id=message_id,
            correlation_id=correlation_id or message_id,
            type=routing_key,
            app_id=self.app_id,
            timestamp=int(time.time()),
            delivery_mode=2,
            headers={SCHEMA_VERSION_HEADER: SCHEMA_VERSION, **(headers or {})},
            retry=True,
            retry_policy=RETRY_POLICY,
            **options,
        )
        return message_id

    def close(self) -> None:
        self.connection.release()

    def __enter__(self) -> CommandPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
