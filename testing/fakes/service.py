"""The whole service in one process, on the fake database: commands in, events out, no I/O.

`InProcessService` builds the consumers' routes with the composition root (consumers/registry.py)
and applies each command the way a consumer applies a message alone in its window
(consumers/strategies.py `SavepointPerMessage`): checked against the contract by the loop's own
`validate`, deduplicated on (queue, message_id), handled on a `FakeUnitOfWork` inside a snapshot
of the fake database, which is restored when the business refuses it (then only the refusal is
written, through the same `Refusals` the loop uses) or when it is parked (`command.rejected`).
Timers are fired as the virtual clock passes their due time (`advance`), through the timeouts
route, with the TimerFired body the relay and the delay queue would deliver.

Unlike the real consumer, a handler that fails is not retried and parked: it raises
`HandlerFailed` (in memory nothing is transient, so a failure is a bug of a handler or a fake).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pika
from sqlalchemy.exc import IntegrityError

from consumers import wire
from consumers.delivery import Delivery, Parsed, validate
from consumers.observer import NullObserver
from consumers.outcomes import Applied, Duplicate, Outcome
from consumers.refusals import Refusals
from consumers.registry import consumer_specs
from consumers.routes import ConsumerSpec
from domain.errors import ConcurrentUpdate, ParkCommand, Refusal
from domain.names import (
    COMMANDS_EXCHANGE,
    SCHEMA_VERSION,
    SCHEMA_VERSION_HEADER,
    TIMERS_FIRED_EXCHANGE,
    UNROUTED_EXCHANGE,
    UNROUTED_QUEUE,
    Timer,
)
from settings import Settings
from store.envelope import Envelope
from testing.fakes.db import FakeDatabase, VirtualClock
from testing.fakes.uow import FakeUnitOfWork


class HandlerFailed(Exception):
    """A handler raised something else than a refusal or a park (a bug, in memory)."""


@dataclass(frozen=True)
class Answer:
    """What one message led to: its outcome and the events it caused, in order."""

    outcome: Outcome
    events: list[tuple[str, dict[str, Any]]]
    timer: Mapping[str, Any] | None = None  # the timer fired, for a timer's answer

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def of(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [b for n, b in self.events if n == name and all(b.get(k) == v for k, v in fields.items())]


class InProcessService:
    """Every consumer of the service on one FakeDatabase; `send` a command, `advance` time."""

    def __init__(
        self,
        settings: Settings,
        clock: VirtualClock | None = None,
        specs: Mapping[str, ConsumerSpec] | None = None,
    ) -> None:
        """`specs`: the consumers to run (queue -> spec); the composition root's by default."""
        self.settings = settings
        self.clock = clock or VirtualClock()
        self.db = FakeDatabase(self.clock)
        self.specs: dict[str, ConsumerSpec] = dict(specs) if specs is not None else consumer_specs(settings)
        # What no consumer knows goes to the unrouted queue (the alternate exchange), and is parked.
        self.specs.setdefault(UNROUTED_QUEUE, ConsumerSpec(UNROUTED_QUEUE, {}, ((UNROUTED_EXCHANGE, ""),)))
        # Which queue a routing key reaches: the one whose bindings name it (order.commands, or
        # the fired timers' exchange, bound with `timer.#`), else the unrouted queue.
        self.queue_of: dict[str, str] = {}
        for spec in self.specs.values():
            for key in spec.routes:
                self.queue_of.setdefault(key, spec.queue)
        self.refusals = {q: Refusals(spec, NullObserver()) for q, spec in self.specs.items()}
        self.answers: list[Answer] = []  # every message's answer, timers included, in order
        self._tag = 0

    # -- commands ---------------------------------------------------------------------------------

    def send(
        self,
        routing_key: str,
        body: Mapping[str, Any] | bytes,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> Outcome:
        """Apply one command as its consumer would; its events land in db.events (and in
        `self.answers[-1]`). A fresh message id unless one is given (re-send one to test dedup)."""
        return self.deliver(
            routing_key,
            body,
            message_id=message_id or str(uuid.uuid4()),
            headers=headers,
            correlation_id=correlation_id,
        ).outcome

    def deliver(
        self,
        routing_key: str,
        body: Mapping[str, Any] | bytes,
        message_id: str | None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        exchange: str = COMMANDS_EXCHANGE,
    ) -> Answer:
        """`send`, returning the Answer (outcome and events); message_id None sends none."""
        raw = body if isinstance(body, bytes) else json.dumps(dict(body)).encode()
        properties = pika.BasicProperties(
            message_id=message_id,
            correlation_id=correlation_id,
            content_type="application/json",
            delivery_mode=2,
            headers=dict(headers) if headers is not None else {SCHEMA_VERSION_HEADER: SCHEMA_VERSION},
        )
        self._tag += 1
        delivery = Delivery(self._tag, routing_key, exchange, properties, raw)
        spec = self.specs[self.queue_of.get(routing_key, UNROUTED_QUEUE)]
        before = len(self.db.events)
        outcome = self._apply(spec, validate(delivery, spec.routes))
        answer = Answer(outcome, list(self.db.events[before:]))
        self.answers.append(answer)
        return answer

    def _envelope(self, spec: ConsumerSpec, parsed: Parsed) -> Envelope:
        """As consumers/strategies.py `WindowStrategy.envelope` makes it."""
        d = parsed.delivery
        message_id, correlation_id, routing_key = d.message_id, d.properties.correlation_id, d.routing_key
        if parsed.rejection is not None:
            message_id = wire.printable(message_id, wire.MAX_ID_CHARS) if message_id else None
            correlation_id = wire.printable(correlation_id, wire.MAX_ID_CHARS) if correlation_id else None
            routing_key = wire.printable(routing_key, wire.MAX_ID_CHARS)
        return Envelope(
            consumer=spec.queue,
            message_id=message_id,
            correlation_id=correlation_id or message_id,
            routing_key=routing_key,
            body=parsed.raw or {},
        )

    def _uow(self, envelope: Envelope) -> FakeUnitOfWork:
        return FakeUnitOfWork(self.db, envelope, self.clock)

    def _apply(self, spec: ConsumerSpec, parsed: Parsed) -> Outcome:
        """consumers/strategies.py `SavepointPerMessage._apply_in_savepoint`, on the fake."""
        envelope = self._envelope(spec, parsed)
        refusals = self.refusals[spec.queue]
        if parsed.rejection:
            return refusals.park(self._uow(envelope), *parsed.rejection)  # type: ignore[arg-type]
        assert parsed.command is not None
        route = spec.routes[envelope.routing_key]
        for race in (1, 2):
            savepoint = self.db.snapshot()
            try:
                uow = self._uow(envelope)
                if not uow.claim():
                    return Duplicate()
                route.handler(parsed.command, uow)
                return Applied()
            except Refusal as refusal:
                self.db.restore(savepoint)
                uow = self._uow(envelope)
                if not uow.claim():
                    return Duplicate()
                refusals.announce(route, parsed.command, refusal, uow)  # type: ignore[arg-type]
                return Applied()
            except ParkCommand as park:
                self.db.restore(savepoint)
                return refusals.park(self._uow(envelope), park.code, park.reason)  # type: ignore[arg-type]
            except (IntegrityError, ConcurrentUpdate) as exc:
                self.db.restore(savepoint)
                if race == 1:  # the loop looks once more (a concurrent writer's row): so do we
                    continue
                raise HandlerFailed(f"{envelope.routing_key}: {exc!r} twice") from exc
            except Exception as exc:
                self.db.restore(savepoint)
                raise HandlerFailed(f"{envelope.routing_key} {dict(envelope.body)}: {exc!r}") from exc
        raise AssertionError("unreachable")

    # -- time -------------------------------------------------------------------------------------

    def advance(self, delta: timedelta) -> list[Answer]:
        """Move the clock by `delta`, firing every timer that falls due on the way, in due order
        (the clock stands at each one's due time while it is applied); their answers."""
        target = self.clock.now() + delta
        fired: list[Answer] = []
        while True:
            due = [t for t in self.db.timers if t["due_at"] <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t["due_at"])
            self.db.timers.remove(timer)
            if timer["due_at"] > self.clock.now():
                self.clock.set(timer["due_at"])
            fired.append(self.fire(timer))
        if target > self.clock.now():
            self.clock.set(target)
        return fired

    def fire(self, timer: Mapping[str, Any]) -> Answer:
        """Deliver one timer to the timeouts queue as its delay queue dead-letters it: the body
        the outbox row had (kind, ref, due_at, extra fields), a fresh message id, the correlation
        id of the command that started it."""
        body = {
            "kind": timer["kind"],
            "ref": timer["ref"],
            "due_at": timer["due_at"].isoformat(),
            **timer.get("extra", {}),
        }
        answer = self.deliver(
            Timer.fired_key(timer["kind"]),
            body,
            message_id=str(uuid.uuid4()),
            correlation_id=timer.get("correlation_id"),
            exchange=TIMERS_FIRED_EXCHANGE,
        )
        answer = replace(answer, timer=timer)
        self.answers[-1] = answer
        return answer

    def pending_timers(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [t for t in self.db.timers if kind is None or t["kind"] == kind]
