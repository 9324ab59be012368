"""Stock and the stock-lock ledger: lock, release, deduct and restore, each at most once per line.

Every change moves units between the counters of one (sku, warehouse) row, so
available + locked + sold always equals restocked_total. The ledger row of an order line
guards each move: a second release or deduction of the same line finds no row in the
required state and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from domain.errors import Reason, Refusal
from store import tables as t

if TYPE_CHECKING:
    from store.uow import UnitOfWork

LOCKED, RELEASED, DEDUCTED, RESTORED = "LOCKED", "RELEASED", "DEDUCTED", "RESTORED"


@dataclass(frozen=True)
class StockMove:
    sku: str
    warehouse_id: str
    quantity: int

    def as_event_item(self) -> dict[str, Any]:
        return {"sku": self.sku, "warehouse_id": self.warehouse_id, "quantity": self.quantity}


_LOCK_ONE = text(
    """
    UPDATE stock s SET available = s.available - :q, locked = s.locked + :q
    WHERE s.sku = :sku AND s.available >= :q AND s.warehouse_id = (
        SELECT warehouse_id FROM stock
        WHERE sku = :sku AND available >= :q
        ORDER BY (warehouse_id = :preferred) DESC, warehouse_id
        LIMIT 1)
    RETURNING s.warehouse_id
    """
)


def lock_line(conn: Connection, sku: str, quantity: int, preferred_warehouse: str) -> str:
    """Lock `quantity` units of `sku` in one warehouse (the SKU's own first); returns the warehouse.

    The conditional update never lets `available` go below zero, whatever runs concurrently.
    """
    # A concurrent order may take the chosen warehouse's last units between choosing and
    # updating; look again a couple of times before calling it out of stock.
    for _ in range(3):
        warehouse = conn.execute(
            _LOCK_ONE, {"sku": sku, "q": quantity, "preferred": preferred_warehouse}
        ).scalar()
        if warehouse is not None:
            return str(warehouse)
        still_any = conn.execute(
            text("SELECT 1 FROM stock WHERE sku = :sku AND available >= :q LIMIT 1"),
            {"sku": sku, "q": quantity},
        ).scalar()
        if not still_any:
            break
    raise Refusal(Reason.OUT_OF_STOCK, f"{sku}: fewer than {quantity} available")


def lock_rows(order_no: str, locks: list[tuple[int, StockMove]]) -> list[dict[str, Any]]:
    """The ledger rows (state LOCKED) of an order's lines, for an insert into stock_locks."""
    return [
        {
            "order_no": order_no,
            "line_no": line_no,
            "sku": m.sku,
            "warehouse_id": m.warehouse_id,
            "quantity": m.quantity,
            "state": LOCKED,
        }
        for line_no, m in locks
    ]


def _move(conn: Connection, order_no: str, child_order_no: str | None, src: str, dst: str) -> list[StockMove]:
    """Move the ledger rows of an order (or one child) from state `src` to `dst`; returns the lines moved."""
    where = "child_order_no = :child" if child_order_no else "order_no = :order_no"
    rows = conn.execute(
        text(
            f"UPDATE stock_locks SET state = :dst, updated_at = now() "
            f"WHERE {where} AND state = :src RETURNING sku, warehouse_id, quantity"
        ),
        {"order_no": order_no, "child": child_order_no, "src": src, "dst": dst},
    ).all()
    return [StockMove(r.sku, r.warehouse_id, int(r.quantity)) for r in sorted(rows)]


_COUNTER_MOVES = {
    (LOCKED, DEDUCTED): "locked = locked - :q, sold = sold + :q",
    (DEDUCTED, RESTORED): "sold = sold - :q, available = available + :q",
}
_SALES_DELTA = {(LOCKED, DEDUCTED): 1, (DEDUCTED, RESTORED): -1}


def _apply(
    conn: Connection, order_no: str, child_order_no: str | None, src: str, dst: str
) -> list[StockMove]:
    moves = _move(conn, order_no, child_order_no, src, dst)
    for m in moves:  # sorted by (sku, warehouse): a fixed lock order
        conn.execute(
            text(f"UPDATE stock SET {_COUNTER_MOVES[(src, dst)]} WHERE sku = :sku AND warehouse_id = :wh"),
            {"q": m.quantity, "sku": m.sku, "wh": m.warehouse_id},
        )
        if (src, dst) in _SALES_DELTA:
            conn.execute(
                text("UPDATE skus SET sales_count = sales_count + :d WHERE sku = :sku"),
                {"d": _SALES_DELTA[(src, dst)] * m.quantity, "sku": m.sku},
            )
    return moves


class StockShortfall(Exception):
    """A window's summed stock locks no longer fit: the window is applied again, locking as it goes."""


class WindowStockLocks:
    """Stock locks of a whole window, applied together just before its commit.

    Locking stock rows inside each message's savepoint would hold the hot rows for the whole
    window, and two consumers' windows would then run one after the other. Instead each
    message reserves against what is committed (less what this window already reserved), and
    `apply` moves the summed quantities in one conditional update per row, in (sku, warehouse)
    order so that windows never deadlock. If a row no longer has enough (another consumer took
    it meanwhile), StockShortfall sends the window back to be applied message by message.
    """

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], int] = {}
        self.rows: dict[str, list[tuple[str, int]]] | None = None  # sku -> (warehouse, available)

    def preload(self, conn: Connection, skus: list[str]) -> None:
        """Read the stock rows of every SKU the window will reserve, in one query."""
        self.rows = {sku: [] for sku in skus}
        for row in conn.execute(
            text("SELECT sku, warehouse_id, available FROM stock WHERE sku = ANY(:skus)"), {"skus": skus}
        ):
            self.rows[row.sku].append((row.warehouse_id, row.available))

    def _rows(self, conn: Connection, sku: str) -> list[tuple[str, int]]:
        if self.rows is not None and sku in self.rows:
            return self.rows[sku]
        return [
            (r.warehouse_id, r.available)
            for r in conn.execute(
                text("SELECT warehouse_id, available FROM stock WHERE sku = :sku"), {"sku": sku}
            )
        ]

    def reserve(
        self, conn: Connection, pending: dict[tuple[str, str], int], sku: str, quantity: int, preferred: str
    ) -> str:
        """Reserve for one message (into `pending`); returns the warehouse, or Refusal(OUT_OF_STOCK)."""
        for warehouse, available in sorted(self._rows(conn, sku), key=lambda r: (r[0] != preferred, r[0])):
            key = (sku, warehouse)
            if available - self.totals.get(key, 0) - pending.get(key, 0) >= quantity:
                pending[key] = pending.get(key, 0) + quantity
                return str(warehouse)
        raise Refusal(Reason.OUT_OF_STOCK, f"{sku}: fewer than {quantity} available")

    def keep(self, pending: dict[tuple[str, str], int]) -> None:
        """The message committed to its savepoint: its reservations count for the window."""
        for key, quantity in pending.items():
            self.totals[key] = self.totals.get(key, 0) + quantity

    def apply(self, conn: Connection) -> None:
        """Lock the summed quantities in two statements; StockShortfall if one no longer fits.

        The rows are locked in (sku, warehouse) order first, as every stock writer does, so
        windows never deadlock; the caller does this last, just before commit, to hold them briefly.
        """
        if not self.totals:
            return
        keys = sorted(self.totals)
        params: dict[str, list[Any]] = {
            "skus": [k[0] for k in keys],
            "whs": [k[1] for k in keys],
            "qs": [self.totals[k] for k in keys],
        }
        lock_rows_in_order(conn, params)
        moved = conn.execute(
            text(
                "UPDATE stock s SET available = s.available - v.q, locked = s.locked + v.q "
                "FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[]), CAST(:qs AS bigint[])) "
                "AS v(sku, wh, q) WHERE s.sku = v.sku AND s.warehouse_id = v.wh AND s.available >= v.q"
            ),
            params,
        ).rowcount
        if moved != len(keys):
            raise StockShortfall(f"{len(keys) - moved} of {len(keys)} stock rows no longer have enough")


