"""Orders: reading them, guarded state transitions (version column) and their timeline."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, insert, select, update

from domain.errors import ConcurrentUpdate, Reason, Refusal
from domain.status import OrderAction, OrderStatus, next_order_status, parent_status
from store import numbers
from store import tables as t
from store.placement_reads import PlacementWindow

if TYPE_CHECKING:
    from store.uow import UnitOfWork


# The timestamp column a parent's derived status stamps.
_DERIVED_STAMPS = {
    OrderStatus.SHIPPED: "shipped_at",
    OrderStatus.COMPLETED: "completed_at",
    OrderStatus.CLOSED: "closed_at",
}


class SqlOrders:
    """The `orders` repository on PostgreSQL (store.ports.Orders): orders, their lines, children,
    guarded status transitions (version column) and the timeline (through `uow.record`)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def load(self, order_no: str, lock: bool = True) -> Row[Any] | None:
        """One order row, locked FOR UPDATE by default so concurrent commands on it serialise."""
        stmt = select(t.orders).where(t.orders.c.order_no == order_no)
        if lock:
            stmt = stmt.with_for_update()
        return self.uow.conn.execute(stmt).first()

    def require(self, order_no: str, lock: bool = True) -> Row[Any]:
        """The order, or Refusal(UNKNOWN_ORDER)."""
        order = self.load(order_no, lock)
        if order is None:
            raise Refusal(Reason.UNKNOWN_ORDER, f"no order {order_no}", order_no=order_no)
        return order

    def children(self, parent_no: str, lock: bool = False) -> list[Row[Any]]:
        """A parent's children in order-number order (locked FOR UPDATE when asked)."""
        stmt = select(t.orders).where(t.orders.c.parent_no == parent_no).order_by(t.orders.c.order_no)
        if lock:
            stmt = stmt.with_for_update()
        return list(self.uow.conn.execute(stmt).all())

    def items(self, order: Row[Any]) -> list[Row[Any]]:
        """An order's lines: a parent's own, or the lines a child ships."""
        column = t.order_items.c.child_order_no if order.parent_no else t.order_items.c.order_no
        stmt = select(t.order_items).where(column == order.order_no).order_by("line_no")
        return list(self.uow.conn.execute(stmt).all())

    def set_status(
        self,
        order: Row[Any],
        to_status: str,
        action: str,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> None:
        """Write a new status (and other columns) if the order's version is unchanged; log it."""
        self._guarded(order, status=to_status, **columns)
        self.uow.record(order.order_no, action, order.status, to_status, actor, detail)

    def transition(
        self,
        order: Row[Any],
        action: OrderAction,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> str:
        """Apply `action` through the state machine table; Refusal(INVALID_STATE) when not allowed."""
        to_status = next_order_status(order.status, action)
        self.set_status(order, to_status, action.value, actor, detail, **columns)
        return to_status

    def update(self, order: Row[Any], **columns: Any) -> None:
        """Change columns other than the status, under the same version guard."""
        self._guarded(order, **columns)

    def _guarded(self, order: Row[Any], **columns: Any) -> None:
        result = self.uow.conn.execute(
            update(t.orders)
            .where(t.orders.c.order_no == order.order_no, t.orders.c.version == order.version)
            .values(version=order.version + 1, updated_at=self.uow.now, **columns)
        )
        if result.rowcount != 1:
            raise ConcurrentUpdate(f"order {order.order_no} changed under us")

    def recompute_parent(self, parent_no: str, actor: str) -> str | None:
        """Derive a parent's status from its children (shipped when all are, ...); returns it if
        changed. Announcing it is the caller's (consumers.common.derive_parent)."""
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
        """`order_no`, `user_id` and `request_id` of an order for a refusal event (None when unknown)."""
        order = self.load(order_no, lock=False) if order_no else None
        if order is None:
            return {"order_no": order_no, "user_id": None, "request_id": None}
        request_id = order.request_id
        if request_id is None and order.parent_no:
            request_id = self.uow.conn.execute(
                select(t.orders.c.request_id).where(t.orders.c.order_no == order.parent_no)
            ).scalar()
        return {"order_no": order.order_no, "user_id": order.user_id, "request_id": request_id}

    def add_refunded(self, order_no: str, amount: int) -> None:
        """Count a refund that succeeded against the order it was paid for (under the version guard)."""
        order = self.load(order_no)
        if order is not None:
            self.update(order, refunded_amount=order.refunded_amount + amount)

    def next_number(self, kind: str) -> str:
        """A new business number of `kind` (numbers.ORDER, AFTERSALE, REFUND); in a placement
        window, from the sequence values the window read up front."""
        reads = self.uow.prefetched
        if kind == numbers.ORDER and isinstance(reads, PlacementWindow):
            seq = reads.next_sequence()
            if seq is not None:
                return numbers.format_number(kind, self.uow.now, seq)
        return numbers.next_number(self.uow.conn, kind, self.uow.now)

    def find_request(self, user_id: str, request_id: str) -> str | None:
        """The parent order this user's request already made, if any."""
        reads = self.uow.prefetched
        if isinstance(reads, PlacementWindow):
            return reads.existing.get((user_id, request_id))
        return self.uow.conn.execute(
            select(t.orders.c.order_no).where(
                t.orders.c.user_id == user_id,
                t.orders.c.request_id == request_id,
                t.orders.c.parent_no.is_(None),
            )
        ).scalar()

    def create(self, order: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Insert a new order and its lines (through `uow.insert`: a batched window writes them at
        its end). Later messages of a placement window see its request as made."""
        self.uow.insert(t.orders, [order])
        self.uow.insert(t.order_items, items)
        reads = self.uow.prefetched
        if isinstance(reads, PlacementWindow) and order.get("request_id") is not None:
            reads.existing[(order["user_id"], order["request_id"])] = order["order_no"]

    def timeline_has(self, order_no: str, action: str, **detail: str) -> bool:
        """Whether the order's timeline has a line of `action` whose detail has these text values."""
        column = t.order_timeline.c.detail
        stmt = select(t.order_timeline.c.id).where(
            t.order_timeline.c.order_no == order_no,
            t.order_timeline.c.action == action,
            *(column[key].astext == value for key, value in detail.items()),
        )
        return self.uow.conn.execute(stmt.limit(1)).first() is not None

    def insert_child(self, parent: Row[Any], order_no: str, line_nos: list[int], **columns: Any) -> None:
        """Insert a child of a paid parent (its buyer, type, receiver, payment and times copied;
        status, money and merchant/warehouse from `columns`), and give it the parent's lines
        `line_nos` to ship. Logging the split is the caller's."""
        self.uow.conn.execute(
            insert(t.orders).values(
                order_no=order_no,
                parent_no=parent.order_no,
                user_id=parent.user_id,
                order_type=parent.order_type,
                receiver=parent.receiver,
                payment_no=parent.payment_no,
                placed_at=parent.placed_at,
                paid_at=parent.paid_at,
                updated_at=self.uow.now,
                **columns,
            )
        )
        self.uow.conn.execute(
            update(t.order_items)
            .where(t.order_items.c.order_no == parent.order_no, t.order_items.c.line_no.in_(line_nos))
            .values(child_order_no=order_no)
        )

    def lock_for_timeout(self, order_nos: list[str]) -> list[Row[Any]]:
        """What the payment timeout of a window decides on (order_no, user_id, coupon_code,
        status, parent_no, pay_deadline) of these orders, locked by primary key in order.

        The status is checked by the caller, not in the WHERE clause: with it, a planner without
        fresh statistics (a new or bulk-loaded table, autovacuum off) read the whole
        unpaid-orders partial index for every window: 300 cancellations a second with 1,000,000
        pending."""
        c = t.orders.c
        return list(
            self.uow.conn.execute(
                select(c.order_no, c.user_id, c.coupon_code, c.status, c.parent_no, c.pay_deadline)
                .where(c.order_no.in_(order_nos))
                .order_by(c.order_no)
                .with_for_update()
            ).all()
        )

    def set_status_many(self, order_nos: list[str], to_status: str, **columns: Any) -> None:
        """Write a status (and columns) on orders the caller holds locked (`lock_for_timeout`),
        by primary key, in one statement; the timeline is the caller's."""
        self.uow.conn.execute(
            update(t.orders)
            .where(t.orders.c.order_no.in_(order_nos))
            .values(status=to_status, version=t.orders.c.version + 1, updated_at=self.uow.now, **columns)
        )


def overdue_unpaid(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """The payment sweeper's query: unpaid parents whose pay deadline is before `cutoff`, oldest
    first, locked so several sweepers share them (SKIP LOCKED)."""
    stmt = (
        select(t.orders.c.order_no)
        .where(
            t.orders.c.status == OrderStatus.PENDING_PAYMENT,
            t.orders.c.parent_no.is_(None),
            t.orders.c.pay_deadline < cutoff,
        )
        .order_by(t.orders.c.pay_deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [str(order_no) for order_no in conn.execute(stmt).scalars()]


def overdue_receipts(
    conn: Connection, cutoff: datetime, limit: int, auto_confirm_after: timedelta
) -> list[str]:
    """The auto-confirm sweeper's query: shipped children whose deadline (shipped_at plus
    `auto_confirm_after`) is before `cutoff`, oldest first (SKIP LOCKED)."""
    rows = conn.execute(
        select(t.orders.c.order_no)
        .where(t.orders.c.status == OrderStatus.SHIPPED, t.orders.c.shipped_at < cutoff - auto_confirm_after)
        .order_by(t.orders.c.shipped_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [r.order_no for r in rows]
