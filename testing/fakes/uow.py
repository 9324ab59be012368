"""The unit of work in memory: store/ports.py's UnitOfWork on a `FakeDatabase`.

A handler run on a `FakeUnitOfWork` writes rows into the fake's tables through the fake
repositories (`uow.orders`, `uow.stock`, ... each written by the owner of its SQL twin),
announces events into `db.events` (and an outbox row with the correlation id), starts timers
into `db.timers` and writes the timeline into the order_timeline table. There is no
transaction here: whoever applies a message takes `db.snapshot()` first and restores it when
the message is refused or fails (testing/fakes/service.py does it as the consumer would).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table

from domain.names import EVENTS_EXCHANGE, SCHEMA_VERSION, SCHEMA_VERSION_HEADER
from store.envelope import Envelope
from store.ports import EventLike
from testing.fakes.aftersales import FakeAfterSales
from testing.fakes.catalog import FakeCatalog
from testing.fakes.coupons import FakeCoupons
from testing.fakes.db import FakeDatabase, VirtualClock
from testing.fakes.orders import FakeOrders
from testing.fakes.refunds import FakeRefunds
from testing.fakes.stock import FakeStock


def new_envelope(
    routing_key: str,
    body: Mapping[str, Any],
    consumer: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> Envelope:
    """The envelope of a command as the consumer would make it (a fresh message id if none)."""
    message_id = message_id or str(uuid.uuid4())
    return Envelope(
        consumer=consumer,
        message_id=message_id,
        correlation_id=correlation_id or message_id,
        routing_key=routing_key,
        body=dict(body),
    )


class FakeUnitOfWork:
    """One message's effects on a FakeDatabase; `now` is the clock's time when it was made."""

    def __init__(self, db: FakeDatabase, envelope: Envelope, clock: VirtualClock | None = None) -> None:
        self.db = db
        self.envelope = envelope
        self.clock = clock or db.clock
        self.now: datetime = self.clock.now()
        # What a batched window read up front (Route.prefetch); never, in memory.
        self.prefetched: object | None = None
        self.orders = FakeOrders(self)
        self.stock = FakeStock(self)
        self.coupons = FakeCoupons(self)
        self.refunds = FakeRefunds(self)
        self.aftersales = FakeAfterSales(self)
        self.catalog = FakeCatalog(self)

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.correlation_id or self.envelope.message_id

    def claim(self) -> bool:
        """The dedup row: False when this consumer already applied this message id."""
        if not self.envelope.message_id:
            return True  # nothing to dedup on (the sweeper's envelopes)
        row = {
            "consumer": self.envelope.consumer,
            "message_id": self.envelope.message_id,
            "routing_key": self.envelope.routing_key,
            "processed_at": self.now,
        }
        return self.db.insert_new("processed_messages", row) is not None

    def emit(self, event: EventLike) -> None:
        """Announce an event: (name, body) into db.events, and an outbox row."""
        name, payload = event.name, event.body()
        self.db.events.append((name, payload))
        self.db.insert(
            "outbox",
            {
                "message_id": str(uuid.uuid4()),
                "exchange": EVENTS_EXCHANGE,
                "routing_key": name,
                "correlation_id": self.correlation_id,
                "body": payload,
                "headers": {SCHEMA_VERSION_HEADER: SCHEMA_VERSION},
                "created_at": self.now,
            },
        )

    def start_timer(self, kind: str, ref: str, delay: timedelta, **extra: Any) -> None:
        """Schedule a timer: it is due at now + delay (testing/fakes/service.py fires it)."""
        self.db.timers.append(
            {
                "kind": kind,
                "ref": ref,
                "due_at": self.now + delay,
                "extra": dict(extra),
                "correlation_id": self.correlation_id,
            }
        )

    @contextmanager
    def savepoint(self, envelope: Envelope) -> Iterator[FakeUnitOfWork]:
        """store/uow.py's savepoint: another message's unit of work; if the block raises, what
        it did is rolled back (and only that)."""
        saved = self.db.snapshot()
        one = FakeUnitOfWork(self.db, envelope, self.clock)
        one.now = self.now
        try:
            yield one
        except BaseException:
            self.db.restore(saved)
            raise

    def record(
        self,
        order_no: str,
        action: str,
        from_status: str | None,
        to_status: str | None,
        actor: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a line to the order's timeline (the order_timeline table)."""
        self.db.insert(
            "order_timeline",
            {
                "order_no": order_no,
                "actor": actor,
                "action": action,
                "from_status": from_status,
                "to_status": to_status,
                "detail": dict(detail) if detail else None,
                "message_id": self.envelope.message_id,
                "at": self.now,
            },
        )

    def insert(self, table: Table | str, rows: list[dict[str, Any]]) -> None:
        """Insert rows (store/uow.py's `insert`, for repositories that write through it)."""
        name = table if isinstance(table, str) else table.name
        for row in rows:
            self.db.insert(name, row)

    def flush(self) -> None:
        """Nothing waits: events and rows are in the fake database already."""
