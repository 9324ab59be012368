"""One consumer process: consume a queue, apply what is due as windows, settle each window.

A window is whatever the prefetch has already delivered. It is applied in one database
transaction (consumers/applier.py), the transaction commits, the messages to park or retry
are republished with confirms, and only then is the window acked with one
`basic_ack(multiple=True)` (a timer not yet due may stay in the buffer, unacked, while later
deliveries are applied and acked one by one: `ack_plan`). `_settle` is the only code that
acks a consumed message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import Engine

from consumers.amqp import connection_parameters, publish_parked, publish_retry
from consumers.applier import WindowApplier
from consumers.delivery import Delivery, Parsed, ack_plan, due_window, make_delivery, validate
from consumers.isolation import window_outcomes
from consumers.observer import NullObserver, Observer
from consumers.outcomes import Outcome, Park, Retry, WindowFailed
from consumers.refusals import error_summary
from consumers.routes import ConsumerSpec
from domain.errors import RejectCode
from settings import Settings

log = logging.getLogger("consumer")


@dataclass
class _Session:
    """One connection's consumption: the window applier, the consuming channel (acks), the
    publisher channel (confirmed retries and parking) and the deliveries in hand, in tag order."""

    applier: WindowApplier
    channel: BlockingChannel
    publisher: BlockingChannel
    buffer: list[Delivery]


class ConsumerProcess:
    """Runs one consumer queue until SIGTERM/SIGINT: reconnects, applies windows, acks after commit."""

    def __init__(
        self,
        spec: ConsumerSpec,
        settings: Settings,
        engine: Engine,
        declare_topology: Callable[[BlockingChannel], None],
        background: Sequence[Callable[[threading.Event], None]] = (),
        observer: Observer | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.engine = engine
        self.declare_topology = declare_topology
        self.background = background
        self.observer: Observer = observer or NullObserver()
        self.stop_event = threading.Event()
        self.name = f"{spec.queue}@{socket.gethostname()}:{os.getpid()}"
        self.retry_steps = settings.retry_steps

    def request_stop(self, *_: object) -> None:
        if not self.stop_event.is_set():
            log.info("stop requested; finishing the messages in hand")
        self.stop_event.set()

    def run(self) -> int:
        """Consume until asked to stop; returns the exit status."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        threads = [
            # Daemons: should this thread ever die, the background jobs must not keep the process up.
            threading.Thread(
                target=job, args=(self.stop_event,), name=getattr(job, "__name__", "job"), daemon=True
            )
            for job in self.background
        ]
        for thread in threads:
            thread.start()
        try:
            self._consume_until_stopped()
        finally:
            self.stop_event.set()
            for thread in threads:
                thread.join(timeout=30)
        log.info("stopped")
        return 0

    def _consume_until_stopped(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                self._consume()
                backoff = 0.5
            except (pika.exceptions.AMQPError, OSError, WindowFailed) as exc:
                log.warning("connection lost; reconnecting", extra={"error": repr(exc), "in_s": backoff})
                self.observer.reconnecting("consumer", exc)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:
                # Anything else (pika raises ValueError for a socket reset mid-handshake): the
                # consumer must not die while its process lives on; start over after a pause.
                log.exception("consumer failed; starting again", extra={"in_s": backoff})
                self.observer.reconnecting("consumer", exc)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self) -> None:
        connection = pika.BlockingConnection(connection_parameters(self.settings, self.name))
        try:
            self._consume_on(connection)
        finally:
            self.observer.consumer_connected(self.spec.queue, False)
            if connection.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    connection.close()

    def _consume_on(self, connection: pika.BlockingConnection) -> None:
        """Subscribe on this connection and apply windows until asked to stop (or a window is
        left unacked); then apply what is due in hand."""
        channel = connection.channel()
        self.declare_topology(channel)
        prefetch = self.spec.prefetch or self.settings.prefetch
        channel.basic_qos(prefetch_count=prefetch)
        publisher = connection.channel()
        publisher.confirm_delivery()
        buffer: list[Delivery] = []
        tag = channel.basic_consume(self.spec.queue, self._buffering(buffer), consumer_tag=self.name)
        log.info("consuming", extra={"prefetch": prefetch})
        self.observer.consumer_connected(self.spec.queue, True)
        applier = WindowApplier(
            self.engine,
            self.spec,
            max_attempts=len(self.retry_steps),
            retry_seconds=self.settings.transient_retry_seconds,
            sleep=connection.sleep,
            observer=self.observer,
        )
        session = _Session(applier, channel, publisher, buffer)
        wait = 0.5
        while not self.stop_event.is_set():
            connection.process_data_events(time_limit=wait)
            applied, wait_s = self._apply_due(session)
            if applied:
                wait = 0.0 if buffer else 0.5  # more may be due already
            else:
                wait = 0.5 if wait_s is None else min(0.5, max(0.001, wait_s))
        channel.basic_cancel(tag)
        # What is due is applied; deliveries not due yet go back to the queue unacked.
        while self._apply_due(session)[0]:
            pass

    def _buffering(
        self, buffer: list[Delivery]
    ) -> Callable[[BlockingChannel, Any, pika.BasicProperties, bytes], None]:
        """The consumer callback: each delivery goes into `buffer`, with when it is due."""
        due_at = self.spec.due_at

        def on_message(_ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            delivery = make_delivery(method, props, body)
            if due_at is not None:
                try:
                    delivery.due = due_at(delivery)
                except Exception:  # unreadable: apply at once, so that validation parks it
                    log.exception("could not read when a delivery is due")
            buffer.append(delivery)

        return on_message

    def _apply_due(self, session: _Session) -> tuple[bool, float | None]:
        """Apply what is due in the buffer as one window; (applied, seconds to the next due).

        A window left unacked (asked to stop during a database outage) ends the
        consumption: a later window's multiple ack would settle it unapplied.
        """
        buffer = session.buffer
        picked, wait_s = due_window(buffer, datetime.now(UTC), self.settings.prefetch)
        if picked:
            chosen = set(picked)
            window = [buffer[i] for i in picked]
            buffer[:] = [d for i, d in enumerate(buffer) if i not in chosen]
            settled = self._handle_window(
                session.applier,
                window,
                session.channel,
                session.publisher,
                buffer[0].tag if buffer else None,
            )
            if not settled:
                buffer.clear()  # unacked: they return to the queue when the channel closes
                return False, None
        return bool(picked), wait_s

    def _handle_window(
        self,
        applier: WindowApplier,
        window: list[Delivery],
        channel: BlockingChannel,
        publisher: BlockingChannel,
        first_held: int | None = None,
    ) -> bool:
        """Apply the window and settle it (deliveries from tag `first_held` on stay in the
        buffer, unacked); False when the window was left unacked."""
        started = self.observer.window_received(self.spec, window)
        parsed = [self._validated(d) for d in window]
        outcomes = window_outcomes(applier, parsed, self.stop_event.is_set)
        if outcomes is None:
            return False  # asked to stop during a database outage: the window goes back unacked
        self._settle(window, outcomes, channel, publisher, first_held)
        self.observer.window_acked(self.spec, window, outcomes, started)
        return True

    def _settle(
        self,
        window: Sequence[Delivery],
        outcomes: Sequence[Outcome],
        channel: BlockingChannel,
        publisher: BlockingChannel,
        first_held: int | None,
    ) -> None:
        """The one place a consumed window is acked, once its transaction committed: what it
        parks or retries is republished (confirmed) first, then the window is acked (`ack_plan`)."""
        for delivery, outcome in zip(window, outcomes, strict=True):
            if isinstance(outcome, Park):
                publish_parked(publisher, delivery, self.spec.queue, outcome)
            elif isinstance(outcome, Retry):
                publish_retry(publisher, delivery, self.spec.queue, outcome, self.retry_steps)
        upto, singles = ack_plan([d.tag for d in window], first_held)
        if upto is not None:
            channel.basic_ack(delivery_tag=upto, multiple=True)
        for tag in singles:
            channel.basic_ack(delivery_tag=tag)

    def _validated(self, delivery: Delivery) -> Parsed:
        """`validate`, and should validation itself crash, a rejection (it would crash again)."""
        try:
            return validate(delivery, self.spec.routes)
        except Exception as exc:
            log.exception("validation failed")
            reason = f"validation failed: {error_summary(exc)}"
            return Parsed(delivery, rejection=(RejectCode.INTERNAL_ERROR, reason))
