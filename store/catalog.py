"""The catalogue: SKU snapshots orders are priced from, and restocking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from store import tables as t
from store.placement_reads import PlacementWindow

if TYPE_CHECKING:
    from store.uow import UnitOfWork

_RESTOCK = text(
    "INSERT INTO stock (sku, warehouse_id, available, restocked_total) VALUES (:sku, :wh, :q, :q) "
    "ON CONFLICT (sku, warehouse_id) DO UPDATE SET available = stock.available + :q, "
    "restocked_total = stock.restocked_total + :q RETURNING available"
)


class SqlCatalog:
    """The `catalog` repository on PostgreSQL (store.ports.Catalog): skus and their stock rows."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def upsert_sku(self, values: dict[str, Any]) -> None:
        """Write a SKU's snapshot (sales count kept) and make sure its own warehouse has a stock row."""
        conn, now = self.uow.conn, self.uow.now
        conn.execute(
            pg_insert(t.skus)
            .values(**values, updated_at=now)
            .on_conflict_do_update(index_elements=["sku"], set_={**values, "updated_at": now})
        )
        conn.execute(
            pg_insert(t.stock)
            .values(sku=values["sku"], warehouse_id=values["warehouse_id"])
            .on_conflict_do_nothing()
        )

    def known(self, sku: str) -> bool:
        """Whether the SKU was ever upserted."""
        return self.uow.conn.execute(select(t.skus.c.sku).where(t.skus.c.sku == sku)).first() is not None

    def restock(self, sku: str, warehouse_id: str, quantity: int) -> int:
        """Add sellable units to a (sku, warehouse) stock row (made if missing); returns `available`."""
        return int(
            self.uow.conn.execute(_RESTOCK, {"sku": sku, "wh": warehouse_id, "q": quantity}).scalar_one()
        )

    def snapshots(self, skus: list[str]) -> dict[str, Row[Any]]:
        """The catalogue rows of these SKUs (unknown ones absent), by SKU."""
        reads = self.uow.prefetched
        if isinstance(reads, PlacementWindow):
            return {sku: reads.skus[sku] for sku in skus if sku in reads.skus}
        return {
            row.sku: row for row in self.uow.conn.execute(select(t.skus).where(t.skus.c.sku.in_(skus))).all()
        }
