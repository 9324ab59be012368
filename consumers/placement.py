"""Queue order.placement: placing orders with their stock locked and the payment timer started."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from consumers.loop import ConsumerSpec, Route
from consumers.schemas import OrderPlace
from domain import pricing
from domain.actors import user
from domain.errors import Reason, Refusal
from domain.names import COMMANDS_EXCHANGE, PLACEMENT_QUEUE, Cmd, Evt, Timer
from domain.status import OrderStatus, OrderType
from settings import Settings
from store import coupons, numbers
from store import tables as t
from store.stock import StockMove, WindowStockLocks, lock_rows
from store.uow import UnitOfWork


class PlacementReads:
    """What placing an order reads, one query at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def existing_order(self, user_id: str, request_id: str) -> str | None:
        """The order this user's request already made, if any."""
        return self.conn.execute(
            select(t.orders.c.order_no).where(
                t.orders.c.user_id == user_id,
                t.orders.c.request_id == request_id,
                t.orders.c.parent_no.is_(None),
            )
        ).scalar()

    def snapshots(self, skus: list[str]) -> dict[str, Row[Any]]:
        return {row.sku: row for row in self.conn.execute(select(t.skus).where(t.skus.c.sku.in_(skus))).all()}

    def order_number(self, now: datetime) -> str:
        return numbers.next_number(self.conn, numbers.ORDER, now)

    def made(self, user_id: str, request_id: str, order_no: str) -> None:
        """An order was made (seen by later messages of the same window)."""


class WindowPlacementReads(PlacementReads):
    """The same answers for a whole window, read with three queries up front."""

    def __init__(
        self, conn: Connection, commands: list[OrderPlace], window_stock: WindowStockLocks | None
    ) -> None:
        super().__init__(conn)
        wanted = {(c.user_id, c.request_id) for c in commands}
        skus = sorted({line.sku for c in commands for line in c.items})
        # Both columns as index conditions (IN is `= ANY`), the pairs picked out here: a row-value IN
        # list is only an OR filter to the planner, and before a new database's first ANALYZE it
        # scanned every parent order with it instead of looking the pairs up.
        self.existing: dict[tuple[str, str], str] = {
            (r.user_id, r.request_id): r.order_no
            for r in conn.execute(
                select(t.orders.c.user_id, t.orders.c.request_id, t.orders.c.order_no).where(
                    t.orders.c.parent_no.is_(None),
                    t.orders.c.user_id.in_(sorted({u for u, _ in wanted})),
                    t.orders.c.request_id.in_(sorted({r for _, r in wanted})),
                )
            )
            if (r.user_id, r.request_id) in wanted
        }
        self.skus = {row.sku: row for row in conn.execute(select(t.skus).where(t.skus.c.sku.in_(skus))).all()}
        self.numbers = list(numbers.next_numbers(conn, len(commands)))
        if window_stock is not None:
            window_stock.preload(conn, skus)

    def existing_order(self, user_id: str, request_id: str) -> str | None:
        return self.existing.get((user_id, request_id))

    def snapshots(self, skus: list[str]) -> dict[str, Row[Any]]:
        return {sku: self.skus[sku] for sku in skus if sku in self.skus}

    def order_number(self, now: datetime) -> str:
        if not self.numbers:
            return super().order_number(now)
        return numbers.format_number(numbers.ORDER, now, self.numbers.pop(0))

    def made(self, user_id: str, request_id: str, order_no: str) -> None:
        self.existing[(user_id, request_id)] = order_no


