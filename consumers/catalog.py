"""Queue order.catalog: SKU snapshots, restocking and coupons."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from consumers.loop import ConsumerSpec, Route
from consumers.schemas import CouponGrant, SkuUpsert, StockRestock
from domain.errors import ParkCommand, RejectCode
from domain.names import CATALOG_QUEUE, COMMANDS_EXCHANGE, Cmd, Evt
from settings import Settings
from store import tables as t
from store.uow import UnitOfWork


def upsert_sku(cmd: SkuUpsert, uow: UnitOfWork) -> None:
    """Record the catalogue snapshot orders are priced from; sales counts are kept."""
    values = cmd.model_dump()
    uow.conn.execute(
        pg_insert(t.skus)
        .values(**values, updated_at=uow.now)
        .on_conflict_do_update(index_elements=["sku"], set_={**values, "updated_at": uow.now})
    )
    uow.conn.execute(
        pg_insert(t.stock).values(sku=cmd.sku, warehouse_id=cmd.warehouse_id).on_conflict_do_nothing()
    )
    uow.emit(Evt.SKU_UPSERTED, values)


def restock(cmd: StockRestock, uow: UnitOfWork) -> None:
    """Add sellable units; a SKU not yet upserted is parked, to be replayed once it exists."""
    known = uow.conn.execute(select(t.skus.c.sku).where(t.skus.c.sku == cmd.sku)).first()
    if known is None:
        raise ParkCommand(RejectCode.UNKNOWN_SKU, f"SKU {cmd.sku!r} is unknown; upsert it, then replay this")
    available = uow.conn.execute(
        text(
            "INSERT INTO stock (sku, warehouse_id, available, restocked_total) VALUES (:sku, :wh, :q, :q) "
            "ON CONFLICT (sku, warehouse_id) DO UPDATE SET available = stock.available + :q, "
            "restocked_total = stock.restocked_total + :q RETURNING available"
        ),
        {"sku": cmd.sku, "wh": cmd.warehouse_id, "q": cmd.quantity},
    ).scalar_one()
    item = {"sku": cmd.sku, "warehouse_id": cmd.warehouse_id, "quantity": cmd.quantity}
    uow.emit(Evt.STOCK_RESTOCKED, {**item, "available": available, "items": [item]})


def grant_coupon(cmd: CouponGrant, uow: UnitOfWork) -> None:
    """Give a user a coupon; granting the same code again leaves the first grant as it is."""
    inserted = uow.conn.execute(
        pg_insert(t.coupons)
        .values(
            code=cmd.code,
            user_id=cmd.user_id,
            amount=cmd.amount,
            min_spend=cmd.min_spend,
            expires_at=cmd.expires_at,
        )
        .on_conflict_do_nothing()
    ).rowcount
    row = uow.conn.execute(select(t.coupons).where(t.coupons.c.code == cmd.code)).one()
    uow.emit(
        Evt.COUPON_GRANTED,
        {
            "code": row.code,
            "user_id": row.user_id,
            "amount": row.amount,
            "min_spend": row.min_spend,
            "expires_at": row.expires_at.isoformat(),
            "state": row.state,
            "already_granted": inserted == 0,
        },
    )


def spec(settings: Settings) -> ConsumerSpec:
    routes = {
        Cmd.SKU_UPSERT: Route(SkuUpsert, upsert_sku),
        Cmd.STOCK_RESTOCK: Route(StockRestock, restock),
        Cmd.COUPON_GRANT: Route(CouponGrant, grant_coupon),
    }
    return ConsumerSpec(CATALOG_QUEUE, routes, tuple((COMMANDS_EXCHANGE, key) for key in routes))
