"""The database side of timers: the sweeper's transactions, and the types timer kinds are made of.

A timer kind's `overdue` query and its optional set-based `fire_many` run on a connection of
their own module in store/ (SQL stays in store/); consumers/timers.py only names their types,
which are spelled here. The sweeper (consumers/timeouts.py) decides what to apply and logs;
`sweep_batch` gives it one transaction per batch, in which `SweepBatch.apply` runs each lost
timer in a savepoint of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Connection, Engine

from store.envelope import Envelope
from store.uow import UnitOfWork

# The connection and engine a timer kind's store functions and the sweeper get (opaque to
# consumers/: they pass them on, never use them).
Database = Engine
Transaction = Connection

# refs whose deadline is before `cutoff` and still pending, at most `limit`, selected
# `FOR UPDATE SKIP LOCKED` so that several sweepers share the work.
OverdueQuery = Callable[[Connection, datetime, int], list[str]]
# What `fire` does, for a whole window of timers at once: (conn, now, [(ref, envelope)]).
FireMany = Callable[[Connection, datetime, list[tuple[str, Envelope]]], None]


class SweepBatch:
    """One sweeper transaction: a kind's overdue refs, each applied in a savepoint."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def overdue(self, query: OverdueQuery, cutoff: datetime, limit: int) -> list[str]:
        return query(self.conn, cutoff, limit)

    def apply(self, envelope: Envelope, now: datetime, fire: Callable[[UnitOfWork], None]) -> None:
        """Run `fire` on a unit of work of its own in a savepoint; an exception rolls back only it."""
        with self.conn.begin_nested():
            uow = UnitOfWork(self.conn, envelope, now)
            fire(uow)
            uow.flush()

    @property
    def lost(self) -> bool:
        """The connection is gone: nothing more can be done in this transaction."""
        return self.conn.invalidated


@contextmanager
def sweep_batch(engine: Engine) -> Iterator[SweepBatch]:
    """A transaction for one batch of the sweeper, committed when the block ends."""
    with engine.begin() as conn:
        yield SweepBatch(conn)
