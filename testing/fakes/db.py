"""The database in memory: one list of rows per table of store/tables.py, and a virtual clock.

Rows are `Record`s carrying every column of their table, with the server defaults PostgreSQL
would fill in (`"0"` -> 0, `now()` -> the clock's now, `'AVAILABLE'` -> "AVAILABLE") and the
autoincrement ids. Primary keys and unique constraints hold as in PostgreSQL (a duplicate
raises `DuplicateKey`, an `IntegrityError` as SQLAlchemy would raise it), NOT NULL columns
must be given, and unknown column names are refused, so a fake repository cannot write what
the SQL one could not.

Reads hand out copies, as a SQLAlchemy `Row` is: a record read before an update keeps the
values it was read with. Write through `update` / `delete` (they find the stored row by the
record's primary key). `snapshot()` / `restore()` roll back everything a refused or failed
message did: the tables, the events, the timers and the counters.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Integer, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from store import tables as t

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class VirtualClock:
    """Time that moves only when told to (`advance`, `set`); `clock()` is `clock.now()`."""

    def __init__(self, start: datetime = EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock keeps aware (UTC) datetimes")
        self._now = start

    def now(self) -> datetime:
        return self._now

    __call__ = now

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta(0):
            raise ValueError("time does not go back")
        self._now += delta
        return self._now

    def set(self, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            raise ValueError("a clock keeps aware (UTC) datetimes")
        self._now = moment
        return self._now


def _fresh(value: Any) -> Any:
    """A value as a read returns it: JSON containers copied, everything else (immutable) as it is."""
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


# The JSONB columns of each table: the only values of a row that can be changed in place.
_JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    table.name: tuple(c.name for c in table.c if isinstance(c.type, JSONB))
    for table in t.metadata.sorted_tables
}


class Record:
    """One row: its columns as attributes (and `record["column"]`, `record._mapping`).

    Records from `FakeDatabase` reads are copies; setting an attribute changes only the copy.
    Records may also be built freely (`Record(sku="tea", quantity=2)`) for values a fake
    repository returns that are not a table's row.
    """

    __slots__ = ("_table", "_values")

    _table: str | None
    _values: dict[str, Any]

    def __init__(self, _table: str | None = None, /, **values: Any) -> None:
        object.__setattr__(self, "_table", _table)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        if name in Record.__slots__:  # not set yet (copy protocols look before __init__)
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._table or 'record'} has no column {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._values:
            raise AttributeError(f"{self._table or 'record'} has no column {name!r}")
        self._values[name] = value

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self._table == other._table and self._values == other._values

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Record[{self._table}]({inner})" if self._table else f"Record({inner})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        # The hot path of every read: only JSON columns hold anything mutable.
        copied = object.__new__(Record)
        object.__setattr__(copied, "_table", self._table)
        values = dict(self._values)
        json_columns = _JSON_COLUMNS.get(self._table) if self._table is not None else None
        for column in json_columns if json_columns is not None else list(values):
            value = values[column]
            if isinstance(value, dict | list):
                values[column] = copy.deepcopy(value)
        object.__setattr__(copied, "_values", values)
        return copied

    def __copy__(self) -> Record:
        return self.__deepcopy__({})

    @property
    def _mapping(self) -> dict[str, Any]:
        """The columns as a dict (a copy), as SQLAlchemy's `Row._mapping`."""
        return dict(self._values)

    def _asdict(self) -> dict[str, Any]:
        return dict(self._values)

    def keys(self) -> list[str]:
        return list(self._values)


class DuplicateKey(IntegrityError):
    """A primary key or unique constraint would be violated (as PostgreSQL's unique_violation)."""

    def __init__(self, table: str, constraint: str, key: Mapping[str, Any]) -> None:
        detail = ", ".join(f"{k}={v!r}" for k, v in key.items())
        super().__init__(
            f"INSERT INTO {table}", dict(key), Exception(f"duplicate key on {constraint}: {detail}")
        )


class NotNullViolation(IntegrityError):
    """A NOT NULL column without a server default was left empty."""

    def __init__(self, table: str, column: str) -> None:
        super().__init__(f"INSERT INTO {table}", {}, Exception(f"null value in {table}.{column}"))