def lock_rows_in_order(conn: Connection, params: dict[str, list[Any]]) -> None:
    """Lock the stock rows named by params' skus/whs arrays in (sku, warehouse) order."""
    conn.execute(
        text(
            "SELECT 1 FROM stock s "
            "JOIN unnest(CAST(:skus AS text[]), CAST(:whs AS text[])) AS v(sku, wh) "
            "ON s.sku = v.sku AND s.warehouse_id = v.wh ORDER BY s.sku, s.warehouse_id FOR UPDATE OF s"
        ),
        {"skus": params["skus"], "whs": params["whs"]},
    )


def release_orders_stock(conn: Connection, order_nos: list[str]) -> dict[str, list[StockMove]]:
    """Release the locked lines of many unpaid orders at once (idempotent); returns moves by order.

    The stock rows are locked in (sku, warehouse) order first, as every other stock writer does,
    then changed in one statement.
    """
    if not order_nos:
        return {}
    rows = conn.execute(
        text(
            "UPDATE stock_locks SET state = 'RELEASED', updated_at = now() "
            "WHERE order_no = ANY(:orders) AND state = 'LOCKED' "
            "RETURNING order_no, sku, warehouse_id, quantity"
        ),
        {"orders": order_nos},
    ).all()
    by_order: dict[str, list[StockMove]] = {}
    totals: dict[tuple[str, str], int] = {}
    for r in rows:
        by_order.setdefault(r.order_no, []).append(StockMove(r.sku, r.warehouse_id, int(r.quantity)))
        totals[(r.sku, r.warehouse_id)] = totals.get((r.sku, r.warehouse_id), 0) + int(r.quantity)
    if totals:
        keys = sorted(totals)
        params: dict[str, list[Any]] = {
            "skus": [k[0] for k in keys],
            "whs": [k[1] for k in keys],
            "qs": [totals[k] for k in keys],
        }
        lock_rows_in_order(conn, params)
        conn.execute(
            text(
                "UPDATE stock s SET locked = s.locked - v.q, available = s.available + v.q "
                "FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[]), CAST(:qs AS bigint[])) "
                "AS v(sku, wh, q) "
                "WHERE s.sku = v.sku AND s.warehouse_id = v.wh"
            ),
            params,
        )
    return {
        order_no: sorted(moves, key=lambda m: (m.sku, m.warehouse_id)) for order_no, moves in by_order.items()
    }


