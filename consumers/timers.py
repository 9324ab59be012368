"""Durable business timers: a kind is a few lines (what to do when it fires, what is overdue).

Scheduling: `uow.start_timer(kind, ref, delay)` writes a timer message to the outbox; the relay
publishes it to the delay queue `order.timer.<kind>.<duration>` (queue-level TTL), which
dead-letters it to the timeouts queue when the delay has passed. The timers a window starts
with the same delay and due time are merged into one message (`store.uow.coalesce_timers`).
The backstop sweeper asks each kind for refs whose deadline passed a grace period ago, in case
a timer message was lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from store.ports import UnitOfWork
from store.timers import FireMany, OverdueQuery


@dataclass(frozen=True)
class TimerKind:
    """One kind of timer.

    fire(uow, ref): apply the timeout to `ref` if it still applies (a guarded, idempotent
        transition; a timer for something already settled changes nothing).
    overdue(conn, cutoff, limit): refs whose deadline is before `cutoff` and still pending,
        selected `FOR UPDATE SKIP LOCKED` so that several sweepers share the work (a store/
        function: store.timers.OverdueQuery).
    fire_many(conn, now, timers): optional, what `fire` does for each of many timers, set-based
        (store.timers.FireMany).
    """

    kind: str
    fire: Callable[[UnitOfWork, str], None]
    overdue: OverdueQuery
    # Optional: the same effects for a whole window of timers at once (conn, now, [(ref, envelope)]).
    fire_many: FireMany | None = None
    # How long after its start the timer fires (from settings): topology declares one delay
    # queue per kind from it.
    delay: timedelta = field(kw_only=True)
