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
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

import metrics
from consumers.amqp import connection_parameters
from consumers.events import EVENTS
from domain.names import EVENTS_EXCHANGE, TIMERS_EXCHANGE
from settings import Settings

log = logging.getLogger("relay")

# Timers are published by one relay at a time (whichever holds this transaction-scoped advisory
# lock), so they reach their delay queue in due order: a queue expires messages only at its head,
# and a timer queued behind a later one would wait for it. Several relays publishing batches of
# timers at once interleave them (a batch spans a few hundred ms of deadlines at full speed).
TIMER_PUBLISHING_LOCK = 0x0DE1A7  # any constant the service uses for nothing else
_CLAIM = text(
    "SELECT id, message_id, exchange, routing_key, correlation_id, headers, "
    # The body goes out as PostgreSQL stores it: no decoding and encoding again per row.
    "body::text AS body, body->>'due_at' AS due_at FROM outbox "
    "WHERE sent_at IS NULL AND (attempts = 0 OR :include_failed) "
    "AND (exchange <> :timers OR pg_try_advisory_xact_lock(:timer_lock)) "
    "ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
)
_NO_BITMAP_SCAN = text("SET LOCAL enable_bitmapscan = off")
# A relay wakes for another process's commit only when it inserted at least this many rows:
# a burst worth sharing. Smaller ones are left to the writer's own relay (see `wakes`).
HELP_THRESHOLD = 50
RELAYED_WRITER_PREFIX = "order-centre relayed "


def relayed_writer(pid: int) -> str:
    """The application_name of a consumer process whose own relay publishes what it writes."""
    return f"{RELAYED_WRITER_PREFIX}{pid}"


def wakes(payload: str, own_writer: str | None) -> bool:
    """Whether an outbox NOTIFY (payload `<application_name> <rows>`) is this relay's to act on.

    Its own process's inserts, bursts of HELP_THRESHOLD rows or more, and inserts by writers
    without a relay of their own (the CLI, another tool, an older trigger's empty payload) wake
    it; another relayed process's small insert does not, so a commit wakes one relay instead
    of every consumer process's. The poll is the backstop either way.
    """
    writer, _, rows = payload.rpartition(" ")
    if own_writer is None or writer == own_writer:
        return True
    if not writer.startswith(RELAYED_WRITER_PREFIX) or not rows.isdigit():
        return True
    return int(rows) >= HELP_THRESHOLD


# Rows the broker refused are tried again this often, after the fresh ones, so they never block them.
FAILED_RETRY_SECONDS = 10.0
CONFIRM_TIMEOUT_SECONDS = 30.0
_MARK_SENT = text("UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = ANY(:ids)")
_MARK_FAILED = text("UPDATE outbox SET attempts = attempts + 1, last_error = :error WHERE id = ANY(:ids)")


def properties_for(
    row: Any, now: datetime | None = None, lead: timedelta = timedelta(0)
) -> pika.BasicProperties:
    """Every property the contract lists for a message the service publishes.

    A timer also gets a per-message expiration of what is left until its due time, less the
    lead (`TIMER_LEAD_MS`: the timeouts consumer holds an early timer until it is due): its
    delay queue's TTL is the full timeout, so without it the relay's lag would be added to
    every deadline. Timers of one delay queue are published in due-time order, so none waits
    behind a later one at the head of the queue.
    """
    now = now or datetime.now(UTC)
    expiration = None
    if row.exchange == TIMERS_EXCHANGE and row.due_at:
        left = datetime.fromisoformat(row.due_at) - lead - now
        expiration = str(max(0, int(left.total_seconds() * 1000)))
    return pika.BasicProperties(
        message_id=row.message_id,
        correlation_id=row.correlation_id,
        type=row.routing_key,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        timestamp=int(now.timestamp()),
        headers=row.headers or {"x-schema-version": 1},
        app_id="order-centre",
        expiration=expiration,
    )


def publishing_order(rows: Sequence[Any]) -> list[Any]:
    """Events in outbox order; timers by due time, so a delay queue's head is its earliest timer.

    Windows of several consumers commit in any order, so outbox ids do not follow due times.
    """
    events = [row for row in rows if row.exchange != TIMERS_EXCHANGE]
    timers = [row for row in rows if row.exchange == TIMERS_EXCHANGE]
    timers.sort(key=lambda row: (row.due_at or "", row.id))
    return events + timers


