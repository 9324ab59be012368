"""The `orders` repository in memory (store/orders.py `SqlOrders`, the same semantics)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.status import OrderAction, OrderStatus, next_order_status, parent_status
from store import numbers
from testing.fakes.db import Record

if TYPE_CHECKING:
    from testing.fakes.uow import FakeUnitOfWork

_DERIVED_STAMPS = {
    OrderStatus.SHIPPED: "shipped_at",
    OrderStatus.COMPLETED: "completed_at",
    OrderStatus.CLOSED: "closed_at",
}


class FakeOrders:
    """Orders, their lines and children in the fake's tables; guarded writes as the SQL does
    them (a stale version raises ConcurrentUpdate), the timeline through `uow.record`."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self.uow = uow
        self.db = uow.db

    def load(self, order_no: str, lock: bool = True) -> Record | None:
        return self.db.one("orders", order_no=order_no)

    def require(self, order_no: str, lock: bool = True) -> Record:
        order = self.load(order_no, lock)
        if order is None:
            raise Refusal(Reason.UNKNOWN_ORDER, f"no order {order_no}", order_no=order_no)
        return order

    def children(self, parent_no: str, lock: bool = False) -> list[Record]:
        return sorted(self.db.rows("orders", parent_no=parent_no), key=lambda r: r.order_no)

    def items(self, order: Record) -> list[Record]:
        if order.parent_no:
            rows = self.db.rows("order_items", child_order_no=order.order_no)
        else:
            rows = self.db.rows("order_items", order_no=order.order_no)
        return sorted(rows, key=lambda r: r.line_no)

    def set_status(
        self,
        order: Record,
        to_status: str,
        action: str,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> None:
        self._guarded(order, status=to_status, **columns)
        self.uow.record(order.order_no, action, order.status, to_status, actor, detail)

    def transition(
        self,
        order: Record,
        action: OrderAction,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> str:
        to_status = next_order_status(order.status, action)
        self.set_status(order, to_status, action.value, actor, detail, **columns)
        return to_status

    def update(self, order: Record, **columns: Any) -> None:
        self._guarded(order, **columns)

    def _guarded(self, order: Record, **columns: Any) -> None:
        """UPDATE orders ... WHERE order_no = :no AND version = :read_version (one row, or none)."""
        changed = self.db.update_where(
            "orders",
            {"version": order.version + 1, "updated_at": self.uow.now, **columns},
            order_no=order.order_no,
            version=order.version,
        )
        if len(changed) != 1:
            raise ConcurrentUpdate(f"order {order.order_no} changed under us")

    def recompute_parent(self, parent_no: str, actor: str) -> str | None:
        parent = self.load(parent_no)
        if parent is None:
            return None
        children = self.children(parent_no)
        if not children:
            return None
        derived = parent_status([c.status for c in children])
        if derived == parent.status:
            return None
        stamp = _DERIVED_STAMPS.get(derived)
        stamps = {stamp: self.uow.now} if stamp else {}
        self.set_status(parent, derived, "DERIVE_FROM_CHILDREN", actor, None, **stamps)
        return derived.value

    def refusal_subject(self, order_no: str | None) -> dict[str, Any]:
        order = self.load(order_no, lock=False) if order_no else None
        if order is None:
            return {"order_no": order_no, "user_id": None, "request_id": None}
        request_id = order.request_id
        if request_id is None and order.parent_no:
            parent = self.load(order.parent_no, lock=False)
            request_id = parent.request_id if parent is not None else None
        return {"order_no": order.order_no, "user_id": order.user_id, "request_id": request_id}

    def add_refunded(self, order_no: str, amount: int) -> None:
        order = self.load(order_no)
        if order is not None:
            self.update(order, refunded_amount=order.refunded_amount + amount)

    def next_number(self, kind: str) -> str:
        return numbers.format_number(kind, self.uow.now, self.db.next_value("order_no_seq"))

    def find_request(self, user_id: str, request_id: str) -> str | None:
        order = self.db.one("orders", user_id=user_id, request_id=request_id, parent_no=None)
        return order.order_no if order is not None else None

    def create(self, order: dict[str, Any], items: list[dict[str, Any]]) -> None:
        self.uow.insert("orders", [order])
        self.uow.insert("order_items", items)

    def timeline_has(self, order_no: str, action: str, **detail: str) -> bool:
        """As the SQL: `detail->>key = value` for each key (a JSON value compared as its text)."""

        def matches(line: Record) -> bool:
            kept = line.detail or {}
            return all(key in kept and _json_text(kept[key]) == value for key, value in detail.items())

        return self.db.count("order_timeline", matches, order_no=order_no, action=action) > 0

    def insert_child(self, parent: Record, order_no: str, line_nos: list[int], **columns: Any) -> None:
        self.db.insert(
            "orders",
            {
                "order_no": order_no,
                "parent_no": parent.order_no,
                "user_id": parent.user_id,
                "order_type": parent.order_type,
                "receiver": parent.receiver,
                "payment_no": parent.payment_no,
                "placed_at": parent.placed_at,
                "paid_at": parent.paid_at,
                "updated_at": self.uow.now,
                **columns,
            },
        )
        wanted = set(line_nos)
        self.db.update_where(
            "order_items",
            {"child_order_no": order_no},
            lambda item: item.line_no in wanted,
            order_no=parent.order_no,
        )

    def lock_for_timeout(self, order_nos: list[str]) -> list[Record]:
        wanted = set(order_nos)
        return sorted(self.db.rows("orders", lambda o: o.order_no in wanted), key=lambda o: o.order_no)

    def set_status_many(self, order_nos: list[str], to_status: str, **columns: Any) -> None:
        for order in self.lock_for_timeout(order_nos):
            changes = {"status": to_status, "version": order.version + 1, "updated_at": self.uow.now}
            self.db.update(order, **changes, **columns)


def _json_text(value: Any) -> str | None:
    """PostgreSQL's `->>`: a string as it is, null as NULL, anything else as its JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": ")) if isinstance(value, dict | list) else json.dumps(value)