@dataclass(frozen=True)
class _Unique:
    """A unique key of a table; `where` is the partial index's condition (None: every row)."""

    name: str
    columns: tuple[str, ...]
    where: Callable[[Mapping[str, Any]], bool] | None = None

    def key(self, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The row's key, or None when the constraint does not cover the row (a NULL, the index's
        condition false): PostgreSQL never finds such rows equal."""
        if self.where is not None and not self.where(values):
            return None
        key = tuple(values[c] for c in self.columns)
        return None if any(v is None for v in key) else key


_PREDICATE = re.compile(r"^\s*(\w+)\s+(IS NULL|IS NOT NULL|=\s*'([^']*)')\s*$", re.IGNORECASE)


def _predicate(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """The few partial-index conditions the schema uses: `col IS [NOT] NULL`, `col = 'value'`."""
    match = _PREDICATE.match(text)
    if match is None:
        raise NotImplementedError(f"partial index condition {text!r}")
    column, op, value = match.group(1), match.group(2).upper(), match.group(3)
    if op == "IS NULL":
        return lambda row: row[column] is None
    if op == "IS NOT NULL":
        return lambda row: row[column] is not None
    return lambda row: row[column] == value


class _TableInfo:
    """What the fake needs of a store/tables.py table: columns, defaults, keys, autoincrement."""

    def __init__(self, table: Table) -> None:
        self.name = table.name
        self.columns = [c.name for c in table.c]
        self.column_set = frozenset(self.columns)
        self.primary_key = tuple(c.name for c in table.primary_key.columns)
        auto = table.autoincrement_column
        self.autoincrement = auto.name if auto is not None else None
        self.defaults: dict[str, Callable[[datetime], Any]] = {}
        self.not_null = [c.name for c in table.c if not c.nullable]
        for column in table.c:
            default = self._default(column)
            if default is not None:
                self.defaults[column.name] = default
        self.uniques = [_Unique(f"{self.name}_pkey", self.primary_key)]
        for constraint in table.constraints:
            if constraint.__class__.__name__ == "UniqueConstraint":
                cols = tuple(c.name for c in constraint.columns)  # type: ignore[attr-defined]
                self.uniques.append(
                    _Unique(str(constraint.name or f"{self.name}_{'_'.join(cols)}_key"), cols)
                )
        for index in table.indexes:
            if not index.unique:
                continue
            where = index.dialect_options["postgresql"].get("where")
            self.uniques.append(
                _Unique(
                    str(index.name),
                    tuple(c.name for c in index.columns),
                    _predicate(str(where)) if where is not None else None,
                )
            )

    def primary_key_of(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(values[c] for c in self.primary_key)

    @staticmethod
    def _default(column: Column) -> Callable[[datetime], Any] | None:  # type: ignore[type-arg]
        server_default = column.server_default
        if server_default is None:
            return None
        arg = getattr(server_default, "arg", None)
        if isinstance(arg, str):
            if isinstance(column.type, Integer | BigInteger):
                value: Any = int(arg)
            elif isinstance(column.type, Boolean):
                value = arg.lower() in ("true", "t", "1")
            else:
                value = arg
            return lambda _now: value
        if getattr(arg, "name", None) == "now":
            return lambda now: now
        raise NotImplementedError(f"server default of {column}: {arg!r}")


TABLES: dict[str, _TableInfo] = {table.name: _TableInfo(table) for table in t.metadata.sorted_tables}


@dataclass
class _State:
    """Everything a message may change, as one value (what `snapshot` copies).

    A table is a dict from primary key to row (insertion-ordered, as a heap read in order);
    each of its other unique keys has a dict from key to primary key beside it.
    """

    tables: dict[str, dict[tuple[Any, ...], Record]]
    keys: dict[str, list[dict[tuple[Any, ...], tuple[Any, ...]]]]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    timers: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # autoincrement ids and sequences

    @classmethod
    def empty(cls) -> _State:
        return cls(
            {name: {} for name in TABLES},
            {name: [{} for _ in info.uniques[1:]] for name, info in TABLES.items()},
        )

    def copy(self) -> _State:
        """A copy sharing the (never mutated) rows, events and timers, not what holds them."""
        return _State(
            {name: dict(rows) for name, rows in self.tables.items()},
            {name: [dict(index) for index in indexes] for name, indexes in self.keys.items()},
            list(self.events),
            list(self.timers),
            dict(self.counters),
        )


class FakeDatabase:
    """The service's tables in memory, with the events and timers its units of work wrote.

    `events`: (routing key, body) of every event emitted, in order (the outbox table also gets a
    row per event, with its correlation id). `timers`: one dict per timer started, with `kind`,
    `ref`, `due_at` (datetime), `extra` (the start_timer keywords) and `correlation_id`.
    """

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        self._state = _State.empty()

    # -- the state --------------------------------------------------------------------------------

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return self._state.events

    @property
    def timers(self) -> list[dict[str, Any]]:
        return self._state.timers

    def snapshot(self) -> object:
        """Everything as it is now, for `restore`.

        As good as a deep copy, at the cost of copying dicts and lists of references: a stored
        row is never changed in place (`update` stores a new Record in its place, JSON values
        are copied on the way in and out), and events and timers are only appended or removed.
        """
        return self._state.copy()

    def restore(self, snapshot: object) -> None:
        """Back to a `snapshot()`: what happened since is gone (the snapshot stays reusable)."""
        assert isinstance(snapshot, _State), "restore takes what snapshot() returned"
        self._state = snapshot.copy()

    def next_value(self, sequence: str = "order_no_seq") -> int:
        """nextval(sequence): 1, 2, 3, ... Unlike PostgreSQL's, the counter is part of the snapshot
        (restore takes it back), which keeps runs reproducible; no caller may rely on either."""
        counters = self._state.counters
        counters[sequence] = counters.get(sequence, 0) + 1
        return counters[sequence]

    # -- reads ------------------------------------------------------------------------------------

    def _table(self, table: str) -> dict[tuple[Any, ...], Record]:
        try:
            return self._state.tables[table]
        except KeyError:
            raise KeyError(f"no table {table!r} in store/tables.py") from None

    def _matching(
        self, table: str, where: Callable[[Record], bool] | None, equals: Mapping[str, Any]
    ) -> Iterator[Record]:
        rows = self._table(table)
        info = TABLES[table]
        unknown = set(equals) - info.column_set
        if unknown:
            raise KeyError(f"{table} has no column {', '.join(sorted(unknown))}")
        if equals.keys() >= set(info.primary_key):  # by primary key: one look-up
            row = rows.get(tuple(equals[c] for c in info.primary_key))
            candidates: Iterator[Record] | list[Record] = [row] if row is not None else []
        else:
            candidates = iter(rows.values())
        for row in candidates:
            values = row._values
            if all(values[k] == v for k, v in equals.items()) and (where is None or where(row)):
                yield row

    def rows(self, table: str, where: Callable[[Record], bool] | None = None, **equals: Any) -> list[Record]:
        """Copies of the rows whose columns equal `equals` (and `where(row)`, if given), in
        insertion order."""
        return [copy.deepcopy(row) for row in self._matching(table, where, equals)]

    def one(self, table: str, where: Callable[[Record], bool] | None = None, **equals: Any) -> Record | None:
        """The first matching row (a copy), or None."""
        for row in self._matching(table, where, equals):
            return copy.deepcopy(row)
        return None

    def count(self, table: str, where: Callable[[Record], bool] | None = None, **equals: Any) -> int:
        return sum(1 for _ in self._matching(table, where, equals))

    # -- writes -----------------------------------------------------------------------------------

    def insert(self, table: str, row: Mapping[str, Any]) -> Record:
        """Insert a row; returns it as stored (every column, defaults filled in), as a copy.

        DuplicateKey when a primary key or unique constraint already holds the row's key.
        """
        stored = self._complete(table, row)
        self._put(table, stored, None)
        return copy.deepcopy(stored)

    def insert_new(self, table: str, row: Mapping[str, Any]) -> Record | None:
        """INSERT ... ON CONFLICT DO NOTHING: the row as stored, or None when its key exists."""
        try:
            return self.insert(table, row)
        except DuplicateKey:
            return None

    def _complete(self, table: str, row: Mapping[str, Any]) -> Record:
        info = TABLES[table]
        unknown = set(row) - info.column_set
        if unknown:
            raise KeyError(f"{table} has no column {', '.join(sorted(unknown))}")
        now = self.clock.now()
        values: dict[str, Any] = {}
        for column in info.columns:
            if column in row:  # an explicit NULL is NULL, default or not
                values[column] = _fresh(row[column])
            elif column in info.defaults:
                values[column] = info.defaults[column](now)
            elif column == info.autoincrement:
                values[column] = self.next_value(f"{table}.{column}")
            else:
                values[column] = None
        return Record(table, **values)

    def _put(self, table: str, new: Record, old: Record | None) -> None:
        """Store `new` (in `old`'s place, when it replaces it), its keys checked and indexed."""
        info = TABLES[table]
        values = new._values
        for column in info.not_null:
            if values[column] is None:
                raise NotNullViolation(table, column)
        pk = info.primary_key_of(values)
        old_pk = info.primary_key_of(old._values) if old is not None else None
        keys = self._check_keys(table, values, pk, old_pk)
        indexes = self._state.keys[table]
        if old is not None:
            for unique, index in zip(info.uniques[1:], indexes, strict=True):
                old_key = unique.key(old._values)
                if old_key is not None:
                    del index[old_key]
        for index, key in zip(indexes, keys, strict=True):
            if key is not None:
                index[key] = pk
        rows = self._table(table)
        if old_pk is None or pk == old_pk:
            rows[pk] = new  # a replaced row keeps its place
        else:  # a new primary key: the row keeps its place all the same
            self._state.tables[table] = {
                (pk if k == old_pk else k): (new if k == old_pk else r) for k, r in rows.items()
            }

    def _check_keys(
        self, table: str, values: Mapping[str, Any], pk: tuple[Any, ...], old_pk: tuple[Any, ...] | None
    ) -> list[tuple[Any, ...] | None]:
        """The row's unique keys (past the primary key); DuplicateKey when another row holds one."""
        info = TABLES[table]
        if pk != old_pk and pk in self._table(table):
            raise DuplicateKey(table, info.uniques[0].name, dict(zip(info.primary_key, pk, strict=True)))
        keys = [unique.key(values) for unique in info.uniques[1:]]
        for unique, index, key in zip(info.uniques[1:], self._state.keys[table], keys, strict=True):
            if key is not None and index.get(key, old_pk) != old_pk:
                raise DuplicateKey(table, unique.name, dict(zip(unique.columns, key, strict=True)))
        return keys

    def _stored(self, record: Record) -> Record:
        """The stored row a record (a copy) was read from, found by its table's primary key."""
        table = record._table
        if table is None or table not in TABLES:
            raise ValueError(f"{record!r} is not a row of a table")
        info = TABLES[table]
        pk = info.primary_key_of(record._values)
        stored = self._table(table).get(pk)
        if stored is None:
            raise LookupError(
                f"no {table} row with {dict(zip(info.primary_key, pk, strict=True))} (deleted?)"
            )
        return stored

    def update(self, record: Record, **columns: Any) -> Record:
        """UPDATE the stored row `record` was read as (by primary key); returns the row as stored
        now (a copy). `record` itself keeps the values it was read with, as a SQLAlchemy Row."""
        table = record._table
        assert table is not None
        unknown = set(columns) - TABLES[table].column_set
        if unknown:
            raise KeyError(f"{table} has no column {', '.join(sorted(unknown))}")
        stored = self._stored(record)
        replacement = Record(table, **{**stored._values, **{k: _fresh(v) for k, v in columns.items()}})
        self._put(table, replacement, stored)
        return copy.deepcopy(replacement)

    def update_where(
        self,
        table: str,
        changes: Mapping[str, Any],
        where: Callable[[Record], bool] | None = None,
        **equals: Any,
    ) -> list[Record]:
        """UPDATE table SET changes WHERE ...; the rows as updated (RETURNING *), copies."""
        return [self.update(row, **changes) for row in list(self._matching(table, where, equals))]

    def delete(
        self, table_or_record: str | Record, where: Callable[[Record], bool] | None = None, **equals: Any
    ) -> int:
        """Delete a record (by primary key), or the rows of a table that match; how many went."""
        if isinstance(table_or_record, Record):
            doomed = [self._stored(table_or_record)]
            table = table_or_record._table
            assert table is not None
        else:
            table = table_or_record
            doomed = list(self._matching(table, where, equals))
        info = TABLES[table]
        rows = self._table(table)
        for row in doomed:
            for unique, index in zip(info.uniques[1:], self._state.keys[table], strict=True):
                key = unique.key(row._values)
                if key is not None:
                    del index[key]
            del rows[info.primary_key_of(row._values)]
        return len(doomed)

    # -- what units of work add -------------------------------------------------------------------

    def timeline(self, order_no: str) -> list[Record]:
        """The order's timeline lines, oldest first."""
        return self.rows("order_timeline", order_no=order_no)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [body for key, body in self.events if key == name]
