"""Handler helpers several consumer modules share: they decide and announce, store/ reads and writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from consumers.events import OrderClosed, OrderCompleted, OrderShipped
from domain.status import OrderStatus
from store.ports import Record, UnitOfWork
from store.stock import StockMove

# The event that announces a parent's derived status.
_PARENT_EVENTS: dict[str, type[OrderShipped | OrderCompleted | OrderClosed]] = {
    OrderStatus.SHIPPED: OrderShipped,
    OrderStatus.COMPLETED: OrderCompleted,
    OrderStatus.CLOSED: OrderClosed,
}


def derive_parent(uow: UnitOfWork, parent_no: str | None, actor: str) -> str | None:
    """Recompute a parent's status from its children, then announce it if it changed to shipped,
    completed or closed (order.shipped/completed/closed with `derived_from_children`)."""
    if parent_no is None:
        return None
    derived = uow.orders.recompute_parent(parent_no, actor)
    event = _PARENT_EVENTS.get(derived) if derived is not None else None
    if derived is not None and event is not None:
        uow.emit(event(order_no=parent_no, status=derived, derived_from_children=True))
    return derived


def item_event_list(items: Iterable[Record]) -> list[dict[str, Any]]:
    """Order lines as they appear in events."""
    return [
        {
            "line_no": i.line_no,
            "sku": i.sku,
            "name": i.name,
            "merchant_id": i.merchant_id,
            "warehouse_id": i.warehouse_id,
            "unit_price": i.unit_price,
            "quantity": i.quantity,
            "line_total": i.line_total,
        }
        for i in items
    ]


def stock_items(moves: Iterable[StockMove]) -> list[dict[str, Any]]:
    """Stock moves as the `items` of a stock.* event."""
    return [m.as_event_item() for m in moves]
