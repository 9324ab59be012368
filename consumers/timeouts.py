"""Queue order.timeouts: timers that ran out (from the delay queues), and the backstop sweeper."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine

from consumers import aftersale, fulfillment, payment
from consumers.loop import ConsumerSpec, Delivery, Route
from consumers.schemas import TimerFired
from consumers.timers import TimerKind
from domain.errors import Refusal
from domain.names import TIMEOUTS_QUEUE, TIMERS_FIRED_EXCHANGE, Timer
from settings import Settings
from store.uow import Envelope, UnitOfWork

log = logging.getLogger("timeouts")
SWEEP_BATCH = 500


def timer_kinds(settings: Settings) -> list[TimerKind]:
    return [
        *payment.timer_kinds(settings),
        *fulfillment.timer_kinds(settings),
        *aftersale.timer_kinds(settings),
    ]


def _targets(cmd: TimerFired, envelope: Envelope) -> list[tuple[str, Envelope]]:
    """Each timer a message carries, with an envelope that has its own command's correlation id."""
    return [
        (ref, envelope if cid == envelope.correlation_id else replace(envelope, correlation_id=cid))
        for ref, cid in cmd.targets(envelope.correlation_id)
    ]


def _fire(kind: TimerKind) -> Route:
    def on_timer(cmd: TimerFired, uow: UnitOfWork) -> None:
        if cmd.ref is not None:
            kind.fire(uow, cmd.ref)
            return
        # Several timers: each in a savepoint of its own, so that one refused leaves the others.
        for ref, envelope in _targets(cmd, uow.envelope):
            try:
                with uow.conn.begin_nested():
                    one = UnitOfWork(uow.conn, envelope, uow.now, uow.window_stock)
                    kind.fire(one, ref)
                    one.flush()
            except Refusal:
                continue

    apply_window = None
    if kind.fire_many is not None:
        fire_many = kind.fire_many

        def apply_window(conn: Connection, now: datetime, items: list[tuple[TimerFired, Envelope]]) -> None:
            fire_many(conn, now, [target for cmd, envelope in items for target in _targets(cmd, envelope)])

    return Route(TimerFired, on_timer, apply_window=apply_window)


def sweeper(kinds: list[TimerKind]) -> Callable[[Engine, Settings], None]:
    """The backstop: applies timeouts whose timer message never came (queue purged, data lost)."""

    def sweep(engine: Engine, settings: Settings) -> None:
        for kind in kinds:
            while True:
                now = datetime.now(UTC)
                with engine.begin() as conn:
                    refs = kind.overdue(conn, now - settings.sweeper_grace, SWEEP_BATCH)
                    for ref in refs:
                        envelope = Envelope("sweeper", None, None, Timer.fired_key(kind.kind))
                        try:
                            with conn.begin_nested():
                                uow = UnitOfWork(conn, envelope, now)
                                kind.fire(uow, ref)
                                uow.flush()
                        except Refusal:
                            continue
                if refs:
                    log.warning("sweeper applied lost timers", extra={"kind": kind.kind, "count": len(refs)})
                if len(refs) < SWEEP_BATCH:
                    break

    return sweep


def due_at(delivery: Delivery) -> datetime | None:
    """A fired timer's due time, from its body; None (apply at once) for anything unreadable,
    which validation then parks. Timers leave their delay queue TIMER_LEAD_MS early."""
    try:
        value = json.loads(delivery.body).get("due_at")
        due = datetime.fromisoformat(value) if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None
    if due is not None and due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    return due


def spec(settings: Settings) -> ConsumerSpec:
    kinds = timer_kinds(settings)
    routes = {Timer.fired_key(k.kind): _fire(k) for k in kinds}
    # Bind every timer kind, even one with no handler yet, so fired timers are never unroutable.
    bindings = ((TIMERS_FIRED_EXCHANGE, "timer.#"),)
    return ConsumerSpec(
        TIMEOUTS_QUEUE,
        routes,
        bindings,
        periodic=sweeper(kinds),
        due_at=due_at,
        prefetch=settings.timer_prefetch,
    )
