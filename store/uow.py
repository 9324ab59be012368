"""The unit of work: one message's database effects, its dedup row and its outbox rows."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Table, delete, text
from sqlalchemy.dialects.postgresql import JSONB

from domain.names import EVENTS_EXCHANGE, SCHEMA_VERSION, SCHEMA_VERSION_HEADER, TIMERS_EXCHANGE
from settings import format_duration
from store import tables as t
from store.aftersales import SqlAfterSales
from store.catalog import SqlCatalog
from store.coupons import SqlCoupons
from store.envelope import Envelope as Envelope
from store.orders import SqlOrders
from store.ports import EventLike
from store.refunds import SqlRefunds
from store.stock import SqlStock, WindowStockLocks


@dataclass
class OutboxRow:
    exchange: str
    routing_key: str
    body: dict[str, Any]
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=lambda: {SCHEMA_VERSION_HEADER: SCHEMA_VERSION})


def timer_routing_key(kind: str, delay: timedelta) -> str:
    """The routing key on order.timers that reaches the delay queue of this kind and duration."""
    return f"{kind}.{format_duration(delay)}"


class UnitOfWork:
    """Effects of one message inside the caller's transaction (or savepoint), on PostgreSQL.

    It implements store.ports.UnitOfWork: handlers read and write through its repositories
    (`orders`, `stock`, `coupons`, `catalog`, `refunds`, `aftersales`), announce events with
    `emit`, schedule timers with `start_timer` and write the order timeline with `record`. The
    consumer loop alone uses `conn`, `claim`, `flush` and the window's write buffer. Nothing
    reaches the broker until the transaction commits and the relay publishes the outbox rows.
    """

    def __init__(
        self,
        conn: Connection,
        envelope: Envelope,
        now: datetime,
        window_stock: WindowStockLocks | None = None,
        buffer: WriteBuffer | None = None,
    ) -> None:
        self.conn = conn
        self.envelope = envelope
        self.now = now
        self.outgoing: list[OutboxRow] = []
        self.window_stock = window_stock
        self.stock_reserved: dict[tuple[str, str], int] = {}
        # With a buffer, inserts wait for the window's end (one multi-row insert per table).
        self.buffer = buffer
        # What the route read for the whole window up front (Route.prefetch), if anything.
        self.prefetched: object | None = None
        # Repositories (store.ports): each reads and writes through this unit of work.
        self.orders = SqlOrders(self)
        self.stock = SqlStock(self)
        self.coupons = SqlCoupons(self)
        self.catalog = SqlCatalog(self)
        self.aftersales = SqlAfterSales(self)
        self.refunds = SqlRefunds(self)

    @contextmanager
    def savepoint(self, envelope: Envelope) -> Iterator[UnitOfWork]:
        """A unit of work for another message's effects (a timer of a merged timer message)
        inside a savepoint of this one's transaction: if the block raises, only it is rolled back."""
        with self.conn.begin_nested():
            one = UnitOfWork(self.conn, envelope, self.now, self.window_stock)
            yield one
            one.flush()

    def insert(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert rows now, or into the window's write buffer when the window batches its writes."""
        if not rows:
            return
        if self.buffer is not None:
            self.buffer.add(table, rows)
        else:
            insert_rows(self.conn, table, rows)

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.correlation_id or self.envelope.message_id

    def claim(self) -> bool:
        """Insert the dedup row; False when this consumer already applied this message id."""
        return self.envelope.message_id in claim_all(self.conn, self.envelope.consumer, [self.envelope])

    def emit(self, event: EventLike) -> None:
        """Announce an event on order.events (published after commit)."""
        name, payload = event.name, event.body()
        self.outgoing.append(OutboxRow(EVENTS_EXCHANGE, name, payload, correlation_id=self.correlation_id))

    def start_timer(self, kind: str, ref: str, delay: timedelta, **extra: Any) -> None:
        """Schedule a durable timer: it fires on the timeouts queue after `delay`."""
        body = {"kind": kind, "ref": ref, "due_at": (self.now + delay).isoformat(), **extra}
        self.outgoing.append(
            OutboxRow(
                TIMERS_EXCHANGE, timer_routing_key(kind, delay), body, correlation_id=self.correlation_id
            )
        )

    def record(
        self,
        order_no: str,
        action: str,
        from_status: str | None,
        to_status: str | None,
        actor: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a line to the order's timeline (the operation log)."""
        self.insert(
            t.order_timeline,
            [
                {
                    "order_no": order_no,
                    "actor": actor,
                    "action": action,
                    "from_status": from_status,
                    "to_status": to_status,
                    "detail": dict(detail) if detail else None,
                    "message_id": self.envelope.message_id,
                    "at": self.now,
                }
            ],
        )

    def flush(self) -> None:
        """Write the collected outbox rows in one statement."""
        if not self.outgoing:
            return
        self.insert(
            t.outbox,
            [
                {
                    "message_id": row.message_id,
                    "exchange": row.exchange,
                    "routing_key": row.routing_key,
                    "correlation_id": row.correlation_id,
                    "body": row.body,
                    "headers": row.headers,
                }
                for row in self.outgoing
            ],
        )
        self.outgoing.clear()


class WriteBuffer:
    """Inserts of a whole window, written once per table just before commit.

    Only handlers that read before they write and write through `UnitOfWork.insert` may be
    batched this way (Route.batchable): a refusal then simply drops that message's buffered rows.
    """

    # Parents before children, so foreign keys hold within the window's statements.
    ORDER = ("orders", "order_items", "stock_locks", "order_timeline", "outbox")

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Table, list[dict[str, Any]]]] = {}

    def add(self, table: Table, rows: list[dict[str, Any]]) -> None:
        self.rows.setdefault(table.name, (table, []))[1].extend(rows)

    def merge(self, other: WriteBuffer) -> None:
        for table, rows in other.rows.values():
            self.add(table, rows)

    def write(self, conn: Connection) -> None:
        """One multi-row insert per table (rows with the same columns go together)."""
        names = sorted(
            self.rows, key=lambda name: (self.ORDER.index(name) if name in self.ORDER else 99, name)
        )
        for name in names:
            table, rows = self.rows[name]
            insert_rows(conn, table, coalesce_timers(rows) if table is t.outbox else rows)


