"""Every event the service publishes on order.events, as a typed model built in one place.

A handler announces an event with `uow.emit(OrderCancelled(...))`. The body on the wire is
the model's fields that were given (`exclude_unset`), so an event whose producers send
different optional fields keeps exactly the body each one sends today. Timestamps are the
ISO strings the contract shows. `EVENTS` maps every routing key to its model: the relay, the
client package and the contract document read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from domain.names import Evt


class Event(BaseModel):
    """One event: `name` is its routing key on order.events."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, by_alias=True)


EVENTS: dict[str, type[Event]] = {}


E = TypeVar("E", bound=Event)


def event(name: str) -> Callable[[type[E]], type[E]]:
    """Class decorator: name an event model and register it in EVENTS (one model per name)."""

    def register(cls: type[E]) -> type[E]:
        if name in EVENTS:
            raise ValueError(f"two models for event {name}")
        cls.name = name
        EVENTS[name] = cls
        return cls

    return register


# ---------------------------------------------------------------------------------------------
# Shared parts of bodies


class StockItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sku: str
    warehouse_id: str
    quantity: int


# ---------------------------------------------------------------------------------------------
# The events (keep them grouped by the consumer that emits them)


@event(Evt.COMMAND_REJECTED)
class CommandRejected(Event):
    message_id: str | None
    routing_key: str
    code: str
    reason: str


@event(Evt.STOCK_RELEASED)
class StockReleased(Event):
    order_no: str
    items: list[dict[str, Any]]


# Order status events several consumers emit (fields beyond order_no and status: as each site
# sends them; the parent's derived status, consumers.common.derive_parent, sends
# `derived_from_children`).


@event(Evt.ORDER_SHIPPED)
class OrderShipped(Event):
    order_no: str
    status: str
    parent_no: str | None = None
    user_id: str | None = None
    merchant_id: str | None = None
    carrier: str | None = None
    tracking_no: str | None = None
    shipped_at: str | None = None
    auto_confirm_at: str | None = None
    derived_from_children: bool | None = None


@event(Evt.ORDER_COMPLETED)
class OrderCompleted(Event):
    order_no: str
    status: str
    parent_no: str | None = None
    user_id: str | None = None
    completed_at: str | None = None
    auto_confirmed: bool | None = None
    derived_from_children: bool | None = None


@event(Evt.ORDER_CLOSED)
class OrderClosed(Event):
    order_no: str
    status: str
    parent_no: str | None = None
    user_id: str | None = None
    reason: str | None = None
    refund_no: str | None = None
    refunded_amount: int | None = None
    closed_at: str | None = None
    derived_from_children: bool | None = None


@event(Evt.ORDER_REJECTED)
class OrderRejected(Event):
    """A refused command about an order (placement, cancellation, fulfillment, after-sales):
    each site sends the fields it has (placement: no `command`; after-sales: `aftersale_no`,
    `merchant_id` when the command names them)."""

    reason: str
    order_no: str | None = None
    request_id: str | None = None
    user_id: str | None = None
    detail: str | None = None
    command: str | None = None
    aftersale_no: str | None = None
    merchant_id: str | None = None
    refundable: int | None = None  # a refund or after-sale asking more than remains refundable


# placement (consumers/placement.py)


@event(Evt.ORDER_CREATED)
class OrderCreated(Event):
    order_no: str
    status: str
    request_id: str
    user_id: str
    order_type: str
    goods_total: int
    freight: int
    discount_total: int
    payable: int
    coupon_code: str | None
    pay_deadline: str
    placed_at: str
    # line_no, sku, name, merchant_id, warehouse_id, unit_price, quantity, line_total
    items: list[dict[str, Any]]


@event(Evt.STOCK_LOCKED)
class StockLocked(Event):
    order_no: str
    items: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Prebuilt:
    """An event whose body a typed builder below wrote as a dict: placement is the hot path, and
    validating then dumping a model costs it several microseconds a message. The body has exactly
    the fields of the model registered for `name` (tests/unit/handlers/test_placement.py checks)."""

    name: str
    payload: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return self.payload


def order_created(  # noqa: PLR0913  keyword-only, one parameter per OrderCreated field
    *,
    order_no: str,
    status: str,
    request_id: str,
    user_id: str,
    order_type: str,
    goods_total: int,
    freight: int,
    discount_total: int,
    payable: int,
    coupon_code: str | None,
    pay_deadline: str,
    placed_at: str,
    items: list[dict[str, Any]],
) -> Prebuilt:
    """order.created (the OrderCreated model's fields)."""
    return Prebuilt(
        OrderCreated.name,
        {
            "order_no": order_no,
            "status": status,
            "request_id": request_id,
            "user_id": user_id,
            "order_type": order_type,
            "goods_total": goods_total,
            "freight": freight,
            "discount_total": discount_total,
            "payable": payable,
            "coupon_code": coupon_code,
            "pay_deadline": pay_deadline,
            "placed_at": placed_at,
            "items": items,
        },
    )


