"""Given/When steps the integration tests share, and the reads that check them.

Each step sends commands through the broker to a running `testing.system.System` and, where a
test needs it, waits for the event that says the step took effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika

from domain.names import Cmd, Evt
from testing.broker import EventListener
from testing.system import System, unique

RECEIVER = {"name": "Li Lei", "phone": "13800000000", "address": "1 Garden Road, Hangzhou"}


# --------------------------------------------------------------------------------------------
# Catalog


def given_sku(
    system: System, events: EventListener, price: int, stock: int, merchant: str = "M1", warehouse: str = "W1"
) -> str:
    """A new SKU of `merchant` with `stock` units in `warehouse` (none when stock is 0)."""
    sku = unique("sku")
    system.send(
        "sku.upsert",
        {
            "sku": sku,
            "name": f"Item {sku}",
            "unit_price": price,
            "merchant_id": merchant,
            "warehouse_id": warehouse,
        },
    )
    events.one("sku.upserted", sku=sku)
    if stock:
        system.send("stock.restock", {"sku": sku, "warehouse_id": warehouse, "quantity": stock})
        events.one("stock.restocked", sku=sku)
    return sku


def given_coupon(system: System, events: EventListener, user: str, amount: int) -> str:
    code = unique("coupon")
    system.send(
        Cmd.COUPON_GRANT,
        {
            "code": code,
            "user_id": user,
            "amount": amount,
            "min_spend": 0,
            "expires_at": "2099-01-01T00:00:00Z",
        },
    )
    events.one(Evt.COUPON_GRANTED, code=code)
    return code


# --------------------------------------------------------------------------------------------
# Placing, paying and cancelling orders


def place(
    system: System, user: str, items: list[dict], request_id: str | None = None, **extra: object
) -> str:
    """Send order.place for a physical order (without waiting); returns the message id."""
    body = {
        "request_id": request_id or unique("req"),
        "user_id": user,
        "order_type": "physical",
        "items": items,
        "receiver": RECEIVER,
        **extra,
    }
    return system.send("order.place", body)


def place_order(
    system: System,
    events: EventListener,
    user: str,
    items: list[dict[str, Any]],
    order_type: str = "physical",
    **extra: Any,
) -> dict[str, Any]:
    """Place an order and return its order.created event."""
    request_id = unique("req")
    body: dict[str, Any] = {
        "request_id": request_id,
        "user_id": user,
        "order_type": order_type,
        "items": items,
        **extra,
    }
    if order_type == "physical":
        body["receiver"] = RECEIVER
    system.send(Cmd.ORDER_PLACE, body)
    return events.one(Evt.ORDER_CREATED, request_id=request_id, user_id=user)


def notify_body(system: System, order_no: str, amount: int, payment_no: str | None = None) -> dict[str, Any]:
    """A payment.notify body signed with the service's secret."""
    return system.signed(
        {
            "order_no": order_no,
            "payment_no": payment_no or unique("pay"),
            "method": "card",
            "amount": amount,
            "paid_at": datetime.now(UTC).isoformat(),
        }
    )


def pay(system: System, order_no: str, amount: int, payment_no: str | None = None) -> tuple[str, str]:
    """Send a signed payment; returns (message_id, payment_no)."""
    body = notify_body(system, order_no, amount, payment_no)
    return system.send(Cmd.PAYMENT_NOTIFY, body), body["payment_no"]


def refund_result(system: System, refund_no: str, status: str = "SUCCEEDED") -> str:
    """The payment provider reports a refund's outcome (signed)."""
    return system.send(
        Cmd.REFUND_RESULT,
        system.signed({"refund_no": refund_no, "status": status, "provider_refund_no": unique("prov")}),
    )


def cancel(system: System, order_no: str, user: str) -> str:
    return system.send(Cmd.ORDER_CANCEL, {"order_no": order_no, "user_id": user, "reason": "changed my mind"})


# --------------------------------------------------------------------------------------------
# Paid orders, shipping and after-sales


@dataclass(frozen=True)
class PaidOrder:
    """A paid and split order: its parent, user and children (order_no -> split entry)."""

    parent_no: str
    user_id: str
    children: dict[str, dict[str, Any]]

    def child_of(self, merchant_id: str) -> str:
        return next(no for no, c in self.children.items() if c["merchant_id"] == merchant_id)