class OrderPlacement:
    """Prices an order server-side, locks its stock, holds its coupon and starts its pay deadline."""

    def __init__(self, settings: Settings) -> None:
        self.payment_timeout = settings.order_payment_timeout

    def place(self, cmd: OrderPlace, uow: UnitOfWork) -> None:
        conn = uow.conn
        reads = uow.prefetched if isinstance(uow.prefetched, PlacementReads) else PlacementReads(conn)
        existing = reads.existing_order(cmd.user_id, cmd.request_id)
        if existing:
            raise Refusal(
                Reason.DUPLICATE_REQUEST, "this request_id already made an order", order_no=existing
            )

        wanted = sorted({line.sku for line in cmd.items})
        snapshots = reads.snapshots(wanted)
        unknown = [sku for sku in wanted if sku not in snapshots]
        if unknown:
            raise Refusal(Reason.UNKNOWN_SKU, f"unknown SKU {', '.join(unknown)}")

        coupon = coupons.load_for_order(conn, cmd.coupon_code) if cmd.coupon_code else None
        physical = cmd.order_type == OrderType.PHYSICAL
        order_no = reads.order_number(uow.now)

        # Lock in SKU order so that two multi-line orders never wait on each other in a cycle.
        numbered = list(enumerate(cmd.items, start=1))
        warehouses: dict[int, str] = {}
        for line_no, item in sorted(numbered, key=lambda pair: pair[1].sku):
            snap = snapshots[item.sku]
            warehouses[line_no] = uow.lock_stock(item.sku, item.quantity, snap.warehouse_id)

        lines = [
            pricing.Line(
                line_no=line_no,
                sku=item.sku,
                name=snapshots[item.sku].name,
                merchant_id=snapshots[item.sku].merchant_id,
                warehouse_id=warehouses[line_no],
                unit_price=snapshots[item.sku].unit_price,
                quantity=item.quantity,
            )
            for line_no, item in numbered
        ]
        quote = pricing.quote(lines, physical, cmd.user_id, coupon, uow.now)
        deadline = uow.now + self.payment_timeout

        # Every write below goes through uow.insert, after all checks: the route is batchable.
        uow.insert(
            t.orders,
            [
                {
                    "order_no": order_no,
                    "user_id": cmd.user_id,
                    "request_id": cmd.request_id,
                    "order_type": cmd.order_type,
                    "status": OrderStatus.PENDING_PAYMENT,
                    "goods_total": quote.goods_total,
                    "freight": quote.freight,
                    "discount_total": quote.discount_total,
                    "payable": quote.payable,
                    "coupon_code": cmd.coupon_code,
                    "receiver": cmd.receiver.model_dump() if cmd.receiver else None,
                    "pay_deadline": deadline,
                    "placed_at": uow.now,
                    "updated_at": uow.now,
                }
            ],
        )
        items = [
            {
                "order_no": order_no,
                "line_no": ln.line_no,
                "sku": ln.sku,
                "name": ln.name,
                "merchant_id": ln.merchant_id,
                "warehouse_id": ln.warehouse_id,
                "unit_price": ln.unit_price,
                "quantity": ln.quantity,
                "line_total": ln.line_total,
            }
            for ln in lines
        ]
        uow.insert(t.order_items, items)
        moves = [(ln.line_no, StockMove(ln.sku, ln.warehouse_id, ln.quantity)) for ln in lines]
        uow.insert(t.stock_locks, lock_rows(order_no, moves))
        if cmd.coupon_code:
            coupons.hold(conn, cmd.coupon_code, order_no)

        uow.record(
            order_no,
            "PLACE",
            None,
            OrderStatus.PENDING_PAYMENT,
            user(cmd.user_id),
            {"payable": quote.payable, "request_id": cmd.request_id},
        )
        uow.emit(
            Evt.ORDER_CREATED,
            {
                "order_no": order_no,
                "status": OrderStatus.PENDING_PAYMENT,
                "request_id": cmd.request_id,
                "user_id": cmd.user_id,
                "order_type": cmd.order_type,
                "goods_total": quote.goods_total,
                "freight": quote.freight,
                "discount_total": quote.discount_total,
                "payable": quote.payable,
                "coupon_code": cmd.coupon_code,
                "pay_deadline": deadline.isoformat(),
                "placed_at": uow.now.isoformat(),
                "items": [{k: v for k, v in i.items() if k != "order_no"} for i in items],
            },
        )
        uow.emit(Evt.STOCK_LOCKED, {"order_no": order_no, "items": [m.as_event_item() for _, m in moves]})
        uow.start_timer(Timer.PAYMENT_TIMEOUT, order_no, self.payment_timeout)
        reads.made(cmd.user_id, cmd.request_id, order_no)

    @staticmethod
    def refuse(cmd: OrderPlace, refusal: Refusal, uow: UnitOfWork) -> None:
        uow.emit(
            Evt.ORDER_REJECTED,
            {
                "request_id": cmd.request_id,
                "user_id": cmd.user_id,
                "reason": refusal.reason,
                "detail": refusal.detail,
                **refusal.fields,
            },
        )


def spec(settings: Settings) -> ConsumerSpec:
    placement = OrderPlacement(settings)
    routes = {
        Cmd.ORDER_PLACE: Route(
            OrderPlace, placement.place, placement.refuse, batchable=True, prefetch=WindowPlacementReads
        )
    }
    return ConsumerSpec(PLACEMENT_QUEUE, routes, ((COMMANDS_EXCHANGE, Cmd.ORDER_PLACE),))