def stock_locked(*, order_no: str, items: list[dict[str, Any]]) -> Prebuilt:
    """stock.locked (the StockLocked model's fields)."""
    return Prebuilt(StockLocked.name, {"order_no": order_no, "items": items})


# catalog (consumers/catalog.py)


@event(Evt.SKU_UPSERTED)
class SkuUpserted(Event):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    sku: str
    sku_name: str = Field(alias="name")  # `name` is the event's routing key
    unit_price: int
    merchant_id: str
    warehouse_id: str


@event(Evt.STOCK_RESTOCKED)
class StockRestocked(Event):
    sku: str
    warehouse_id: str
    quantity: int
    available: int
    items: list[dict[str, Any]]


@event(Evt.COUPON_GRANTED)
class CouponGranted(Event):
    code: str
    user_id: str
    amount: int
    min_spend: int
    expires_at: str
    state: str
    already_granted: bool


# payment (consumers/payment.py, consumers/cancel.py, consumers/refunds.py)


@event(Evt.ORDER_PAID)
class OrderPaid(Event):
    order_no: str
    status: str
    user_id: str
    payment_no: str
    method: str
    amount: int
    paid_at: str


@event(Evt.STOCK_DEDUCTED)
class StockDeducted(Event):
    order_no: str
    items: list[dict[str, Any]]


class SplitChild(BaseModel):
    """One child order of `order.split`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    order_no: str
    status: str
    merchant_id: str
    warehouse_id: str
    goods_total: int
    freight: int
    discount_total: int
    payable: int
    # line_no, sku, name, merchant_id, warehouse_id, unit_price, quantity, line_total
    items: list[dict[str, Any]]


@event(Evt.ORDER_SPLIT)
class OrderSplit(Event):
    order_no: str
    status: str
    payable: int
    children: list[SplitChild]


@event(Evt.ORDER_CANCELLED)
class OrderCancelled(Event):
    order_no: str
    status: str
    reason: str
    user_id: str
    coupon_code: str | None  # the coupon given back, if any
    cancelled_at: str


@event(Evt.PAYMENT_REJECTED)
class PaymentRejected(Event):
    order_no: str
    payment_no: str
    amount: int
    reason: str
    detail: str


@event(Evt.STOCK_RESTORED)
class StockRestored(Event):
    """Sold units back on sale (user cancel refunded; merchant cancel sends parent_no, reason)."""

    order_no: str
    parent_no: str | None = None
    reason: str | None = None
    items: list[dict[str, Any]]


@event(Evt.REFUND_REQUESTED)
class RefundRequested(Event):
    refund_no: str
    order_no: str
    amount: int
    reason: str  # the refund's source: USER_CANCEL, LATE_PAYMENT, AFTERSALE, ...
    payment_no: str | None
    refund_status: str
    attempt: int | None = None  # a FAILED refund submitted again: its attempt number


class RefundSettled(Event):
    """The provider's result of a refund (`status` in events is kept for orders and after-sales)."""

    refund_no: str
    order_no: str
    amount: int
    reason: str
    refund_status: str
    provider_refund_no: str | None


@event(Evt.REFUND_SUCCEEDED)
class RefundSucceeded(RefundSettled):
    pass


@event(Evt.REFUND_FAILED)
class RefundFailed(RefundSettled):
    pass


# fulfillment (consumers/fulfillment.py)


@event(Evt.ORDER_ADDRESS_UPDATED)
class OrderAddressUpdated(Event):
    order_no: str
    user_id: str
    status: str
    receiver: dict[str, Any]  # name, phone, address
    orders: list[str]  # the parent and the children that took the new address


@event(Evt.ORDER_LOGISTICS_UPDATED)
class OrderLogisticsUpdated(Event):
    order_no: str
    status: str
    tracking_no: str
    logistics_status: str
    at: str
    detail: str
    current: bool  # not older than the update kept as the order's logistics status
    current_logistics_status: str | None


# after-sales (consumers/aftersale.py)


@event(Evt.AFTERSALE_REQUESTED)
class AftersaleRequested(Event):
    aftersale_no: str
    order_no: str
    status: str
    kind: str
    amount: int
    user_id: str
    merchant_id: str
    reason: str
    review_deadline: str


@event(Evt.AFTERSALE_APPROVED)
class AftersaleApproved(Event):
    aftersale_no: str
    order_no: str
    status: str
    kind: str
    amount: int
    by: str  # the merchant, or the system when the review ran out


@event(Evt.AFTERSALE_REJECTED)
class AftersaleRejected(Event):
    aftersale_no: str
    order_no: str
    status: str
    kind: str
    amount: int
    reason: str


@event(Evt.AFTERSALE_COMPLETED)
class AftersaleCompleted(Event):
    aftersale_no: str
    order_no: str
    status: str
    kind: str
    amount: int
    refund_no: str


@event(Evt.ORDER_REMARKED)
class OrderRemarked(Event):
    order_no: str
    author: str
    text: str