class SqlStock:
    """The `stock` repository on PostgreSQL (store.ports.Stock): stock rows and the stock-lock ledger."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def lock_line(self, sku: str, quantity: int, preferred_warehouse: str) -> str:
        """Lock units of a SKU for an order line (now, or with the window's other locks before
        commit); returns the warehouse they come from, or Refusal(OUT_OF_STOCK)."""
        uow = self.uow
        if uow.window_stock is None:
            return lock_line(uow.conn, sku, quantity, preferred_warehouse)
        return uow.window_stock.reserve(uow.conn, uow.stock_reserved, sku, quantity, preferred_warehouse)

    def record_locks(self, order_no: str, locks: list[tuple[int, StockMove]]) -> None:
        """Write the ledger rows (LOCKED) of a new order's lines (through `uow.insert`)."""
        self.uow.insert(t.stock_locks, lock_rows(order_no, locks))

    def release(self, order_no: str) -> list[StockMove]:
        """Give an unpaid order's locked units back to `available` (idempotent)."""
        return release_orders_stock(self.uow.conn, [order_no]).get(order_no, [])

    def release_many(self, order_nos: list[str]) -> dict[str, list[StockMove]]:
        """Release the locked lines of many unpaid orders at once (idempotent); moves by order."""
        return release_orders_stock(self.uow.conn, order_nos)

    def deduct(self, order_no: str) -> list[StockMove]:
        """Turn a paid order's locked units into sold ones (idempotent)."""
        return _apply(self.uow.conn, order_no, None, LOCKED, DEDUCTED)

    def restore(self, order_no: str, child_order_no: str | None = None) -> list[StockMove]:
        """Put a refunded order's (or one child's) sold units back on sale, reducing sales (idempotent)."""
        return _apply(self.uow.conn, order_no, child_order_no, DEDUCTED, RESTORED)

    def assign_child(self, order_no: str, line_no: int, child_order_no: str) -> None:
        """Tie a ledger line to the child order that ships it."""
        self.uow.conn.execute(
            text("UPDATE stock_locks SET child_order_no = :child WHERE order_no = :o AND line_no = :l"),
            {"child": child_order_no, "o": order_no, "l": line_no},
        )
