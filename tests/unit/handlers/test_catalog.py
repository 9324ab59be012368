"""consumers/catalog.py on the fake unit of work: SKU snapshots, restocking, coupon grants."""

from __future__ import annotations

from datetime import timedelta

import pytest

from consumers import catalog
from consumers.outcomes import Applied, Park
from domain.names import CATALOG_QUEUE, Cmd, Evt
from settings import Settings
from testing.fakes.service import InProcessService

SKU = {"sku": "tea", "name": "Tea", "unit_price": 1500, "merchant_id": "M1", "warehouse_id": "W1"}


@pytest.fixture
def svc() -> InProcessService:
    settings = Settings()
    return InProcessService(settings, specs={CATALOG_QUEUE: catalog.spec(settings)})


def test_upsert_writes_the_snapshot_and_a_stock_row(svc: InProcessService) -> None:
    answer = svc.deliver(Cmd.SKU_UPSERT, SKU, "m1")
    assert answer.outcome == Applied()
    assert answer.events == [(Evt.SKU_UPSERTED, SKU)]
    row = svc.db.one("skus", sku="tea")
    assert row is not None and (row.name, row.unit_price, row.sales_count) == ("Tea", 1500, 0)
    stock = svc.db.one("stock", sku="tea", warehouse_id="W1")
    assert stock is not None and (stock.available, stock.restocked_total) == (0, 0)


def test_upsert_again_changes_the_snapshot_and_keeps_sales_and_stock(svc: InProcessService) -> None:
    svc.send(Cmd.SKU_UPSERT, SKU)
    svc.send(Cmd.STOCK_RESTOCK, {"sku": "tea", "warehouse_id": "W1", "quantity": 5})
    sku = svc.db.one("skus", sku="tea")
    assert sku is not None
    svc.db.update(sku, sales_count=3)
    changed = {**SKU, "name": "Green tea", "unit_price": 1800, "warehouse_id": "W2"}
    answer = svc.deliver(Cmd.SKU_UPSERT, changed, "m2")
    assert answer.events == [(Evt.SKU_UPSERTED, changed)]
    row = svc.db.one("skus", sku="tea")
    assert row is not None and (row.name, row.unit_price, row.warehouse_id, row.sales_count) == (
        "Green tea",
        1800,
        "W2",
        3,
    )
    assert [(r.warehouse_id, r.available) for r in svc.db.rows("stock", sku="tea")] == [("W1", 5), ("W2", 0)]


def test_restock_adds_units_and_announces_what_is_available(svc: InProcessService) -> None:
    svc.send(Cmd.SKU_UPSERT, SKU)
    item = {"sku": "tea", "warehouse_id": "W1", "quantity": 7}
    first = svc.deliver(Cmd.STOCK_RESTOCK, item, "r1")
    assert first.events == [(Evt.STOCK_RESTOCKED, {**item, "available": 7, "items": [item]})]
    second = svc.deliver(Cmd.STOCK_RESTOCK, {**item, "quantity": 3}, "r2")
    assert second.events[0][1]["available"] == 10
    stock = svc.db.one("stock", sku="tea", warehouse_id="W1")
    assert stock is not None and (stock.available, stock.restocked_total, stock.locked) == (10, 10, 0)


def test_restock_into_another_warehouse_makes_its_row(svc: InProcessService) -> None:
    svc.send(Cmd.SKU_UPSERT, SKU)
    answer = svc.deliver(Cmd.STOCK_RESTOCK, {"sku": "tea", "warehouse_id": "W9", "quantity": 2}, "r1")
    assert answer.events[0][1]["available"] == 2
    assert svc.db.one("stock", sku="tea", warehouse_id="W9") is not None


def test_restock_of_an_unknown_sku_is_parked_and_changes_nothing(svc: InProcessService) -> None:
    answer = svc.deliver(Cmd.STOCK_RESTOCK, {"sku": "nope", "warehouse_id": "W1", "quantity": 1}, "r1")
    assert isinstance(answer.outcome, Park) and answer.outcome.code == "UNKNOWN_SKU"
    assert answer.names() == [Evt.COMMAND_REJECTED]
    assert svc.db.rows("stock") == []
    assert svc.db.count("processed_messages") == 0, "parked: replayable once the SKU exists"


def test_restock_is_applied_once_per_message_id(svc: InProcessService) -> None:
    svc.send(Cmd.SKU_UPSERT, SKU)
    item = {"sku": "tea", "warehouse_id": "W1", "quantity": 4}
    svc.send(Cmd.STOCK_RESTOCK, item, message_id="same")
    svc.send(Cmd.STOCK_RESTOCK, item, message_id="same")
    stock = svc.db.one("stock", sku="tea", warehouse_id="W1")
    assert stock is not None and stock.available == 4


def test_grant_coupon_and_grant_it_again(svc: InProcessService) -> None:
    expires = svc.clock.now() + timedelta(days=7)
    grant = {
        "code": "C1",
        "user_id": "u1",
        "amount": 500,
        "min_spend": 2000,
        "expires_at": expires.isoformat(),
    }
    first = svc.deliver(Cmd.COUPON_GRANT, grant, "g1")
    body = {
        "code": "C1",
        "user_id": "u1",
        "amount": 500,
        "min_spend": 2000,
        "expires_at": expires.isoformat(),
        "state": "AVAILABLE",
        "already_granted": False,
    }
    assert first.events == [(Evt.COUPON_GRANTED, body)]
    again = svc.deliver(Cmd.COUPON_GRANT, {**grant, "amount": 900, "user_id": "u2"}, "g2")
    assert again.events == [(Evt.COUPON_GRANTED, {**body, "already_granted": True})], "the first grant stands"
    row = svc.db.one("coupons", code="C1")
    assert row is not None and (row.user_id, row.amount, row.state, row.order_no) == (
        "u1",
        500,
        "AVAILABLE",
        None,
    )
