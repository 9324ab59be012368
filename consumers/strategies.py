"""The ways a window is applied in one transaction, each `apply(window) -> outcomes`.

`SavepointPerMessage` is the safe one every window can fall back to; `OptimisticWindow` skips
the savepoints and gives up (NeedsSavepoints) at the first message that needs one; the batched
form is in consumers/batched.py. All of them refuse and park through one `Refusals`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from consumers import wire
from consumers.delivery import Parsed
from consumers.observer import Observer
from consumers.outcomes import Applied, Duplicate, NeedsSavepoints, Outcome, Retry
from consumers.refusals import Refusals, error_summary, failed_reason, retries_left
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import Command
from domain.errors import ConcurrentUpdate, ParkCommand, Refusal, RejectCode
from logs import message_context
from store.db import is_transient
from store.stock import WindowStockLocks
from store.uow import Envelope, UnitOfWork, claim_all

log = logging.getLogger("consumer")


@dataclass
class WindowStrategy:
    """What every way of applying a window shares: envelopes, dedup claims, the refusal path."""

    engine: Engine
    spec: ConsumerSpec
    observer: Observer
    clock: Callable[[], datetime]
    refusals: Refusals = field(init=False)

    def __post_init__(self) -> None:
        self.refusals = Refusals(self.spec, self.observer)

    def apply(self, window: Sequence[Parsed]) -> list[Outcome]:
        """The window's outcomes once its transaction committed."""
        raise NotImplementedError

    def envelope(self, parsed: Parsed) -> Envelope:
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

    def _claim(self, conn: Connection, window: Sequence[Parsed]) -> tuple[list[Envelope], set[str]]:
        """The window's envelopes, and the message ids newly claimed (dedup rows, one statement)."""
        envelopes = [self.envelope(p) for p in window]
        valid = [e for p, e in zip(window, envelopes, strict=True) if p.rejection is None]
        return envelopes, claim_all(conn, self.spec.queue, valid)

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
        handled = self.observer.time_handler(self.spec, envelope.routing_key)
        try:
            yield
        finally:
            handled()
            message_context.reset(token)

    def _park(self, conn: Connection, envelope: Envelope, now: datetime, code: str, reason: str) -> Outcome:
        """Park a message with its `command.rejected` in a savepoint of its own."""
        with conn.begin_nested():
            return self.refusals.park(UnitOfWork(conn, envelope, now), code, reason)


@dataclass
class SavepointPerMessage(WindowStrategy):
    """One transaction for the window, a savepoint per message (stock locked as it goes), commit."""

    max_attempts: int

    def apply(self, window: Sequence[Parsed]) -> list[Outcome]:
        with self.engine.begin() as conn:
            outcomes = [self._apply_one(conn, parsed) for parsed in window]
        return outcomes

    def park_alone(self, parsed: Parsed, code: str, reason: str) -> Outcome:
        """Write command.rejected for a message in a transaction of its own (no retries)."""
        with self.engine.begin() as conn:
            return self._park(conn, self.envelope(parsed), self.clock(), code, reason)

    def _apply_one(self, conn: Connection, parsed: Parsed) -> Outcome:
        envelope = self.envelope(parsed)
        now = self.clock()
        with self._in_hand(envelope):
            return self._apply_in_savepoint(conn, parsed, envelope, now)

    def _apply_in_savepoint(
        self, conn: Connection, parsed: Parsed, envelope: Envelope, now: datetime
    ) -> Outcome:
        if parsed.rejection:
            return self._park(conn, envelope, now, *parsed.rejection)
        assert parsed.command is not None
        route = self.spec.routes[envelope.routing_key]
        for race in (1, 2):
            try:
                return self._handle_in_savepoint(conn, envelope, now, route, parsed.command)
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

    def _handle_in_savepoint(
        self, conn: Connection, envelope: Envelope, now: datetime, route: Route[Any], command: Command
    ) -> Outcome:
        """Claim the message and run its handler in a savepoint (rolled back if either raises)."""
        with conn.begin_nested():
            uow = UnitOfWork(conn, envelope, now)
            if not uow.claim():
                return Duplicate()
            route.handler(command, uow)
            uow.flush()
        return Applied()

    def _refuse(
        self,
        conn: Connection,
        envelope: Envelope,
        now: datetime,
        route: Route[Any],
        command: Command,
        refusal: Refusal,
    ) -> Outcome:
        """The refused attempt's savepoint is gone: claim again and write only the refusal."""
        with conn.begin_nested():
            uow = UnitOfWork(conn, envelope, now)
            if not uow.claim():
                return Duplicate()
            self.refusals.announce(route, command, refusal, uow)
        return Applied()

    def _failed(
        self, conn: Connection, envelope: Envelope, now: datetime, parsed: Parsed, exc: Exception
    ) -> Outcome:
        error = error_summary(exc)
        log.error("handler failed", exc_info=exc, extra={"attempts": parsed.delivery.attempts})
        if not retries_left(parsed.delivery, self.max_attempts):
            # Not transient (those are retried as a window): a bug or content the code cannot take.
            reason = failed_reason(parsed.delivery, error)
            return self._park(conn, envelope, now, RejectCode.INTERNAL_ERROR, reason)
        return Retry(error)


@dataclass
class OptimisticWindow(WindowStrategy):
    """One transaction without savepoints, dedup rows claimed together.

    Most windows apply cleanly; the first refusal, park or failure rolls the whole window
    back (NeedsSavepoints) and it is applied again with a savepoint per message.
    """

    def set_based(self, window: Sequence[Parsed]) -> bool:
        """A window with a message of a set-based route (one timer message may carry many timers)."""
        routes = self.spec.routes
        return any(p.command is not None and routes[p.delivery.routing_key].apply_window for p in window)

    def apply(self, window: Sequence[Parsed]) -> list[Outcome]:
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