class ConfirmedPublisher:
    """A channel in confirm mode with many confirms outstanding.

    pika's BlockingChannel in confirm mode waits for each message's confirm (about a thousand
    messages a second). Here confirm mode is switched on for the underlying channel with our
    own callback, so a whole batch is written at once and its confirms (often `multiple`) are
    collected while the connection processes I/O.
    """

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.next_tag = 1  # delivery tags count up over the channel's life
        self.outstanding: dict[int, str] = {}  # delivery tag -> message_id
        self.nacked: set[str] = set()
        self.returned: set[str] = set()
        self.channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm)
        self.channel.add_on_return_callback(self._on_return)

    def publish(
        self, message_id: str, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties
    ) -> None:
        # Record first: publishing flushes I/O, and this message's confirm may arrive during it.
        self.outstanding[self.next_tag] = message_id
        self.next_tag += 1
        # Straight to the underlying channel: the frames are buffered and go out together when
        # `wait` runs the connection's I/O (the blocking channel would flush after every message).
        self.channel._impl.basic_publish(exchange, routing_key, body, props, mandatory=True)

    def wait(self, timeout: float) -> tuple[set[str], set[str]]:
        """Process I/O until every publish is confirmed; returns (nacked, returned) message ids.

        TimeoutError when confirms do not come: the caller's transaction rolls back and its rows
        stay unsent.
        """
        deadline = time.monotonic() + timeout
        # Wait on the connection's own I/O loop until the last confirm is in (pika's
        # process_data_events would only return early for events dispatched to the blocking layer).
        self.connection._flush_output(lambda: not self.outstanding or time.monotonic() > deadline)
        if self.outstanding:
            raise TimeoutError(f"{len(self.outstanding)} publisher confirms did not arrive")
        # Returns are dispatched by the blocking channel; give them their turn too.
        self.connection.process_data_events(time_limit=0)
        results = (self.nacked, self.returned)
        self.nacked, self.returned = set(), set()
        return results

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:
            tags = [tag for tag in self.outstanding if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            message_id = self.outstanding.pop(tag, None)
            if message_id is not None and isinstance(method, pika.spec.Basic.Nack):
                self.nacked.add(message_id)

    def _on_return(self, _channel: Any, _method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        if props.message_id:
            self.returned.add(props.message_id)


class OutboxRelay:
    """Moves outbox rows to the broker; woken by NOTIFY on insert, with a poll as a backstop."""

    def __init__(
        self, engine: Engine, settings: Settings, poll_seconds: float = 1.0, own_writer: str | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.poll_seconds = poll_seconds
        self._warned: set[str] = set()  # event names off the contract, already warned about
        # The application_name its own process's consumer writes under (None: every NOTIFY wakes it).
        self.own_writer = own_writer
        self.name = f"relay@{socket.gethostname()}:{os.getpid()}"

    def _check_contract(self, rows: Sequence[Any]) -> None:
        """Warn (once per name) about an event on order.events that consumers/events.py does not
        define: every event the service builds has a typed model, so one without is a row
        someone wrote by hand. It is published all the same: the outbox row is a promise."""
        for row in rows:
            key = row.routing_key
            if row.exchange == EVENTS_EXCHANGE and key not in EVENTS and key not in self._warned:
                self._warned.add(key)
                log.warning("relaying an event the contract does not define", extra={"event": key})

    def publish_batch(self, publisher: ConfirmedPublisher, include_failed: bool = False) -> int:
        """Publish a batch of unsent rows, await all their confirms at once, mark them; returns rows sent."""
        with self.engine.begin() as conn:
            # A bitmap scan of ix_outbox_unsent visits every entry left by rows already marked
            # sent (until VACUUM), so each claim costs more as the outbox grows (1 -> 17 ms over a
            # 60 s probe). A plain index scan marks those entries dead as it passes them, and the
            # next claims skip them (0.17 ms against 2.2 ms with 20,000 sent rows).
            conn.execute(_NO_BITMAP_SCAN)
            rows = conn.execute(
                _CLAIM,
                {
                    "n": self.settings.relay_batch,
                    "include_failed": include_failed,
                    "timers": TIMERS_EXCHANGE,
                    "timer_lock": TIMER_PUBLISHING_LOCK,
                },
            ).all()
            if not rows:
                return 0
            self._check_contract(rows)
            for row in publishing_order(rows):
                publisher.publish(
                    row.message_id,
                    row.exchange,
                    row.routing_key,
                    row.body.encode("utf-8"),
                    properties_for(row, lead=self.settings.timer_lead),
                )
            nacked, returned = publisher.wait(CONFIRM_TIMEOUT_SECONDS)
            sent: list[int] = []
            failed: list[int] = []
            error = ""
            for row in rows:
                if row.message_id in nacked:
                    failed.append(row.id)
                    error = "nacked by the broker"
                elif row.message_id in returned and row.exchange != EVENTS_EXCHANGE:
                    failed.append(row.id)  # an internal route is missing: keep the row for later
                    error = f"unroutable: {row.exchange} {row.routing_key}"
                else:
                    # Confirmed; an event nobody subscribes to comes back unroutable, and that is fine.
                    sent.append(row.id)
            if sent:
                conn.execute(_MARK_SENT, {"ids": sent})
            if failed:
                conn.execute(_MARK_FAILED, {"ids": failed, "error": error})
                log.error("outbox rows not delivered", extra={"count": len(failed), "error": error})
        metrics.relay_batch(rows, sent, failed)
        return len(sent)

    def drain(self, publisher: ConfirmedPublisher, deadline: float) -> int:
        """Publish until nothing is left unsent (or the deadline passes)."""
        total = 0
        while time.monotonic() < deadline:
            count = self.publish_batch(publisher)
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
                metrics.reconnecting("relay", exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _wait_for_work(self, listener: psycopg2.extensions.connection, stop: threading.Event) -> None:
        """Until a NOTIFY that is this relay's to act on (see `wakes`), or the poll interval."""
        deadline = time.monotonic() + self.poll_seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([listener], [], [], left)
            if not ready:
                return
            listener.poll()
            payloads = [notify.payload for notify in listener.notifies]
            listener.notifies.clear()
            if any(wakes(payload, self.own_writer) for payload in payloads):
                return

    def _run_connected(self, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(connection_parameters(self.settings, self.name))
        listener = self._listener()
        try:
            publisher = ConfirmedPublisher(connection)
            log.info("relay started")
            retry_failed_at = time.monotonic() + FAILED_RETRY_SECONDS
            while not stop.is_set():
                include_failed = time.monotonic() >= retry_failed_at
                if include_failed:
                    retry_failed_at = time.monotonic() + FAILED_RETRY_SECONDS
                count = self.publish_batch(publisher, include_failed)
                if count >= self.settings.relay_batch:
                    continue  # more is waiting
                self._wait_for_work(listener, stop)
                connection.process_data_events(time_limit=0)  # heartbeats
            self.drain(publisher, time.monotonic() + 10)
        finally:
            listener.close()
            if connection.is_open:
                connection.close()
