"""The consumer loop: the only code that acks, retries or parks a message.

A window is whatever the prefetch has already delivered. It is applied in one database
transaction with a savepoint per message (dedup row + handler effects + outbox rows), the
transaction commits, the messages to park or retry are republished with confirms, and only
then is the window acked with one `basic_ack(multiple=True)` (a timer not yet due may stay
in the buffer, unacked, while later deliveries are applied and acked one by one: `ack_plan`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import ValidationError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
    wait_random_exponential,
)

import metrics
from consumers import wire
from consumers.schemas import Command, describe_errors
from domain import names as n
from domain.errors import ConcurrentUpdate, ParkCommand, Refusal, RejectCode
from logs import message_context
from settings import Settings, format_duration
from store.db import is_transient
from store.stock import StockShortfall, WindowStockLocks
from store.uow import Envelope, UnitOfWork, WriteBuffer, claim_all, unclaim

log = logging.getLogger("consumer")

Handler = Callable[[Any, UnitOfWork], None]
RefusalAnnouncer = Callable[[Any, Refusal, UnitOfWork], None]


@dataclass(frozen=True)
class Route:
    """How one routing key is handled: its schema, its handler and how a refusal is announced."""

    schema: type[Command]
    handler: Handler
    refuse: RefusalAnnouncer | None = None
    # The handler reads and checks first and writes only through UnitOfWork.insert: its writes
    # can wait for the window's end, and a refusal needs no savepoint.
    batchable: bool = False
    # For a batched window: reads the whole window needs, up front (available as uow.prefetched).
    prefetch: Callable[[Connection, list[Any], WindowStockLocks | None], object] | None = None
    # Optional set-based version of the handler for a window of fresh messages of this key:
    # (conn, now, [(command, envelope)]), with the same effects as the handler for each.
    apply_window: Callable[[Connection, datetime, list[tuple[Any, Envelope]]], None] | None = None


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer queue: its routes, the bindings that fill it, and an optional periodic job."""

    queue: str
    routes: Mapping[str, Route]
    bindings: tuple[tuple[str, str], ...]
    periodic: Callable[[Engine, Settings], None] | None = None
    # When a delivery may be applied (None: at once). A delivery that is not due yet waits in
    # the consumer's buffer, unacked, while due ones are applied (see `due_window`).
    due_at: Callable[[Delivery], datetime | None] | None = None
    # This queue's prefetch instead of the PREFETCH setting (windows stay PREFETCH at most).
    prefetch: int | None = None


