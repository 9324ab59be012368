"""The `stock` repository in memory (store/stock.py `SqlStock`, the same semantics).

Each move goes through the ledger row of an order line first: only rows in the move's source
state move, so a second release, deduction or restore of a line changes nothing. Counters of a
(sku, warehouse) row move together (available + locked + sold = restocked_total); one going
below zero is a bug of the caller and fails loudly (AssertionError).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from domain.errors import Reason, Refusal
from store.stock import DEDUCTED, LOCKED, RELEASED, RESTORED, StockMove, lock_rows
from testing.fakes.db import Record

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork

# (from, to) ledger state -> (counter taken from, counter added to), sales count change sign.
_COUNTERS = {
    (LOCKED, RELEASED): ("locked", "available", 0),
    (LOCKED, DEDUCTED): ("locked", "sold", 1),
    (DEDUCTED, RESTORED): ("sold", "available", -1),
}


class FakeStock:
    """Stock rows and the stock_locks ledger in the fake's tables."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow
        self.db = uow.db

    def lock_line(self, sku: str, quantity: int, preferred_warehouse: str) -> str:
        rows = self.db.rows("stock", lambda r: r.available >= quantity, sku=sku)
        if not rows:
            raise Refusal(Reason.OUT_OF_STOCK, f"{sku}: fewer than {quantity} available")
        row = min(rows, key=lambda r: (r.warehouse_id != preferred_warehouse, r.warehouse_id))
        self._shift(row, "available", "locked", quantity)
        return str(row.warehouse_id)

    def record_locks(self, order_no: str, locks: list[tuple[int, StockMove]]) -> None:
        self.uow.insert("stock_locks", lock_rows(order_no, locks))

    def release(self, order_no: str) -> list[StockMove]:
        return self.release_many([order_no]).get(order_no, [])

    def release_many(self, order_nos: list[str]) -> dict[str, list[StockMove]]:
        wanted = set(order_nos)
        lines = self.db.rows("stock_locks", lambda r: r.order_no in wanted, state=LOCKED)
        moved = self._move(lines, LOCKED, RELEASED)
        by_order: dict[str, list[StockMove]] = {}
        for line, move in zip(lines, moved, strict=True):
            by_order.setdefault(line.order_no, []).append(move)
        return {o: sorted(m, key=lambda m: (m.sku, m.warehouse_id)) for o, m in by_order.items()}

    def deduct(self, order_no: str) -> list[StockMove]:
        return self._sorted(
            self._move(self.db.rows("stock_locks", order_no=order_no, state=LOCKED), LOCKED, DEDUCTED)
        )

    def restore(self, order_no: str, child_order_no: str | None = None) -> list[StockMove]:
        if child_order_no:
            lines = self.db.rows("stock_locks", child_order_no=child_order_no, state=DEDUCTED)
        else:
            lines = self.db.rows("stock_locks", order_no=order_no, state=DEDUCTED)
        return self._sorted(self._move(lines, DEDUCTED, RESTORED))

    def assign_child(self, order_no: str, line_no: int, child_order_no: str) -> None:
        self.db.update_where(
            "stock_locks", {"child_order_no": child_order_no}, order_no=order_no, line_no=line_no
        )

    # -- moves ------------------------------------------------------------------------------------

    @staticmethod
    def _sorted(moves: Iterable[StockMove]) -> list[StockMove]:
        return sorted(moves, key=lambda m: (m.sku, m.warehouse_id, m.quantity))

    def _move(self, lines: list[Record], src: str, dst: str) -> list[StockMove]:
        """Ledger lines src -> dst, each line's units between the counters of its stock row."""
        taken, added, sales = _COUNTERS[(src, dst)]
        moves = []
        for line in lines:
            self.db.update(line, state=dst, updated_at=self.uow.now)
            row = self.db.one("stock", sku=line.sku, warehouse_id=line.warehouse_id)
            assert row is not None, f"ledger line without a stock row: {line!r}"
            self._shift(row, taken, added, int(line.quantity))
            if sales:
                sku = self.db.one("skus", sku=line.sku)
                if sku is not None:
                    self.db.update(sku, sales_count=sku.sales_count + sales * int(line.quantity))
            moves.append(StockMove(line.sku, line.warehouse_id, int(line.quantity)))
        return moves

    def _shift(self, row: Record, taken: str, added: str, quantity: int) -> None:
        left = getattr(row, taken) - quantity
        assert left >= 0, f"stock {row.sku}/{row.warehouse_id}: {taken} would go below zero"
        self.db.update(row, **{taken: left, added: getattr(row, added) + quantity})