# A window's timers that share a delay queue and a due time travel as one message (at most this
# many refs): the broker then stores, expires and dead-letters one message instead of a window's
# worth, and the timeouts consumer applies them together, as it would have anyway.
TIMER_BATCH_MAX = 500
_SINGLE_TIMER_KEYS = frozenset(("kind", "ref", "due_at"))


def coalesce_timers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outbox rows with the timers of the same delay queue and due time merged into one row.

    The merged body names `refs` and, one for one, the `correlation_ids` of the commands that
    started them (the events a timer causes carry its command's correlation id). A timer with
    extra fields, or alone in its group, stays as it was; other rows are untouched, in order.
    """
    out: list[dict[str, Any] | list[dict[str, Any]]] = []
    open_groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        body = row["body"]
        if row["exchange"] != TIMERS_EXCHANGE or body.keys() != _SINGLE_TIMER_KEYS:
            out.append(row)
            continue
        key = (row["routing_key"], body["kind"], body["due_at"])
        group = open_groups.get(key)
        if group is None or len(group) == TIMER_BATCH_MAX:
            group = open_groups[key] = []
            out.append(group)
        group.append(row)
    return [item if isinstance(item, dict) else _merged_timer(item) for item in out]


def _merged_timer(group: list[dict[str, Any]]) -> dict[str, Any]:
    first = group[0]
    if len(group) == 1:
        return first
    body = {
        "kind": first["body"]["kind"],
        "due_at": first["body"]["due_at"],
        "refs": [row["body"]["ref"] for row in group],
        "correlation_ids": [row["correlation_id"] for row in group],
    }
    return {**first, "body": body, "correlation_id": None}


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` on the connection's transaction: one COPY per set of columns.

    COPY's text format costs PostgreSQL about half of what a multi-row INSERT of the same rows
    does (no SQL literals to parse and cast), and it fires the same insert triggers (the outbox's
    NOTIFY). SQLAlchemy's executemany would also compile a statement for each new row count and
    run every value through its type processors in Python. JSONB values are serialized as
    SQLAlchemy would write them (None becomes JSON null).
    """
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        for columns, group in by_columns.items():
            # Column by column: one converter per column, mapped over its values.
            texts = []
            for name in columns:
                convert = json_text if isinstance(table.c[name].type, JSONB) else copy_text
                texts.append(list(map(convert, [row[name] for row in group])))
            lines = map("\t".join, zip(*texts, strict=True))
            # Names from our own tables, never from a message.
            cursor.copy_expert(
                f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", io.StringIO("\n".join(lines) + "\n")
            )
    finally:
        cursor.close()


def _escape(text: str) -> str:
    # str.replace returns the string itself when there is nothing to replace (the usual case),
    # far cheaper than str.translate, which maps every character through a dict.
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def json_text(value: Any) -> str:
    """A JSONB value in COPY's text format (None is JSON null, as SQLAlchemy writes it)."""
    return _escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def copy_text(value: Any) -> str:
    """One value in COPY's text format (NULL is \\N; backslash, tab and line breaks escaped)."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    raise TypeError(f"no COPY text form for {type(value).__name__}")


_CLAIM = text(
    "INSERT INTO processed_messages (consumer, message_id, routing_key) "
    "SELECT :consumer, m, k FROM unnest(CAST(:ids AS text[]), CAST(:keys AS text[])) AS v(m, k) "
    "ON CONFLICT DO NOTHING RETURNING message_id"
)


def claim_all(conn: Connection, consumer: str, envelopes: list[Envelope]) -> set[str]:
    """Insert the dedup rows of a window in one statement; returns the message ids newly claimed.

    One statement text whatever the window's size, so it is compiled once.
    """
    rows = {e.message_id: e.routing_key for e in envelopes if e.message_id}
    if not rows:
        return set()
    claimed = conn.execute(_CLAIM, {"consumer": consumer, "ids": list(rows), "keys": list(rows.values())})
    return set(claimed.scalars())


def unclaim(conn: Connection, consumer: str, message_ids: list[str]) -> None:
    """Remove dedup rows of messages that were parked instead of applied."""
    conn.execute(
        delete(t.processed_messages).where(
            t.processed_messages.c.consumer == consumer, t.processed_messages.c.message_id.in_(message_ids)
        )
    )
