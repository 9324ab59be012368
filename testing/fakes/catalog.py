"""The `catalog` repository in memory (store/catalog.py `SqlCatalog`, the same semantics)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from testing.fakes.db import Record

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork


class FakeCatalog:
    """SKU snapshots and stock rows in the fake's tables."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow
        self.db = uow.db

    def upsert_sku(self, values: dict[str, Any]) -> None:
        existing = self.db.one("skus", sku=values["sku"])
        if existing is None:
            self.db.insert("skus", {**values, "updated_at": self.uow.now})
        else:
            self.db.update(existing, **values, updated_at=self.uow.now)
        self.db.insert_new("stock", {"sku": values["sku"], "warehouse_id": values["warehouse_id"]})

    def known(self, sku: str) -> bool:
        return self.db.one("skus", sku=sku) is not None

    def restock(self, sku: str, warehouse_id: str, quantity: int) -> int:
        row = self.db.one("stock", sku=sku, warehouse_id=warehouse_id)
        if row is None:
            row = self.db.insert(
                "stock",
                {
                    "sku": sku,
                    "warehouse_id": warehouse_id,
                    "available": quantity,
                    "restocked_total": quantity,
                },
            )
        else:
            row = self.db.update(
                row, available=row.available + quantity, restocked_total=row.restocked_total + quantity
            )
        return int(row.available)

    def snapshots(self, skus: list[str]) -> dict[str, Record]:
        wanted = set(skus)
        return {row.sku: row for row in self.db.rows("skus", lambda r: r.sku in wanted)}
