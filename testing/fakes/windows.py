"""A window of timers in memory: store/windows.py `SqlTimerWindow` on a FakeDatabase.

Each timer gets a FakeUnitOfWork with its own envelope; in memory nothing waits for a write,
so the events are in `db.events` in the order the units emitted them, as the SQL window's
shared outbox list writes them.
"""

from __future__ import annotations

from store.envelope import Envelope
from testing.fakes.db import FakeDatabase
from testing.fakes.uow import FakeUnitOfWork


class FakeTimerWindow:
    """store.ports.TimerWindow over a FakeDatabase: `timers` are (ref, envelope) as fire_many gets them."""

    def __init__(self, db: FakeDatabase, timers: list[tuple[str, Envelope]]) -> None:
        self.db = db
        self.now = db.clock.now()
        self._envelopes = dict(timers)  # a ref named twice is applied once
        self.refs = list(self._envelopes)
        self._units: dict[str, FakeUnitOfWork] = {}

    def unit(self, ref: str) -> FakeUnitOfWork:
        unit = self._units.get(ref)
        if unit is None:
            unit = self._units[ref] = FakeUnitOfWork(self.db, self._envelopes[ref])
        return unit
