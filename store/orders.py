"""Orders: reading them, guarded state transitions (version column) and their timeline."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select, update

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.names import Evt
from domain.status import OrderAction, OrderStatus, next_order_status
from store import tables as t
from store.uow import UnitOfWork


def load_order(conn: Connection, order_no: str, lock: bool = True) -> Row[Any] | None:
    """One order row, locked FOR UPDATE by default so concurrent commands on it serialise."""
    stmt = select(t.orders).where(t.orders.c.order_no == order_no)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def require_order(conn: Connection, order_no: str, lock: bool = True) -> Row[Any]:
    """The order, or Refusal(UNKNOWN_ORDER)."""
    order = load_order(conn, order_no, lock)
    if order is None:
        raise Refusal(Reason.UNKNOWN_ORDER, f"no order {order_no}", order_no=order_no)
    return order


def children_of(conn: Connection, parent_no: str, lock: bool = False) -> list[Row[Any]]:
    stmt = select(t.orders).where(t.orders.c.parent_no == parent_no).order_by(t.orders.c.order_no)
    if lock:
        stmt = stmt.with_for_update()
    return list(conn.execute(stmt).all())


def items_of(conn: Connection, order: Row[Any]) -> list[Row[Any]]:
    """An order's lines: a parent's own, or the lines a child ships."""
    column = t.order_items.c.child_order_no if order.parent_no else t.order_items.c.order_no
    return list(conn.execute(select(t.order_items).where(column == order.order_no).order_by("line_no")).all())


def set_status(
    uow: UnitOfWork,
    order: Row[Any],
    to_status: str,
    action: str,
    actor: str,
    detail: dict[str, Any] | None = None,
    **columns: Any,
) -> None:
    """Write a new status (and other columns) if the order's version is unchanged; log it."""
    result = uow.conn.execute(
        update(t.orders)
        .where(t.orders.c.order_no == order.order_no, t.orders.c.version == order.version)
        .values(status=to_status, version=order.version + 1, updated_at=uow.now, **columns)
    )
    if result.rowcount != 1:
        raise ConcurrentUpdate(f"order {order.order_no} changed under us")
    uow.record(order.order_no, action, order.status, to_status, actor, detail)


def transition(
    uow: UnitOfWork,
    order: Row[Any],
    action: OrderAction,
    actor: str,
    detail: dict[str, Any] | None = None,
    **columns: Any,
) -> str:
    """Apply `action` through the state machine table; Refusal(INVALID_STATE) when not allowed."""
    to_status = next_order_status(order.status, action)
    set_status(uow, order, to_status, action.value, actor, detail, **columns)
    return to_status


def update_columns(uow: UnitOfWork, order: Row[Any], **columns: Any) -> None:
    """Change columns other than the status, under the same version guard."""
    result = uow.conn.execute(
        update(t.orders)
        .where(t.orders.c.order_no == order.order_no, t.orders.c.version == order.version)
        .values(version=order.version + 1, updated_at=uow.now, **columns)
    )
    if result.rowcount != 1:
        raise ConcurrentUpdate(f"order {order.order_no} changed under us")


def item_event_list(items: list[Row[Any]]) -> list[dict[str, Any]]:
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


def recompute_parent(uow: UnitOfWork, parent_no: str, actor: str) -> str | None:
    """Derive a parent's status from its children (shipped when all are, ...); returns it if changed."""
    from domain.status import parent_status

    parent = load_order(uow.conn, parent_no)
    if parent is None:
        return None
    children = children_of(uow.conn, parent_no)
    if not children:
        return None
    derived = parent_status([c.status for c in children])
    if derived == parent.status:
        return None
    stamps = {
        "SHIPPED": {"shipped_at": uow.now},
        "COMPLETED": {"completed_at": uow.now},
        "CLOSED": {"closed_at": uow.now},
    }.get(derived.value, {})
    set_status(uow, parent, derived, "DERIVE_FROM_CHILDREN", actor, None, **stamps)
    return derived.value


# The event that announces a parent's derived status.
_PARENT_EVENTS = {
    OrderStatus.SHIPPED: Evt.ORDER_SHIPPED,
    OrderStatus.COMPLETED: Evt.ORDER_COMPLETED,
    OrderStatus.CLOSED: Evt.ORDER_CLOSED,
}


def derive_parent(uow: UnitOfWork, parent_no: str | None, actor: str) -> str | None:
    """recompute_parent, then announce the parent's new status (order.shipped/completed/closed)."""
    if parent_no is None:
        return None
    derived = recompute_parent(uow, parent_no, actor)
    event = _PARENT_EVENTS.get(OrderStatus(derived)) if derived else None
    if derived is not None and event is not None:
        uow.emit(event, {"order_no": parent_no, "status": derived, "derived_from_children": True})
    return derived


def refusal_subject(conn: Connection, order_no: str | None) -> dict[str, Any]:
    """`order_no`, `user_id` and `request_id` of an order for a refusal event (None when unknown)."""
    order = load_order(conn, order_no, lock=False) if order_no else None
    if order is None:
        return {"order_no": order_no, "user_id": None, "request_id": None}
    request_id = order.request_id
    if request_id is None and order.parent_no:
        request_id = conn.execute(
            select(t.orders.c.request_id).where(t.orders.c.order_no == order.parent_no)
        ).scalar()
    return {"order_no": order.order_no, "user_id": order.user_id, "request_id": request_id}


def add_refunded(uow: UnitOfWork, order_no: str, amount: int) -> None:
    """Count a refund that succeeded against the order it was paid for (under the version guard)."""
    order = load_order(uow.conn, order_no)
    if order is not None:
        update_columns(uow, order, refunded_amount=order.refunded_amount + amount)
