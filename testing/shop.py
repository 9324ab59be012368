"""Given steps for the fulfillment and after-sale handler tests: a shop on the fake database.

Every step sends commands through `InProcessService` (the consumers' own routes, validation
and refusal handling, on a FakeUnitOfWork), so the state a test starts from is the one the
service itself makes: a SKU upserted and restocked, an order placed, paid and split.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import SecretStr

from domain import signing
from domain.names import Cmd, Evt
from settings import Settings
from testing.fakes.service import Answer, InProcessService

SECRET = "handler-tests-webhook-secret-4f1c2a"
RECEIVER = {"name": "Li Lei", "phone": "13800000000", "address": "1 Garden Road, Hangzhou"}
_serial = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_serial)}"


def new_service() -> InProcessService:
    """The service on a fresh fake database, default timeouts (review 5d, auto-confirm 10d)."""
    return InProcessService(Settings(payment_webhook_secret=SecretStr(SECRET)))


def signed(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "signature": signing.sign(body, SECRET)}


def last(svc: InProcessService, name: str, **fields: Any) -> dict[str, Any]:
    """The latest event `name` whose body has these fields."""
    found = [b for n, b in svc.db.events if n == name and all(b.get(k) == v for k, v in fields.items())]
    assert found, f"no {name} with {fields}; events: {[n for n, _ in svc.db.events]}"
    return found[-1]


def given_sku(svc: InProcessService, price: int, stock: int, merchant: str, warehouse: str = "W1") -> str:
    sku = unique("sku")
    svc.send(
        Cmd.SKU_UPSERT,
        {
            "sku": sku,
            "name": f"Item {sku}",
            "unit_price": price,
            "merchant_id": merchant,
            "warehouse_id": warehouse,
        },
    )
    svc.send(Cmd.STOCK_RESTOCK, {"sku": sku, "warehouse_id": warehouse, "quantity": stock})
    return sku


@dataclass(frozen=True)
class PaidOrder:
    """A paid, split order: its parent, buyer, payment and children (order_no -> split entry)."""

    parent_no: str
    user_id: str
    payment_no: str
    children: dict[str, dict[str, Any]]

    def child_of(self, merchant_id: str) -> str:
        return next(no for no, c in self.children.items() if c["merchant_id"] == merchant_id)


def given_paid_order(
    svc: InProcessService, lines: list[tuple[str, int]], user_id: str | None = None
) -> PaidOrder:
    """Place an order for these (sku, quantity) lines and pay it in full."""
    user_id = user_id or unique("user")
    request_id = unique("req")
    svc.send(
        Cmd.ORDER_PLACE,
        {
            "request_id": request_id,
            "user_id": user_id,
            "order_type": "physical",
            "items": [{"sku": sku, "quantity": qty} for sku, qty in lines],
            "receiver": RECEIVER,
        },
    )
    created = last(svc, Evt.ORDER_CREATED, request_id=request_id)
    payment_no = unique("pay")
    svc.send(
        Cmd.PAYMENT_NOTIFY,
        signed(
            {
                "order_no": created["order_no"],
                "payment_no": payment_no,
                "method": "card",
                "amount": created["payable"],
                "paid_at": svc.clock.now().isoformat(),
            }
        ),
    )
    split = last(svc, Evt.ORDER_SPLIT, order_no=created["order_no"])
    return PaidOrder(created["order_no"], user_id, payment_no, {c["order_no"]: c for c in split["children"]})


def one_child_order(
    svc: InProcessService, price: int = 3000, quantity: int = 1
) -> tuple[PaidOrder, str, str]:
    """A paid order of one merchant: the order, its child and the merchant."""
    merchant = unique("M")
    sku = given_sku(svc, price=price, stock=10, merchant=merchant)
    order = given_paid_order(svc, [(sku, quantity)])
    (child,) = order.children
    return order, child, merchant


def two_merchant_order(svc: InProcessService) -> tuple[PaidOrder, str, str]:
    """A paid order of two merchants (two children); the order and the two merchants."""
    m1, m2 = unique("M"), unique("M")
    tea = given_sku(svc, price=1200, stock=10, merchant=m1, warehouse="W1")
    pot = given_sku(svc, price=15000, stock=5, merchant=m2, warehouse="W2")
    order = given_paid_order(svc, [(tea, 2), (pot, 1)])
    assert len(order.children) == 2
    return order, m1, m2


def ship(svc: InProcessService, order_no: str, tracking_no: str | None = None) -> dict[str, Any]:
    tracking_no = tracking_no or unique("SF")
    svc.send(Cmd.ORDER_SHIP, {"order_no": order_no, "carrier": "SF", "tracking_no": tracking_no})
    return last(svc, Evt.ORDER_SHIPPED, order_no=order_no, tracking_no=tracking_no)


def refund_result(svc: InProcessService, refund_no: str, status: str = "SUCCEEDED") -> None:
    """The payment provider reports a refund's outcome (signed)."""
    svc.send(
        Cmd.REFUND_RESULT,
        signed({"refund_no": refund_no, "status": status, "provider_refund_no": unique("prov")}),
    )


def one(svc: InProcessService, table: str, **equals: Any) -> Any:
    """The row of `table` with these columns (asserting there is one)."""
    row = svc.db.one(table, **equals)
    assert row is not None, (table, equals)
    return row


def order(svc: InProcessService, order_no: str) -> Any:
    return one(svc, "orders", order_no=order_no)


def rejected(svc: InProcessService) -> dict[str, Any]:
    """The order.rejected of the last message (asserting it was a refusal)."""
    answer = svc.answers[-1]
    assert answer.names() == [Evt.ORDER_REJECTED], answer.events
    return answer.events[0][1]


def advance(svc: InProcessService, delta: timedelta, kind: str) -> list[Answer]:
    """Move the virtual clock by `delta`; the answers of the timers of `kind` that fired on the
    way (others, e.g. the payment timeout of a paid order, fire too and change nothing)."""
    target = svc.clock.now() + delta
    due = sorted((t for t in svc.db.timers if t["due_at"] <= target), key=lambda t: t["due_at"])
    fired = svc.advance(delta)
    assert len(fired) == len(due)
    return [answer for timer, answer in zip(due, fired, strict=True) if timer["kind"] == kind]
