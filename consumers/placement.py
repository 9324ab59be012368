"""Queue order.placement: placing orders with their stock locked and the payment timer started."""

from __future__ import annotations

from consumers.events import OrderRejected, order_created, stock_locked
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import OrderPlace
from domain import pricing
from domain.actors import user
from domain.errors import Reason, Refusal
from domain.names import PLACEMENT_QUEUE, Cmd, Timer
from domain.status import OrderStatus, OrderType
from settings import Settings
from store.numbers import ORDER
from store.placement_reads import PlacementWindow
from store.ports import UnitOfWork
from store.stock import StockMove


class OrderPlacement:
    """Prices an order server-side, locks its stock, holds its coupon and starts its pay deadline."""

    def __init__(self, settings: Settings) -> None:
        self.payment_timeout = settings.order_payment_timeout

    def place(self, cmd: OrderPlace, uow: UnitOfWork) -> None:
        existing = uow.orders.find_request(cmd.user_id, cmd.request_id)
        if existing:
            raise Refusal(
                Reason.DUPLICATE_REQUEST, "this request_id already made an order", order_no=existing
            )

        wanted = sorted({line.sku for line in cmd.items})
        snapshots = uow.catalog.snapshots(wanted)
        unknown = [sku for sku in wanted if sku not in snapshots]
        if unknown:
            raise Refusal(Reason.UNKNOWN_SKU, f"unknown SKU {', '.join(unknown)}")

        coupon = uow.coupons.load_for_order(cmd.coupon_code) if cmd.coupon_code else None
        physical = OrderType(cmd.order_type) is OrderType.PHYSICAL
        order_no = uow.orders.next_number(ORDER)

        # Lock in SKU order so that two multi-line orders never wait on each other in a cycle.
        numbered = list(enumerate(cmd.items, start=1))
        warehouses: dict[int, str] = {}
        for line_no, item in sorted(numbered, key=lambda pair: pair[1].sku):
            snap = snapshots[item.sku]
            warehouses[line_no] = uow.stock.lock_line(item.sku, item.quantity, snap.warehouse_id)

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

        # Every write below is an insert (a batched window writes them at its end), after all checks.
        items = [
            {
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
        uow.orders.create(
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
            },
            [{"order_no": order_no, **item} for item in items],
        )
        moves = [(ln.line_no, StockMove(ln.sku, ln.warehouse_id, ln.quantity)) for ln in lines]
        uow.stock.record_locks(order_no, moves)
        if cmd.coupon_code:
            uow.coupons.hold(cmd.coupon_code, order_no)

        uow.record(
            order_no,
            "PLACE",
            None,
            OrderStatus.PENDING_PAYMENT,
            user(cmd.user_id),
            {"payable": quote.payable, "request_id": cmd.request_id},
        )
        uow.emit(
            order_created(
                order_no=order_no,
                status=OrderStatus.PENDING_PAYMENT,
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                order_type=cmd.order_type,
                goods_total=quote.goods_total,
                freight=quote.freight,
                discount_total=quote.discount_total,
                payable=quote.payable,
                coupon_code=cmd.coupon_code,
                pay_deadline=deadline.isoformat(),
                placed_at=uow.now.isoformat(),
                items=items,
            )
        )
        uow.emit(stock_locked(order_no=order_no, items=[m.as_event_item() for _, m in moves]))
        uow.start_timer(Timer.PAYMENT_TIMEOUT, order_no, self.payment_timeout)

    @staticmethod
    def refuse(cmd: OrderPlace, refusal: Refusal, uow: UnitOfWork) -> None:
        uow.emit(
            OrderRejected(
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                reason=refusal.reason,
                detail=refusal.detail,
                **refusal.fields,  # type: ignore[arg-type]
            )
        )


def spec(settings: Settings) -> ConsumerSpec:
    placement = OrderPlacement(settings)
    routes = {
        Cmd.ORDER_PLACE: Route(
            OrderPlace, placement.place, placement.refuse, batchable=True, prefetch=PlacementWindow
        )
    }
    return ConsumerSpec(PLACEMENT_QUEUE, routes)  # bound from order.commands by its routes' keys
