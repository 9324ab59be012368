"""Handler helpers several consumer modules share: they decide and announce, store/ reads and writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from consumers.events import OrderClosed, OrderCompleted, OrderShipped
from domain.actors import SYSTEM
from domain.errors import Reason, Refusal
from domain.status import OrderAction, OrderStatus
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


def merchant_of(uow: UnitOfWork, order: Record) -> str:
    """The merchant answerable for an order: a child's own, or a virtual order's seller."""
    if order.merchant_id:
        return str(order.merchant_id)
    items = uow.orders.items(order)
    return str(items[0].merchant_id) if items else ""


def require_merchant(aftersale_or_order: Record, merchant_id: str, expected: str) -> None:
    """Refusal(MERCHANT_MISMATCH) unless the command comes from the merchant answerable."""
    if merchant_id != expected:
        raise Refusal(
            Reason.MERCHANT_MISMATCH,
            f"merchant {merchant_id} does not sell order {aftersale_or_order.order_no}",
            order_no=aftersale_or_order.order_no,
        )


def close_refunded(uow: UnitOfWork, order: Record, reason: str) -> None:
    """REFUND_CLOSE an order (order.closed) and derive its parent."""
    status = uow.orders.transition(
        order, OrderAction.REFUND_CLOSE, SYSTEM, {"reason": reason}, closed_at=uow.now
    )
    uow.emit(
        OrderClosed(
            order_no=order.order_no,
            parent_no=order.parent_no,
            user_id=order.user_id,
            status=status,
            reason=reason,
            refunded_amount=order.refunded_amount,
            closed_at=uow.now.isoformat(),
        )
    )
    derive_parent(uow, order.parent_no, SYSTEM)
