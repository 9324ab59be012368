"""Pydantic schemas of every command body (wire contract v1); validated before any database work."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator


def _printable(value: str) -> str:
    """Identifiers are printable: no control, format or separator character but the space.

    (Control characters anywhere in a body are rejected before the schemas: consumers/wire.py.)
    """
    if not value.isprintable():
        at, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
        raise ValueError(f"must be printable text; U+{ord(char):04X} at position {at} is not")
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=64, strict=True), AfterValidator(_printable)]
Text = Annotated[str, Field(max_length=1000, strict=True)]
Quantity = Annotated[StrictInt, Field(gt=0, le=1_000_000)]
Money = Annotated[StrictInt, Field(ge=0, le=10**15)]
PositiveMoney = Annotated[StrictInt, Field(gt=0, le=10**15)]


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcTime = Annotated[datetime, AfterValidator(_as_utc)]


class Command(BaseModel):
    """Base of every command: unknown fields are ignored (fields may be added to the contract)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class SkuUpsert(Command):
    sku: Identifier
    name: Annotated[str, Field(min_length=1, max_length=255, strict=True)]
    unit_price: Money
    merchant_id: Identifier
    warehouse_id: Identifier


class StockRestock(Command):
    sku: Identifier
    warehouse_id: Identifier
    quantity: Quantity


class CouponGrant(Command):
    code: Identifier
    user_id: Identifier
    amount: PositiveMoney
    min_spend: Money
    expires_at: UtcTime


class OrderLine(Command):
    sku: Identifier
    quantity: Quantity


class Receiver(Command):
    name: Annotated[str, Field(min_length=1, max_length=128, strict=True)]
    phone: Annotated[str, Field(min_length=1, max_length=32, strict=True)]
    address: Annotated[str, Field(min_length=1, max_length=512, strict=True)]


class OrderPlace(Command):
    request_id: Identifier
    user_id: Identifier
    order_type: Literal["physical", "virtual"]
    items: Annotated[list[OrderLine], Field(min_length=1, max_length=200)]
    receiver: Receiver | None = None
    coupon_code: Identifier | None = None

    @model_validator(mode="after")
    def _physical_needs_receiver(self) -> OrderPlace:
        if self.order_type == "physical" and self.receiver is None:
            raise ValueError("a physical order needs a receiver")
        return self


class OrderUpdateAddress(Command):
    order_no: Identifier
    user_id: Identifier
    receiver: Receiver


class OrderCancel(Command):
    order_no: Identifier
    user_id: Identifier
    reason: Text = ""


class PaymentNotify(Command):
    order_no: Identifier
    payment_no: Identifier
    method: Identifier
    amount: Money
    paid_at: UtcTime
    signature: Annotated[str, Field(min_length=1, max_length=128, strict=True)]


class OrderShip(Command):
    order_no: Identifier
    carrier: Identifier
    tracking_no: Identifier


class LogisticsUpdate(Command):
    order_no: Identifier
    tracking_no: Identifier
    status: Identifier
    at: UtcTime
    detail: Text = ""


class OrderConfirmReceipt(Command):
    order_no: Identifier
    user_id: Identifier


class OrderRemark(Command):
    """v1.1: a free-text note on an order (parent or child), by its buyer, a merchant of its
    goods or an operator."""

    order_no: Identifier
    author: Annotated[
        str,
        Field(min_length=5, max_length=80, pattern=r"^(user|merchant|ops):\S+$", strict=True),
        AfterValidator(_printable),
    ]
    text: Annotated[str, Field(min_length=1, max_length=500, strict=True)]


class AftersaleRequest(Command):
    order_no: Identifier
    user_id: Identifier
    kind: Literal["REFUND_ONLY", "RETURN_REFUND"]
    amount: PositiveMoney
    reason: Text = ""


class AftersaleApprove(Command):
    aftersale_no: Identifier
    merchant_id: Identifier


class AftersaleReject(Command):
    aftersale_no: Identifier
    merchant_id: Identifier
    reason: Text = ""


class AftersaleReturnReceived(Command):
    aftersale_no: Identifier
    merchant_id: Identifier


class MerchantCancel(Command):
    order_no: Identifier
    merchant_id: Identifier
    reason: Text = ""


class RefundResult(Command):
    refund_no: Identifier
    status: Literal["SUCCEEDED", "FAILED"]
    provider_refund_no: Annotated[str, Field(max_length=64, strict=True)] | None = None
    signature: Annotated[str, Field(min_length=1, max_length=128, strict=True)]


TIMER_REFS_MAX = 1000


class TimerFired(Command):
    """A timer that ran out (internal, from the delay queues).

    It names one `ref`, or several `refs` that share its kind and due time (the timers of one
    window travel as one message; `store.uow.coalesce_timers`), each with the correlation id of
    the command that started it in `correlation_ids`.
    """

    kind: Identifier
    due_at: UtcTime
    ref: Identifier | None = None
    refs: Annotated[list[Identifier], Field(min_length=1, max_length=TIMER_REFS_MAX)] | None = None
    correlation_ids: (
        list[Annotated[str, Field(max_length=255, strict=True), AfterValidator(_printable)] | None] | None
    ) = None

    @model_validator(mode="after")
    def _names_its_refs(self) -> TimerFired:
        if (self.ref is None) == (self.refs is None):
            raise ValueError("a timer names either ref or refs")
        if self.correlation_ids is not None and len(self.correlation_ids) != len(self.refs or ()):
            raise ValueError("correlation_ids must match refs one for one")
        return self

    def targets(self, correlation_id: str | None) -> list[tuple[str, str | None]]:
        """(ref, correlation id) of each timer this message carries; `correlation_id` is the
        message's own, for a single timer or a ref without one of its own."""
        if self.refs is None:
            assert self.ref is not None
            return [(self.ref, correlation_id)]
        ids = self.correlation_ids or [None] * len(self.refs)
        return [(ref, cid or correlation_id) for ref, cid in zip(self.refs, ids, strict=True)]


def describe_errors(exc: ValidationError) -> str:
    """A readable one-line summary of a schema failure, e.g. `items.0.quantity: must be > 0`."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
