"""Queue order.catalog: SKU snapshots, restocking and coupons."""

from __future__ import annotations

from consumers.events import CouponGranted, SkuUpserted, StockRestocked
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import CouponGrant, SkuUpsert, StockRestock
from domain.errors import ParkCommand, RejectCode
from domain.names import CATALOG_QUEUE, Cmd
from settings import Settings
from store.ports import UnitOfWork


def upsert_sku(cmd: SkuUpsert, uow: UnitOfWork) -> None:
    """Record the catalogue snapshot orders are priced from; sales counts are kept."""
    uow.catalog.upsert_sku(cmd.model_dump())
    uow.emit(
        SkuUpserted(
            sku=cmd.sku,
            name=cmd.name,
            unit_price=cmd.unit_price,
            merchant_id=cmd.merchant_id,
            warehouse_id=cmd.warehouse_id,
        )
    )


def restock(cmd: StockRestock, uow: UnitOfWork) -> None:
    """Add sellable units; a SKU not yet upserted is parked, to be replayed once it exists."""
    if not uow.catalog.known(cmd.sku):
        raise ParkCommand(RejectCode.UNKNOWN_SKU, f"SKU {cmd.sku!r} is unknown; upsert it, then replay this")
    available = uow.catalog.restock(cmd.sku, cmd.warehouse_id, cmd.quantity)
    item = {"sku": cmd.sku, "warehouse_id": cmd.warehouse_id, "quantity": cmd.quantity}
    uow.emit(
        StockRestocked(
            sku=cmd.sku,
            warehouse_id=cmd.warehouse_id,
            quantity=cmd.quantity,
            available=available,
            items=[item],
        )
    )


def grant_coupon(cmd: CouponGrant, uow: UnitOfWork) -> None:
    """Give a user a coupon; granting the same code again leaves the first grant as it is."""
    row, new = uow.coupons.grant(cmd.code, cmd.user_id, cmd.amount, cmd.min_spend, cmd.expires_at)
    uow.emit(
        CouponGranted(
            code=row.code,
            user_id=row.user_id,
            amount=row.amount,
            min_spend=row.min_spend,
            expires_at=row.expires_at.isoformat(),
            state=row.state,
            already_granted=not new,
        )
    )


def spec(settings: Settings) -> ConsumerSpec:
    routes = {
        Cmd.SKU_UPSERT: Route(SkuUpsert, upsert_sku),
        Cmd.STOCK_RESTOCK: Route(StockRestock, restock),
        Cmd.COUPON_GRANT: Route(CouponGrant, grant_coupon),
    }
    return ConsumerSpec(CATALOG_QUEUE, routes)  # bound from order.commands by its routes' keys
