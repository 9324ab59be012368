"""Windows of timers applied set-based on PostgreSQL: the `store.ports.TimerWindow` a
TimerKind's `fire_many` decides on (consumers/), and the adapter that gives it one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection

from store.envelope import Envelope
from store.ports import TimerWindow
from store.uow import OutboxRow, UnitOfWork, WriteBuffer


class SqlTimerWindow:
    """A unit of work per timer, sharing one write buffer and one outbox list: the window's
    timeline rows go out in one insert, its events in the order the units emitted them."""

    def __init__(self, conn: Connection, now: datetime, timers: list[tuple[str, Envelope]]) -> None:
        self.conn = conn
        self.now = now
        self._envelopes = dict(timers)  # a ref named twice is applied once
        self.refs = list(self._envelopes)
        self._buffer = WriteBuffer()
        self._outgoing: list[OutboxRow] = []
        self._units: dict[str, UnitOfWork] = {}

    def unit(self, ref: str) -> UnitOfWork:
        unit = self._units.get(ref)
        if unit is None:
            unit = self._units[ref] = UnitOfWork(
                self.conn, self._envelopes[ref], self.now, buffer=self._buffer
            )
            unit.outgoing = self._outgoing  # one list: the window's events in emission order
        return unit

    def write(self) -> None:
        """Write the window's buffered rows (timeline, outbox) in one insert per table."""
        if self._units:
            next(iter(self._units.values())).flush()  # the shared outbox list, into the buffer
        self._buffer.write(self.conn)


def windowed(
    apply: Callable[[TimerWindow], None],
) -> Callable[[Connection, datetime, list[tuple[str, Envelope]]], None]:
    """A TimerKind's `fire_many` (conn, now, timers) from a decision written against TimerWindow."""

    def fire_many(conn: Connection, now: datetime, timers: list[tuple[str, Envelope]]) -> None:
        window = SqlTimerWindow(conn, now, timers)
        apply(window)
        window.write()

    return fire_many