def given_paid_order(
    system: System, events: EventListener, lines: list[tuple[str, int]], user_id: str | None = None
) -> PaidOrder:
    """Place an order for these (sku, quantity) lines and pay it at once (the pay timeout is 2s)."""
    user_id = user_id or unique("user")
    request_id = unique("req")
    system.send(
        Cmd.ORDER_PLACE,
        {
            "request_id": request_id,
            "user_id": user_id,
            "order_type": "physical",
            "items": [{"sku": sku, "quantity": qty} for sku, qty in lines],
            "receiver": RECEIVER,
        },
    )
    created = events.one(Evt.ORDER_CREATED, request_id=request_id, user_id=user_id)
    order_no = created["order_no"]
    system.send(
        Cmd.PAYMENT_NOTIFY,
        system.signed(
            {
                "order_no": order_no,
                "payment_no": unique("pay"),
                "method": "wechat",
                "amount": created["payable"],
                "paid_at": datetime.now(UTC).isoformat(),
            }
        ),
    )
    split = events.one(Evt.ORDER_SPLIT, order_no=order_no)
    return PaidOrder(order_no, user_id, {c["order_no"]: c for c in split["children"]})


def two_merchant_order(system: System, events: EventListener) -> tuple[PaidOrder, str, str]:
    """A paid order of two merchants (two children); returns it and the merchants."""
    m1, m2 = unique("M"), unique("M")
    tea = given_sku(system, events, price=1200, stock=10, merchant=m1, warehouse="W1")
    pot = given_sku(system, events, price=15000, stock=5, merchant=m2, warehouse="W2")
    order = given_paid_order(system, events, [(tea, 2), (pot, 1)])
    assert len(order.children) == 2
    return order, m1, m2


def one_child_order(
    system: System, events: EventListener, price: int = 3000
) -> tuple[PaidOrder, str, str, int]:
    """A paid order of one merchant: the order, its child, the merchant and the child's paid amount."""
    merchant = unique("M")
    sku = given_sku(system, events, price=price, stock=5, merchant=merchant)
    order = given_paid_order(system, events, [(sku, 1)])
    (child,) = order.children
    paid = int(system.db.scalar("SELECT paid_amount FROM orders WHERE order_no = %s", child))
    assert paid > 0
    return order, child, merchant, paid


def ship(system: System, events: EventListener, order_no: str) -> dict[str, Any]:
    tracking_no = unique("SF")
    system.send(Cmd.ORDER_SHIP, {"order_no": order_no, "carrier": "SF", "tracking_no": tracking_no})
    return events.one(Evt.ORDER_SHIPPED, order_no=order_no, tracking_no=tracking_no)


def request(
    system: System, events: EventListener, order: PaidOrder, child: str, kind: str, amount: int
) -> dict[str, Any]:
    """The user asks for an after-sale; returns aftersale.requested."""
    reason = unique("reason")
    system.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": order.user_id, "kind": kind, "amount": amount, "reason": reason},
    )
    return events.one(Evt.AFTERSALE_REQUESTED, order_no=child, reason=reason)


# --------------------------------------------------------------------------------------------
# Raw command properties (for malformed input)


def props(message_id: str | None, routing_key: str, **overrides: object) -> pika.BasicProperties:
    """The AMQP properties of a valid command, with `overrides` applied."""
    values: dict = {
        "message_id": message_id,
        "correlation_id": message_id,
        "type": routing_key,
        "content_type": "application/json",
        "delivery_mode": 2,
        "headers": {"x-schema-version": 1},
    }
    values.update(overrides)
    return pika.BasicProperties(**values)


# --------------------------------------------------------------------------------------------
# Reads for Then checks


def status_of(system: System, order_no: str) -> str:
    return str(system.db.scalar("SELECT status FROM orders WHERE order_no = %s", order_no))


def order_row(system: System, order_no: str) -> dict[str, Any]:
    return system.db.one("SELECT * FROM orders WHERE order_no = %s", order_no)


def stock_of(system: System, sku: str) -> dict:
    return system.db.one(
        "SELECT sum(available) AS available, sum(locked) AS locked, sum(sold) AS sold, "
        "sum(restocked_total) AS restocked FROM stock WHERE sku = %s",
        sku,
    )


def assert_stock_adds_up(system: System, *skus: str) -> dict[str, int]:
    """available + locked + sold == restocked_total for each SKU; returns the last SKU's counters."""
    counts: dict[str, int] = {}
    for sku in skus:
        counts = system.db.one(
            "SELECT sum(available)::int AS available, sum(locked)::int AS locked, sum(sold)::int AS sold, "
            "sum(restocked_total)::int AS restocked FROM stock WHERE sku = %s",
            sku,
        )
        assert counts["available"] + counts["locked"] + counts["sold"] == counts["restocked"], (sku, counts)
        assert min(counts["available"], counts["locked"], counts["sold"]) >= 0, (sku, counts)
    return counts
