"""The backstop sweeper: one failing ref never blocks the others, and a pass always ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Connection, Engine

import metrics
from consumers import timeouts
from consumers.timers import TimerKind
from domain.errors import Refusal
from settings import Settings
from store.uow import UnitOfWork


class FakeConnection:
    """Savepoints that undo what a failing ref did (what PostgreSQL does for the sweeper)."""

    invalidated = False

    def __init__(self, db: FakeDb) -> None:
        self.db = db

    @contextmanager
    def begin_nested(self) -> Iterator[None]:
        before = set(self.db.done)
        try:
            yield
        except BaseException:
            self.db.done = before  # rolled back to the savepoint
            raise


class FakeDb:
    def __init__(self, overdue: list[str]) -> None:
        self.pending = list(overdue)
        self.done: set[str] = set()
        self.queries: list[int] = []
        self.commits = 0

    def overdue(self, _conn: Connection, _cutoff: datetime, limit: int) -> list[str]:
        self.queries.append(limit)
        return [ref for ref in self.pending if ref not in self.done][:limit]

    @contextmanager
    def begin(self) -> Iterator[FakeConnection]:
        yield FakeConnection(self)
        self.commits += 1
        self.pending = [ref for ref in self.pending if ref not in self.done]


def run_sweep(db: FakeDb, fire: Any) -> None:
    kind = TimerKind("payment-timeout", fire, db.overdue, delay=timedelta(minutes=15))
    settings = Settings(sweeper_grace=timedelta(seconds=1), payment_webhook_secret="x" * 32)
    timeouts.sweeper([kind], metrics.MetricsObserver())(cast(Engine, db), settings)


def test_a_failing_ref_does_not_stop_the_others_of_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    db = FakeDb(["O1", "O2", "BAD", "O3", "REFUSED", "O4"])
    envelopes = []

    def fire(uow: UnitOfWork, ref: str) -> None:
        envelopes.append(uow.envelope)
        db.done.add(ref)
        if ref == "BAD":
            raise RuntimeError("boom")  # after a write: the savepoint must undo it
        if ref == "REFUSED":
            raise Refusal("INVALID_STATE", "settled already")

    failed = metrics.SWEEPER_FAILED.labels("payment-timeout")._value.get()
    run_sweep(db, fire)
    # Every other ref was applied and committed; the failing one was rolled back and counted
    assert db.pending == ["BAD", "REFUSED"]
    assert db.commits == 1
    assert metrics.SWEEPER_FAILED.labels("payment-timeout")._value.get() == failed + 1
    # And each ref's events carry a correlation id of their own
    assert {e.correlation_id for e in envelopes} == {
        f"sweeper:payment-timeout:{ref}" for ref in ("O1", "O2", "BAD", "O3", "REFUSED", "O4")
    }
    assert {e.message_id for e in envelopes} == {None}


def test_refs_that_keep_failing_do_not_make_a_pass_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given more overdue refs than a batch, whose first ones always fail
    monkeypatch.setattr(timeouts, "SWEEP_BATCH", 3)
    db = FakeDb(["BAD1", "BAD2", "O1", "O2", "O3", "O4", "O5"])
    fired: list[str] = []

    def fire(_uow: UnitOfWork, ref: str) -> None:
        fired.append(ref)
        if ref.startswith("BAD"):
            raise ValueError(ref)
        db.done.add(ref)

    run_sweep(db, fire)
    # Then the pass tried each ref once, applied the good ones, and ended
    assert sorted(fired) == ["BAD1", "BAD2", "O1", "O2", "O3", "O4", "O5"]
    assert db.pending == ["BAD1", "BAD2"]
    assert len(db.queries) <= 4


def test_a_ref_that_stays_overdue_does_not_make_a_pass_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeouts, "SWEEP_BATCH", 2)
    db = FakeDb(["A", "B", "C"])
    fired: list[str] = []
    run_sweep(db, lambda _uow, ref: fired.append(ref))  # changes nothing: all stay overdue
    assert fired == ["A", "B"]  # each once; the pass ended (C waits for the next one)


def test_a_lost_connection_ends_the_pass() -> None:
    db = FakeDb(["O1", "O2"])

    def fire(uow: UnitOfWork, _ref: str) -> None:
        cast(Any, uow.conn).invalidated = True
        raise ConnectionError("gone")

    with pytest.raises(ConnectionError):
        run_sweep(db, fire)
    assert db.commits == 0