# ---------------------------------------------------------------------------------------------
# Decoding and validation (pure: no I/O)


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

    Only those carry x-original-* headers the service wrote itself (`_publish_retry` overwrites
    them before the retry queue dead-letters the message to RETRY_RETURN_EXCHANGE). On any other
    delivery the headers are the producer's, and a producer never chooses the routing key or
    exchange a command is handled (or parked, or replayed) under.
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
_SERVICE_HEADERS = frozenset(
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
    if not _from_retry(method.exchange) and not _SERVICE_HEADERS.isdisjoint(headers):
        # A producer's copy of the service's bookkeeping means nothing (a forged x-attempts
        # would skip retries, a forged x-original-* would be kept on a retried or parked copy).
        headers = {key: value for key, value in headers.items() if key not in _SERVICE_HEADERS}
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


def validate(delivery: Delivery, routes: Mapping[str, Route]) -> Parsed:
    """Check a delivery against the contract; a failure carries a code and a readable reason.

    Everything here comes before any database work: the wire limits (consumers/wire.py:
    control characters, nesting, message ids) included, so that nothing PostgreSQL would
    refuse reaches it. Hostile text quoted in a reason is escaped.
    """

    def reject(code: str, reason: str) -> Parsed:
        return Parsed(delivery, rejection=(code, reason))

    props = delivery.properties
    if not delivery.message_id:
        return reject(RejectCode.MISSING_MESSAGE_ID, "the message has no message_id property")
    problem = (
        wire.properties_problem(props)
        or wire.check_text(delivery.routing_key, "routing key")
        or wire.check_text(delivery.exchange, "exchange")
    )
    if problem:
        return reject(*problem)
    if len(delivery.body) > n.MAX_BODY_BYTES:
        return reject(
            RejectCode.BODY_TOO_LARGE,
            f"body is {len(delivery.body)} bytes, over the limit of {n.MAX_BODY_BYTES}",
        )
    if props.content_type and props.content_type.split(";")[0].strip().lower() != "application/json":
        return reject(
            RejectCode.UNSUPPORTED_CONTENT_TYPE,
            f"content_type {props.content_type!r} is not application/json",
        )
    version = delivery.headers.get(n.SCHEMA_VERSION_HEADER, n.SCHEMA_VERSION)
    if type(version) is not int or version != n.SCHEMA_VERSION:
        return reject(
            RejectCode.UNSUPPORTED_SCHEMA_VERSION,
            f"{n.SCHEMA_VERSION_HEADER} is {wire.printable(repr(version), 80)}; "
            f"only {n.SCHEMA_VERSION} is supported",
        )
    route = routes.get(delivery.routing_key)
    if route is None:
        return reject(RejectCode.UNKNOWN_ROUTING_KEY, f"no command is named {delivery.routing_key!r}")
    raw, problem = wire.parse_body(delivery.body)
    if problem:
        return reject(*problem)
    if not isinstance(raw, dict):
        return reject(RejectCode.INVALID_JSON, f"body is JSON {type(raw).__name__}, not an object")
    try:
        command = route.schema.model_validate(raw)
    except ValidationError as exc:
        return reject(RejectCode.SCHEMA_INVALID, f"{delivery.routing_key}: {describe_errors(exc)}")
    return Parsed(delivery, command=command, raw=raw)


# ---------------------------------------------------------------------------------------------
# Applying a window in one transaction


@dataclass(frozen=True)
class Applied:
    pass


@dataclass(frozen=True)
class Duplicate:
    pass


@dataclass(frozen=True)
class Park:
    code: str
    reason: str


@dataclass(frozen=True)
class Retry:
    error: str


Outcome = Applied | Duplicate | Park | Retry


class NeedsSavepoints(Exception):
    """A message of an optimistic window was refused, parked or failed: redo it with savepoints."""


class _DatabaseDown(Exception):
    """The database stopped answering while a window's messages were applied one by one."""


class WindowFailed(Exception):
    """The window's transaction kept failing for a transient reason; nothing of it committed."""


@dataclass
class WindowApplier:
    """Applies a window of parsed messages in one transaction, a savepoint per message."""

    engine: Engine
    spec: ConsumerSpec
    max_attempts: int
    retry_seconds: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def apply(self, window: Sequence[Parsed], retry_seconds: float | None = None) -> list[Outcome]:
        """Outcomes of the window's messages once its transaction committed; WindowFailed if it never did."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential(multiplier=0.05, max=5),
            stop=stop_after_delay(self.retry_seconds if retry_seconds is None else retry_seconds),
            sleep=self.sleep,
            reraise=False,
            after=lambda _state: metrics.transient_retry(self.spec.queue),
            before_sleep=lambda state: log.warning(
                "transient database error, retrying window",
                extra={"attempt": state.attempt_number, "error": repr(state.outcome.exception())}
                if state.outcome
                else {},
            ),
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._apply_window(window)
        except RetryError as exc:
            raise WindowFailed(repr(exc.last_attempt.exception())) from exc
        raise AssertionError("unreachable")

    def _apply_window(self, window: Sequence[Parsed]) -> list[Outcome]:
        """The fastest way that is safe for this window, falling back to a savepoint per message."""
        if len(window) > 1 and self._batchable(window):
            try:
                return self._batched_transaction(window)
            except StockShortfall:
                pass  # another consumer took the stock this window counted on
            except Exception as exc:
                if is_transient(exc):
                    raise
                # A race on a unique key, or a handler failing: isolate it message by message.
                log.info(
                    "batched window failed; applying it with a savepoint per message",
                    extra={"error": repr(exc)},
                )
            return self._transaction(window)
        if len(window) > 1 or self._set_based(window):
            try:
                return self._optimistic_transaction(window)
            except (NeedsSavepoints, StockShortfall) as exc:
                # A message was refused, parked or failed: isolate each one.
                log.info("window redone with a savepoint per message", extra={"why": str(exc)[:200]})
        return self._transaction(window)

    def _optimistic_transaction(self, window: Sequence[Parsed]) -> list[Outcome]:
        """One transaction without savepoints, dedup rows claimed together.

        Most windows apply cleanly; the first refusal, park or failure rolls the whole window
        back (NeedsSavepoints) and it is applied again with a savepoint per message.
        """
        now = self.clock()
        window_stock = WindowStockLocks()
        outcomes: list[Outcome] = []
        with self.engine.begin() as conn:
            envelopes, fresh = self._claim(conn, window)
            set_based: dict[str, list[tuple[Any, Envelope]]] = {}
            for parsed, envelope in zip(window, envelopes, strict=True):
                with self._in_hand(envelope):
                    if parsed.rejection is not None:
                        outcomes.append(self._park(conn, envelope, now, *parsed.rejection))
                        continue
                    if envelope.message_id not in fresh:
                        outcomes.append(Duplicate())
                        continue
                    fresh.discard(envelope.message_id)
                    route = self.spec.routes[envelope.routing_key]
                    if route.apply_window is not None:
                        set_based.setdefault(envelope.routing_key, []).append((parsed.command, envelope))
                        outcomes.append(Applied())
                        continue
                    uow = UnitOfWork(conn, envelope, now, window_stock)
                    try:
                        route.handler(parsed.command, uow)
                        uow.flush()
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        raise NeedsSavepoints(repr(exc)) from exc
                    window_stock.keep(uow.stock_reserved)
                    outcomes.append(Applied())
            for key, items in set_based.items():
                apply_window = self.spec.routes[key].apply_window
                assert apply_window is not None
                try:
                    apply_window(conn, now, items)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise NeedsSavepoints(repr(exc)) from exc
            window_stock.apply(conn)
        return outcomes

    def _set_based(self, window: Sequence[Parsed]) -> bool:
        """A window with a message of a set-based route (one timer message may carry many timers)."""
        routes = self.spec.routes
        return any(p.command is not None and routes[p.delivery.routing_key].apply_window for p in window)

    def _batchable(self, window: Sequence[Parsed]) -> bool:
        routes = self.spec.routes
        return all(p.rejection is not None or routes[p.delivery.routing_key].batchable for p in window)

    def _batched_transaction(self, window: Sequence[Parsed]) -> list[Outcome]:
        """One transaction, no savepoints: dedup rows claimed together, inserts written together."""
        now = self.clock()
        window_stock = WindowStockLocks()
        buffer = WriteBuffer()
        outcomes: list[Outcome] = []
        parked_ids: list[str] = []
        with self.engine.begin() as conn:
            envelopes, fresh = self._claim(conn, window)
            prefetched = self._prefetch(conn, window, window_stock)
            for parsed, envelope in zip(window, envelopes, strict=True):
                with self._in_hand(envelope):
                    outcome = self._apply_buffered(
                        conn,
                        parsed,
                        envelope,
                        now,
                        fresh,
                        window_stock,
                        buffer,
                        prefetched.get(envelope.routing_key),
                    )
                if isinstance(outcome, Park) and parsed.rejection is None and envelope.message_id:
                    parked_ids.append(envelope.message_id)
                outcomes.append(outcome)
            buffer.write(conn)
            window_stock.apply(conn)  # last: the hot stock rows stay locked only until commit
            if parked_ids:  # parked commands keep no dedup row, so a replay applies them
                unclaim(conn, self.spec.queue, parked_ids)
        return outcomes

    def _claim(self, conn: Connection, window: Sequence[Parsed]) -> tuple[list[Envelope], set[str]]:
        """The window's envelopes, and the message ids newly claimed (dedup rows, one statement)."""
        envelopes = [self._envelope(p) for p in window]
        valid = [e for p, e in zip(window, envelopes, strict=True) if p.rejection is None]
        return envelopes, claim_all(conn, self.spec.queue, valid)

    def _prefetch(
        self, conn: Connection, window: Sequence[Parsed], window_stock: WindowStockLocks
    ) -> dict[str, object]:
        """Each route's up-front reads for its commands in this window (routing key -> result)."""
        commands: dict[str, list[Any]] = {}
        for parsed in window:
            if parsed.command is not None:
                commands.setdefault(parsed.delivery.routing_key, []).append(parsed.command)
        return {
            key: prefetch(conn, cmds, window_stock)
            for key, cmds in commands.items()
            if (prefetch := self.spec.routes[key].prefetch) is not None
        }

    def _apply_buffered(
        self,
        conn: Connection,
        parsed: Parsed,
        envelope: Envelope,
        now: datetime,
        fresh: set[str],
        window_stock: WindowStockLocks,
        buffer: WriteBuffer,
        prefetched: object | None,
    ) -> Outcome:
        own = WriteBuffer()
        uow = UnitOfWork(conn, envelope, now, window_stock, own)
        uow.prefetched = prefetched
        if parsed.rejection is not None:
            return self._announce_park(uow, buffer, own, *parsed.rejection)
        if envelope.message_id not in fresh:
            return Duplicate()
        fresh.discard(envelope.message_id)  # a second copy in this window is a duplicate
        route = self.spec.routes[envelope.routing_key]
        assert parsed.command is not None
        try:
            route.handler(parsed.command, uow)
            uow.flush()
        except Refusal as refusal:
            log.info("command refused", extra={"reason": refusal.reason, "detail": refusal.detail})
            metrics.command_refused(self.spec, envelope.routing_key, refusal.reason)
            # Drop everything the message did before it was refused: rows, events, stock reservations.
            own, uow.outgoing, uow.stock_reserved = WriteBuffer(), [], {}
            uow.buffer = own
            if route.refuse is not None:
                route.refuse(parsed.command, refusal, uow)
            uow.flush()
        except ParkCommand as park:
            return self._announce_park(
                UnitOfWork(conn, envelope, now), buffer, WriteBuffer(), park.code, park.reason
            )
        buffer.merge(own)
        window_stock.keep(uow.stock_reserved)
        return Applied()

    def _announce_park(
        self, uow: UnitOfWork, buffer: WriteBuffer, own: WriteBuffer, code: str, reason: str
    ) -> Outcome:
        log.warning("command rejected", extra={"code": code, "reason": reason})
        uow.buffer = own
        uow.emit(n.Evt.COMMAND_REJECTED, rejected_body(uow.envelope, code, reason))
        uow.flush()
        buffer.merge(own)
        return Park(code, reason)

    def _transaction(self, window: Sequence[Parsed]) -> list[Outcome]:
        """One transaction for the window, a savepoint per message (stock locked as it goes), commit."""
        with self.engine.begin() as conn:
            outcomes = [self._apply_one(conn, parsed) for parsed in window]
        return outcomes

    def announce_rejection(self, parsed: Parsed, code: str, reason: str) -> Outcome:
        """Write command.rejected for a message in a transaction of its own (no retries)."""
        with self.engine.begin() as conn:
            return self._park(conn, self._envelope(parsed), self.clock(), code, reason)

    def _envelope(self, parsed: Parsed) -> Envelope:
        d = parsed.delivery
        message_id, correlation_id, routing_key = d.message_id, d.properties.correlation_id, d.routing_key
        if parsed.rejection is not None:
            # A rejected message's ids may be hostile: they go into the outbox escaped (a valid
            # one's passed the wire checks, so this is off the hot path).
            message_id = wire.printable(message_id, wire.MAX_ID_CHARS) if message_id else None
            correlation_id = wire.printable(correlation_id, wire.MAX_ID_CHARS) if correlation_id else None
            routing_key = wire.printable(routing_key, wire.MAX_ID_CHARS)
        return Envelope(
            consumer=self.spec.queue,
            message_id=message_id,
            correlation_id=correlation_id or message_id,
            routing_key=routing_key,
            body=parsed.raw or {},
        )

    def _apply_one(self, conn: Connection, parsed: Parsed) -> Outcome:
        envelope = self._envelope(parsed)
        now = self.clock()
        with self._in_hand(envelope):
            return self._apply_in_savepoint(conn, parsed, envelope, now)

    @contextmanager
    def _in_hand(self, envelope: Envelope) -> Iterator[None]:
        """While a message is applied: its ids on every log line, its handling timed."""
        token = message_context.set(
            {
                "message_id": envelope.message_id,
                "correlation_id": envelope.correlation_id,
                "routing_key": envelope.routing_key,
                "order_no": envelope.body.get("order_no"),
            }
        )
        handled = metrics.time_handler(self.spec, envelope.routing_key)
        try:
            yield
        finally:
            handled()
            message_context.reset(token)

    def _apply_in_savepoint(
        self,
        conn: Connection,
        parsed: Parsed,
        envelope: Envelope,
        now: datetime,
    ) -> Outcome:
        if parsed.rejection:
            return self._park(conn, envelope, now, *parsed.rejection)
        assert parsed.command is not None
        route = self.spec.routes[envelope.routing_key]
        for race in (1, 2):
            try:
                with conn.begin_nested():
                    uow = UnitOfWork(conn, envelope, now)
                    if not uow.claim():
                        return Duplicate()
                    route.handler(parsed.command, uow)
                    uow.flush()
                return Applied()
            except Refusal as refusal:
                return self._refuse(conn, envelope, now, route, parsed.command, refusal)
            except ParkCommand as park:
                return self._park(conn, envelope, now, park.code, park.reason)
            except (IntegrityError, ConcurrentUpdate) as exc:
                # A concurrent writer committed the same key first; looking again sees its row.
                if race == 1:
                    continue
                return self._failed(conn, envelope, now, parsed, exc)
            except Exception as exc:
                if is_transient(exc):
                    raise
                return self._failed(conn, envelope, now, parsed, exc)
        raise AssertionError("unreachable")

    def _refuse(
        self,
        conn: Connection,
        envelope: Envelope,
        now: datetime,
        route: Route,
        command: Command,
        refusal: Refusal,
    ) -> Outcome:
        log.info("command refused", extra={"reason": refusal.reason, "detail": refusal.detail})
        metrics.command_refused(self.spec, envelope.routing_key, refusal.reason)
        with conn.begin_nested():
            uow = UnitOfWork(conn, envelope, now)
            if not uow.claim():
                return Duplicate()
            if route.refuse is not None:
                route.refuse(command, refusal, uow)
            uow.flush()
        return Applied()

    def _park(self, conn: Connection, envelope: Envelope, now: datetime, code: str, reason: str) -> Outcome:
        log.warning("command rejected", extra={"code": code, "reason": reason})
        with conn.begin_nested():
            uow = UnitOfWork(conn, envelope, now)
            uow.emit(n.Evt.COMMAND_REJECTED, rejected_body(envelope, code, reason))
            uow.flush()
        return Park(code, reason)

    def _failed(
        self, conn: Connection, envelope: Envelope, now: datetime, parsed: Parsed, exc: Exception
    ) -> Outcome:
        error = error_summary(exc)
        log.error("handler failed", exc_info=exc, extra={"attempts": parsed.delivery.attempts})
        if parsed.delivery.attempts >= self.max_attempts:
            # Not transient (those are retried as a window): a bug or content the code cannot take.
            reason = f"failed {parsed.delivery.attempts + 1} times; last error: {error}"
            return self._park(conn, envelope, now, RejectCode.INTERNAL_ERROR, reason)
        return Retry(error)

    def database_up(self) -> bool:
        """Whether the database answers at all (a window failing for a transient reason may be
        the window's fault, or the database's: only the second is waited out)."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception as exc:
            if is_transient(exc):
                return False
            raise

    def wait_for_database(self, stopping: Callable[[], bool]) -> bool:
        """Sleep (heartbeats going on) with jittered backoff until the database answers; False
        when asked to stop first. An outage never counts against a message's retry budget."""
        retrying = Retrying(
            retry=retry_if_result(lambda up: up is False),
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=lambda _state: stopping(),
            sleep=self.sleep,
            retry_error_callback=lambda _state: False,
            before_sleep=lambda state: log.warning(
                "database unavailable; holding the window unacked",
                extra={"attempt": state.attempt_number, "retry_in_s": round(state.upcoming_sleep, 2)},
            ),
            after=lambda _state: metrics.transient_retry(self.spec.queue),
        )
        return bool(retrying(self.database_up))


# Headers the service itself writes on a retried or parked copy.
_SERVICE_WRITTEN = _SERVICE_HEADERS | {n.PARKING_REASON_HEADER, n.PARKING_CODE_HEADER, n.PARKED_AT_HEADER}


def rejected_body(envelope: Envelope, code: str, reason: str) -> dict[str, Any]:
    """The body of `command.rejected`: hostile text in it is escaped (JSONB refuses NUL)."""
    return {
        "message_id": envelope.message_id,
        "routing_key": envelope.routing_key,
        "code": code,
        "reason": wire.printable(reason, 2000, keep=wire.FREE_TEXT_WHITESPACE),
    }


def error_summary(exc: BaseException) -> str:
    """`Type: message` and where it was raised (the last frames), escaped, for a parking reason."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    text = f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")
    return wire.printable(text, 1000)


# ---------------------------------------------------------------------------------------------
# The broker side: consume, republish to the retry queues or the parking lot, ack


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
    return _copy_headers(
        delivery,
        queue,
        {
            n.PARKING_REASON_HEADER: reason[:2000],
            n.PARKING_CODE_HEADER: code,
            n.PARKED_AT_HEADER: datetime.now(UTC).isoformat(),
        },
    )


def _copy_headers(delivery: Delivery, queue: str, extra: dict[str, Any]) -> dict[str, Any]:
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


class ConsumerProcess:
    """Runs one consumer queue until SIGTERM/SIGINT: reconnects, applies windows, acks after commit."""

    def __init__(
        self,
        spec: ConsumerSpec,
        settings: Settings,
        engine: Engine,
        declare_topology: Callable[[BlockingChannel], None],
        background: Sequence[Callable[[threading.Event], None]] = (),
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.engine = engine
        self.declare_topology = declare_topology
        self.background = background
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
                metrics.reconnecting("consumer", exc)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:
                # Anything else (pika raises ValueError for a socket reset mid-handshake): the
                # consumer must not die while its process lives on; start over after a pause.
                log.exception("consumer failed; starting again", extra={"in_s": backoff})
                metrics.reconnecting("consumer", exc)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self) -> None:
        connection = pika.BlockingConnection(connection_parameters(self.settings, self.name))
        try:
            channel = connection.channel()
            self.declare_topology(channel)
            prefetch = self.spec.prefetch or self.settings.prefetch
            channel.basic_qos(prefetch_count=prefetch)
            publisher = connection.channel()
            publisher.confirm_delivery()
            buffer: list[Delivery] = []
            due_at = self.spec.due_at

            def on_message(
                _ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes
            ) -> None:
                delivery = make_delivery(method, props, body)
                if due_at is not None:
                    try:
                        delivery.due = due_at(delivery)
                    except Exception:  # unreadable: apply at once, so that validation parks it
                        log.exception("could not read when a delivery is due")
                buffer.append(delivery)

            tag = channel.basic_consume(self.spec.queue, on_message, consumer_tag=self.name)
            log.info("consuming", extra={"prefetch": prefetch})
            metrics.consumer_connected(self.spec.queue, True)
            applier = WindowApplier(
                self.engine,
                self.spec,
                max_attempts=len(self.retry_steps),
                retry_seconds=self.settings.transient_retry_seconds,
                sleep=connection.sleep,
            )

            def apply_due() -> tuple[bool, float | None]:
                """Apply what is due in the buffer as one window; (applied, seconds to the next due).

                A window left unacked (asked to stop during a database outage) ends the
                consumption: a later window's multiple ack would settle it unapplied.
                """
                picked, wait_s = due_window(buffer, datetime.now(UTC), self.settings.prefetch)
                if picked:
                    chosen = set(picked)
                    window = [buffer[i] for i in picked]
                    buffer[:] = [d for i, d in enumerate(buffer) if i not in chosen]
                    settled = self._handle_window(
                        applier, window, channel, publisher, buffer[0].tag if buffer else None
                    )
                    if not settled:
                        buffer.clear()  # unacked: they return to the queue when the channel closes
                        return False, None
                return bool(picked), wait_s

            wait = 0.5
            while not self.stop_event.is_set():
                connection.process_data_events(time_limit=wait)
                applied, wait_s = apply_due()
                if applied:
                    wait = 0.0 if buffer else 0.5  # more may be due already
                else:
                    wait = 0.5 if wait_s is None else min(0.5, max(0.001, wait_s))
            channel.basic_cancel(tag)
            # What is due is applied; deliveries not due yet go back to the queue unacked.
            while apply_due()[0]:
                pass
        finally:
            metrics.consumer_connected(self.spec.queue, False)
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _handle_window(
        self,
        applier: WindowApplier,
        window: list[Delivery],
        channel: BlockingChannel,
        publisher: BlockingChannel,
        first_held: int | None = None,
    ) -> bool:
        """Apply, republish what is parked or retried, then ack (deliveries from tag `first_held`
        on stay in the buffer, unacked); False when the window was left unacked."""
        started = metrics.window_received(self.spec, window)
        parsed = [self._validated(d) for d in window]
        outcomes = self._outcomes(applier, parsed)
        if outcomes is None:
            return False  # asked to stop during a database outage: the window goes back unacked
        for delivery, outcome in zip(window, outcomes, strict=True):
            if isinstance(outcome, Park):
                self._publish_parked(publisher, delivery, outcome)
            elif isinstance(outcome, Retry):
                self._publish_retry(publisher, delivery, outcome)
        upto, singles = ack_plan([d.tag for d in window], first_held)
        if upto is not None:
            channel.basic_ack(delivery_tag=upto, multiple=True)
        for tag in singles:
            channel.basic_ack(delivery_tag=tag)
        metrics.window_acked(self.spec, window, outcomes, started)
        return True

    def _validated(self, delivery: Delivery) -> Parsed:
        """`validate`, and should validation itself crash, a rejection (it would crash again)."""
        try:
            return validate(delivery, self.spec.routes)
        except Exception as exc:
            log.exception("validation failed")
            reason = f"validation failed: {error_summary(exc)}"
            return Parsed(delivery, rejection=(RejectCode.INTERNAL_ERROR, reason))

    def _outcomes(self, applier: WindowApplier, parsed: list[Parsed]) -> list[Outcome] | None:
        """The window's outcomes once committed; None when asked to stop during an outage.

        A database outage is waited out with the window held unacked, never spending a
        message's retry budget. Anything else that fails the window (a transient failure
        while the database answers, or any exception at all) isolates the messages: each is
        applied alone, so only the one at fault goes on to the retry queues and the parking lot.
        """
        while True:
            try:
                return applier.apply(parsed)
            except WindowFailed as exc:
                if not applier.database_up():
                    if not applier.wait_for_database(self.stop_event.is_set):
                        return None
                    continue
                log.error(
                    "window failed after retries; applying its messages one by one",
                    extra={"error": str(exc), "size": len(parsed)},
                )
            except Exception as exc:
                log.exception("window failed; applying its messages one by one", extra={"size": len(parsed)})
                if len(parsed) == 1:
                    return [self._internal_error(applier, parsed[0], exc)]
            try:
                return [self._apply_alone(applier, p) for p in parsed]
            except _DatabaseDown:
                if not applier.wait_for_database(self.stop_event.is_set):
                    return None

    def _apply_alone(self, applier: WindowApplier, parsed: Parsed) -> Outcome:
        try:
            return applier.apply([parsed], retry_seconds=1.0)[0]
        except WindowFailed as exc:
            if not applier.database_up():
                raise _DatabaseDown() from exc
            return self._exhausted_or_retry(applier, parsed, RejectCode.RETRIES_EXHAUSTED, str(exc))
        except Exception as exc:
            return self._internal_error(applier, parsed, exc)

    def _internal_error(self, applier: WindowApplier, parsed: Parsed, exc: Exception) -> Outcome:
        """A message whose own transaction failed outside its handler (a bug, hostile content)."""
        log.error("message failed outside its handler", exc_info=exc)
        return self._exhausted_or_retry(applier, parsed, RejectCode.INTERNAL_ERROR, error_summary(exc))

    def _exhausted_or_retry(self, applier: WindowApplier, parsed: Parsed, code: str, error: str) -> Outcome:
        if parsed.delivery.attempts < len(self.retry_steps):
            return Retry(error)
        reason = f"failed {parsed.delivery.attempts + 1} times; last error: {error}"
        try:
            return applier.announce_rejection(parsed, code, reason)
        except Exception as db_exc:  # command.rejected cannot be written: park without it
            log.error("could not write command.rejected", extra={"error": repr(db_exc)})
            return Park(code, reason)

    def _publish_parked(self, publisher: BlockingChannel, delivery: Delivery, outcome: Park) -> None:
        headers = parked_headers(delivery, self.spec.queue, outcome.code, outcome.reason)
        self._publish_copy(publisher, "", n.PARKING_LOT_QUEUE, delivery, headers)

    def _publish_retry(self, publisher: BlockingChannel, delivery: Delivery, outcome: Retry) -> None:
        step = self.retry_steps[min(delivery.attempts, len(self.retry_steps) - 1)]
        headers = _copy_headers(delivery, self.spec.queue, {n.LAST_ERROR_HEADER: outcome.error[:1000]})
        self._publish_copy(
            publisher, n.RETRY_EXCHANGE, f"{format_duration(step)}.{self.spec.queue}", delivery, headers
        )

    @staticmethod
    def _publish_copy(
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
            theirs = set(delivery.headers) - _SERVICE_WRITTEN
            log.warning("headers dropped from a republished copy", extra={"error": repr(exc)})
            kept = {key: value for key, value in headers.items() if key not in theirs}
            kept[n.DROPPED_HEADERS_HEADER] = wire.printable(", ".join(sorted(map(str, theirs))), 1000)
            publish(kept)
