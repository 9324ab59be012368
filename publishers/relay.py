"""The outbox relay: publishes committed outbox rows with publisher confirms, then marks them sent.

Several relays may run at once: each claims a batch with `FOR UPDATE SKIP LOCKED`, publishes
it, waits for the broker's confirms and marks the batch sent in the same transaction. A relay
killed between publishing and marking leaves the rows unsent, so they are published again:
events are delivered at least once, with the same `message_id` each time.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any

import pika
import pika.exceptions
import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from consumers.loop import connection_parameters
from domain.names import EVENTS_EXCHANGE
from settings import Settings

log = logging.getLogger("relay")

_CLAIM = text(
    "SELECT id, message_id, exchange, routing_key, correlation_id, body, headers FROM outbox "
    "WHERE sent_at IS NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
)
_MARK_SENT = text("UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = ANY(:ids)")
_MARK_FAILED = text("UPDATE outbox SET attempts = attempts + 1, last_error = :error WHERE id = ANY(:ids)")


def properties_for(row: Any) -> pika.BasicProperties:
    """Every property the contract lists for a message the service publishes."""
    return pika.BasicProperties(
        message_id=row.message_id,
        correlation_id=row.correlation_id,
        type=row.routing_key,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        timestamp=int(time.time()),
        headers=row.headers or {"x-schema-version": 1},
        app_id="order-centre",
    )


def encode(body: Any) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class OutboxRelay:
    """Moves outbox rows to the broker; woken by NOTIFY on insert, with a poll as a backstop."""

    def __init__(self, engine: Engine, settings: Settings, poll_seconds: float = 1.0) -> None:
        self.engine = engine
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.name = f"relay@{socket.gethostname()}:{os.getpid()}"

    def publish_batch(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> int:
        """Publish one batch of unsent rows and mark them; returns how many rows were handled."""
        sent: list[int] = []
        failed: list[int] = []
        errors: list[str] = []
        with self.engine.begin() as conn:
            rows = conn.execute(_CLAIM, {"n": self.settings.relay_batch}).all()
            for row in rows:
                try:
                    channel.basic_publish(
                        row.exchange, row.routing_key, encode(row.body), properties_for(row), mandatory=True
                    )
                    sent.append(row.id)
                except pika.exceptions.UnroutableError:
                    if row.exchange == EVENTS_EXCHANGE:
                        sent.append(row.id)  # accepted by the broker; nobody subscribes to this event
                    else:
                        failed.append(row.id)  # an internal route is missing: keep it for later
                        errors.append(f"unroutable: {row.exchange} {row.routing_key}")
                except pika.exceptions.NackError:
                    failed.append(row.id)
                    errors.append("nacked by the broker")
            if sent:
                conn.execute(_MARK_SENT, {"ids": sent})
            if failed:
                conn.execute(_MARK_FAILED, {"ids": failed, "error": errors[-1]})
                log.error("outbox rows not delivered", extra={"count": len(failed), "error": errors[-1]})
        return len(sent)

    def drain(self, channel: pika.adapters.blocking_connection.BlockingChannel, deadline: float) -> int:
        """Publish until nothing is left unsent (or the deadline passes)."""
        total = 0
        while time.monotonic() < deadline:
            count = self.publish_batch(channel)
            total += count
            if count < self.settings.relay_batch:
                break
        return total

    def _listener(self) -> psycopg2.extensions.connection:
        url = make_url(self.engine.url)
        conn = psycopg2.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database,
            connect_timeout=5,
            application_name="order-centre-relay-listen",
        )
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with conn.cursor() as cur:
            cur.execute("LISTEN outbox")
        return conn

    def run(self, stop: threading.Event) -> None:
        """Relay until `stop` is set, reconnecting to either side after a failure; flush on stop."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self._run_connected(stop)
                return
            except Exception as exc:  # any failure: broker or database down, drop and reconnect
                log.warning(
                    "relay lost a connection; reconnecting", extra={"error": repr(exc), "in_s": backoff}
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _run_connected(self, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(connection_parameters(self.settings, self.name))
        listener = self._listener()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            log.info("relay started")
            while not stop.is_set():
                count = self.publish_batch(channel)
                if count >= self.settings.relay_batch:
                    continue  # more is waiting
                ready, _, _ = select.select([listener], [], [], self.poll_seconds)
                if ready:
                    listener.poll()
                    listener.notifies.clear()
                connection.process_data_events(time_limit=0)  # heartbeats
            self.drain(channel, time.monotonic() + 10)
        finally:
            listener.close()
            if connection.is_open:
                connection.close()
