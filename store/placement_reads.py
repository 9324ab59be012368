"""What a window of order.place commands reads, once, up front (Route.prefetch).

Three queries for the whole window: the orders its requests already made, the catalogue
snapshots of every SKU it names, and one order-number sequence value per command (and the stock
rows of those SKUs, for the window's stock reservations). The SQL repositories answer from here
while a placement window is applied (`uow.prefetched`): `SqlOrders.find_request`,
`SqlOrders.next_number`, `SqlCatalog.snapshots`; `SqlOrders.create` notes each order made, so a
later copy of the same request in the window is seen as made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, Row, select

from store import numbers
from store import tables as t
from store.stock import WindowStockLocks


class _Line(Protocol):
    @property
    def sku(self) -> str: ...


class PlaceRequest(Protocol):
    """What the window's reads need of an order.place command."""

    @property
    def user_id(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    @property
    def items(self) -> Sequence[_Line]: ...


class PlacementWindow:
    """The same answers as the per-message queries, for a whole window, read up front."""

    def __init__(
        self, conn: Connection, commands: Sequence[PlaceRequest], window_stock: WindowStockLocks | None
    ) -> None:
        wanted = {(c.user_id, c.request_id) for c in commands}
        skus = sorted({line.sku for c in commands for line in c.items})
        # Both columns as index conditions (IN is `= ANY`), the pairs picked out here: a row-value IN
        # list is only an OR filter to the planner, and before a new database's first ANALYZE it
        # scanned every parent order with it instead of looking the pairs up.
        self.existing: dict[tuple[str, str], str] = {
            (r.user_id, r.request_id): r.order_no
            for r in conn.execute(
                select(t.orders.c.user_id, t.orders.c.request_id, t.orders.c.order_no).where(
                    t.orders.c.parent_no.is_(None),
                    t.orders.c.user_id.in_(sorted({u for u, _ in wanted})),
                    t.orders.c.request_id.in_(sorted({r for _, r in wanted})),
                )
            )
            if (r.user_id, r.request_id) in wanted
        }
        self.skus: dict[str, Row[Any]] = {
            row.sku: row for row in conn.execute(select(t.skus).where(t.skus.c.sku.in_(skus))).all()
        }
        self.sequence = list(numbers.next_numbers(conn, len(commands)))
        if window_stock is not None:
            window_stock.preload(conn, skus)

    def next_sequence(self) -> int | None:
        """The next order-number sequence value read up front (None once they are used up)."""
        return self.sequence.pop(0) if self.sequence else None
