"""Queue order.timeouts: timers that ran out (from the delay queues), and the backstop sweeper."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from consumers import wire
from consumers.delivery import Delivery
from consumers.observer import NullObserver, Observer
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import TimerFired
from consumers.timers import TimerKind
from domain.errors import Refusal
from domain.names import TIMEOUTS_QUEUE, TIMERS_FIRED_EXCHANGE, Timer
from settings import Settings
from store.envelope import Envelope
from store.ports import UnitOfWork
from store.timers import Database, SweepBatch, Transaction, sweep_batch

NULL_OBSERVER = NullObserver()
log = logging.getLogger("timeouts")
SWEEP_BATCH = 500


def _targets(cmd: TimerFired, envelope: Envelope) -> list[tuple[str, Envelope]]:
    """Each timer a message carries, with an envelope that has its own command's correlation id."""
    return [
        (ref, envelope if cid == envelope.correlation_id else replace(envelope, correlation_id=cid))
        for ref, cid in cmd.targets(envelope.correlation_id)
    ]


def _fire(kind: TimerKind) -> Route[TimerFired]:
    def on_timer(cmd: TimerFired, uow: UnitOfWork) -> None:
        if cmd.ref is not None:
            kind.fire(uow, cmd.ref)
            return
        # Several timers: each in a savepoint of its own, so that one refused leaves the others.
        for ref, envelope in _targets(cmd, uow.envelope):
            try:
                with uow.savepoint(envelope) as one:
                    kind.fire(one, ref)
            except Refusal:
                continue

    apply_window = None
    if kind.fire_many is not None:
        fire_many = kind.fire_many

        def apply_window(conn: Transaction, now: datetime, items: list[tuple[TimerFired, Envelope]]) -> None:
            fire_many(conn, now, [target for cmd, envelope in items for target in _targets(cmd, envelope)])

    return Route(TimerFired, on_timer, apply_window=apply_window)


def sweep_envelope(kind: str, ref: str) -> Envelope:
    """What the sweeper applies a lost timer under: no command, so no message id (the timeline
    shows it as the sweeper's), and a correlation id of its own, the same for every sweep of the
    ref, so the events it causes can be traced (their outbox message ids are fresh UUIDs)."""
    return Envelope("sweeper", None, f"sweeper:{kind}:{ref}", Timer.fired_key(kind))


def sweeper(
    kinds: list[TimerKind], observer: Observer = NULL_OBSERVER
) -> Callable[[Database, Settings], None]:
    """The backstop: applies timeouts whose timer message never came (queue purged, data lost)."""

    def sweep(engine: Database, settings: Settings) -> None:
        for kind in kinds:
            sweep_kind(engine, settings, kind, observer)

    return sweep


def sweep_kind(
    engine: Database, settings: Settings, kind: TimerKind, observer: Observer = NULL_OBSERVER
) -> None:
    """One pass over one kind's overdue refs, in batches, each ref in a savepoint of its own.

    A ref that fails (any exception) is logged, counted and rolled back to its savepoint; the
    rest of its batch goes on. Refs handled once in this pass (applied, refused or failed) are
    not tried again before the next pass, so a ref that keeps failing (or stays overdue) can
    neither block the others nor keep the pass looping on the same batch.
    """
    seen: set[str] = set()
    skipped = 0  # refused or failed in this pass, yet still overdue: they come back in each batch
    while True:
        now = datetime.now(UTC)
        limit = SWEEP_BATCH + skipped
        applied = failed = 0
        with sweep_batch(engine) as batch:
            overdue = batch.overdue(kind.overdue, now - settings.sweeper_grace, limit)
            refs = [ref for ref in overdue if ref not in seen]
            for ref in refs:
                seen.add(ref)
                outcome = _sweep_one(batch, kind, ref, now, observer)
                applied += outcome == "applied"
                failed += outcome == "failed"
                skipped += outcome != "applied"
        if applied:
            log.warning("sweeper applied lost timers", extra={"kind": kind.kind, "count": applied})
        if failed:
            log.error("sweeper could not apply some timers", extra={"kind": kind.kind, "count": failed})
        if not refs or len(overdue) < limit:
            break
        if skipped >= SWEEP_BATCH:
            log.error(
                "sweeper pass stopped: too many timers failing", extra={"kind": kind.kind, "skipped": skipped}
            )
            break


def _sweep_one(batch: SweepBatch, kind: TimerKind, ref: str, now: datetime, observer: Observer) -> str:
    """Apply one lost timer in a savepoint: "applied", "refused" or "failed" (rolled back)."""
    try:
        batch.apply(sweep_envelope(kind.kind, ref), now, lambda uow: kind.fire(uow, ref))
    except Refusal:
        return "refused"
    except Exception:
        if batch.lost:  # the connection is gone: nothing more can be done in this transaction
            raise
        log.exception("sweeper failed to apply a timer", extra={"kind": kind.kind, "ref": ref})
        observer.sweeper_failed(kind.kind)
        return "failed"
    return "applied"


def due_at(delivery: Delivery) -> datetime | None:
    """A fired timer's due time, from its body; None (apply at once) for anything unreadable,
    which validation then parks. Timers leave their delay queue TIMER_LEAD_MS early."""
    try:
        text = delivery.body.decode("utf-8")
        if wire.nested_deeper_than(text, wire.PARSER_DEPTH):
            return None  # never handed to the parser (validation refuses it)
        value = json.loads(text).get("due_at")
        due = datetime.fromisoformat(value) if isinstance(value, str) else None
    except (ValueError, AttributeError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if due is not None and due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    return due


def spec(settings: Settings, kinds: list[TimerKind], observer: Observer = NULL_OBSERVER) -> ConsumerSpec:
    """The order.timeouts consumer: a route for each timer kind in `kinds` (gathered by
    consumers/registry.py from the modules that start them), and their backstop sweeper
    (reporting to `observer`)."""
    routes = {Timer.fired_key(k.kind): _fire(k) for k in kinds}
    # Bind every timer kind, even one with no handler yet, so fired timers are never unroutable.
    bindings = ((TIMERS_FIRED_EXCHANGE, "timer.#"),)
    return ConsumerSpec(
        TIMEOUTS_QUEUE,
        routes,
        bindings,
        periodic=sweeper(kinds, observer),
        due_at=due_at,
        prefetch=settings.timer_prefetch,
    )
