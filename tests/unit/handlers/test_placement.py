"""consumers/placement.py on the fake unit of work: pricing, stock locks, coupons, refusals."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from consumers import catalog, placement
from consumers.events import OrderCreated, StockLocked, order_created, stock_locked
from consumers.outcomes import Applied, Duplicate
from domain.names import CATALOG_QUEUE, PLACEMENT_QUEUE, Cmd, Evt, Timer
from settings import Settings
from testing.fakes.service import InProcessService

RECEIVER = {"name": "Ann", "phone": "123", "address": "1 Road"}
TIMEOUT = timedelta(minutes=15)


@pytest.fixture
def svc() -> InProcessService:
    settings = Settings(order_payment_timeout=TIMEOUT)
    service = InProcessService(
        settings, specs={CATALOG_QUEUE: catalog.spec(settings), PLACEMENT_QUEUE: placement.spec(settings)}
    )
    for sku, price, merchant, warehouse in [
        ("tea", 1500, "M1", "W1"),
        ("cup", 4000, "M1", "W1"),
        ("pen", 300, "M2", "W2"),
    ]:
        service.send(
            Cmd.SKU_UPSERT,
            {
                "sku": sku,
                "name": sku.title(),
                "unit_price": price,
                "merchant_id": merchant,
                "warehouse_id": warehouse,
            },
        )
        service.send(Cmd.STOCK_RESTOCK, {"sku": sku, "warehouse_id": warehouse, "quantity": 10})
    return service


def place(
    svc: InProcessService,
    items: list[tuple[str, int]],
    user_id: str = "u1",
    request_id: str = "r1",
    message_id: str | None = None,
    **extra: Any,
) -> list[tuple[str, dict[str, Any]]]:
    body = {
        "request_id": request_id,
        "user_id": user_id,
        "order_type": "physical",
        "items": [{"sku": s, "quantity": q} for s, q in items],
        "receiver": RECEIVER,
        **extra,
    }
    answer = svc.deliver(Cmd.ORDER_PLACE, body, message_id or f"m-{user_id}-{request_id}-{len(svc.answers)}")
    assert answer.outcome == Applied()
    return answer.events


def stock(svc: InProcessService, sku: str, warehouse: str) -> tuple[int, int, int]:
    row = svc.db.one("stock", sku=sku, warehouse_id=warehouse)
    assert row is not None
    return row.available, row.locked, row.sold


def grant(
    svc: InProcessService, code: str = "C1", user_id: str = "u1", amount: int = 500, min_spend: int = 0
) -> None:
    expires = svc.clock.now() + timedelta(days=1)
    svc.send(
        Cmd.COUPON_GRANT,
        {
            "code": code,
            "user_id": user_id,
            "amount": amount,
            "min_spend": min_spend,
            "expires_at": expires.isoformat(),
        },
    )


def test_place_prices_locks_stock_and_starts_the_pay_deadline(svc: InProcessService) -> None:
    now = svc.clock.now()
    events = place(svc, [("tea", 2), ("pen", 1)])
    assert [name for name, _ in events] == [Evt.ORDER_CREATED, Evt.STOCK_LOCKED]
    created = events[0][1]
    order_no = created["order_no"]
    assert created == {
        "order_no": order_no,
        "status": "PENDING_PAYMENT",
        "request_id": "r1",
        "user_id": "u1",
        "order_type": "physical",
        "goods_total": 3300,
        "freight": 1600,  # two packages (M1/W1, M2/W2), each under the free-freight threshold
        "discount_total": 0,
        "payable": 4900,
        "coupon_code": None,
        "pay_deadline": (now + TIMEOUT).isoformat(),
        "placed_at": now.isoformat(),
        "items": [
            {
                "line_no": 1,
                "sku": "tea",
                "name": "Tea",
                "merchant_id": "M1",
                "warehouse_id": "W1",
                "unit_price": 1500,
                "quantity": 2,
                "line_total": 3000,
            },
            {
                "line_no": 2,
                "sku": "pen",
                "name": "Pen",
                "merchant_id": "M2",
                "warehouse_id": "W2",
                "unit_price": 300,
                "quantity": 1,
                "line_total": 300,
            },
        ],
    }
    assert events[1][1] == {
        "order_no": order_no,
        "items": [
            {"sku": "tea", "warehouse_id": "W1", "quantity": 2},
            {"sku": "pen", "warehouse_id": "W2", "quantity": 1},
        ],
    }
    order = svc.db.one("orders", order_no=order_no)
    assert order is not None
    assert (order.status, order.payable, order.version, order.pay_deadline) == (
        "PENDING_PAYMENT",
        4900,
        1,
        now + TIMEOUT,
    )
    assert order.receiver == RECEIVER and order.parent_no is None
    assert [(i.line_no, i.sku, i.child_order_no) for i in svc.db.rows("order_items", order_no=order_no)] == [
        (1, "tea", None),
        (2, "pen", None),
    ]
    assert [(r.line_no, r.state, r.quantity) for r in svc.db.rows("stock_locks", order_no=order_no)] == [
        (1, "LOCKED", 2),
        (2, "LOCKED", 1),
    ]
    assert stock(svc, "tea", "W1") == (8, 2, 0) and stock(svc, "pen", "W2") == (9, 1, 0)
    assert [(r.action, r.to_status, r.actor) for r in svc.db.timeline(order_no)] == [
        ("PLACE", "PENDING_PAYMENT", "user:u1")
    ]
    assert svc.pending_timers(Timer.PAYMENT_TIMEOUT) == [
        {
            "kind": Timer.PAYMENT_TIMEOUT,
            "ref": order_no,
            "due_at": now + TIMEOUT,
            "extra": {},
            "correlation_id": _cid(svc, order_no),
        }
    ]


def _cid(svc: InProcessService, order_no: str) -> str | None:
    """The correlation id the order's outbox rows carry (the command's message id)."""
    row = svc.db.one("outbox", routing_key=Evt.ORDER_CREATED)
    assert row is not None and row.body["order_no"] == order_no
    return row.correlation_id


def test_free_freight_and_virtual_orders(svc: InProcessService) -> None:
    big = place(svc, [("cup", 3)], request_id="big")[0][1]
    assert (big["goods_total"], big["freight"], big["payable"]) == (12000, 0, 12000)
    virtual = svc.deliver(
        Cmd.ORDER_PLACE,
        {
            "request_id": "v",
            "user_id": "u1",
            "order_type": "virtual",
            "items": [{"sku": "pen", "quantity": 1}],
        },
        "mv",
    ).events[0][1]
    assert (virtual["order_type"], virtual["freight"], virtual["payable"]) == ("virtual", 0, 300)


def test_the_same_request_makes_one_order_even_under_a_new_message_id(svc: InProcessService) -> None:
    first = place(svc, [("tea", 1)])[0][1]["order_no"]
    again = place(svc, [("tea", 1)], message_id="another")
    assert again == [
        (
            Evt.ORDER_REJECTED,
            {
                "request_id": "r1",
                "user_id": "u1",
                "reason": "DUPLICATE_REQUEST",
                "detail": "this request_id already made an order",
                "order_no": first,
            },
        )
    ]
    assert svc.db.count("orders") == 1 and stock(svc, "tea", "W1") == (9, 1, 0)


def test_two_users_may_use_the_same_request_id(svc: InProcessService) -> None:
    a = place(svc, [("tea", 1)], user_id="u1")[0]
    b = place(svc, [("tea", 1)], user_id="u2")[0]
    assert a[0] == b[0] == Evt.ORDER_CREATED and a[1]["order_no"] != b[1]["order_no"]


def test_a_redelivered_message_is_applied_once(svc: InProcessService) -> None:
    place(svc, [("tea", 1)], message_id="same")
    body = {
        "request_id": "r1",
        "user_id": "u1",
        "order_type": "physical",
        "items": [{"sku": "tea", "quantity": 1}],
        "receiver": RECEIVER,
    }
    assert svc.send(Cmd.ORDER_PLACE, body, message_id="same") == Duplicate()
    assert svc.db.count("orders") == 1


def test_unknown_sku_is_refused(svc: InProcessService) -> None:
    events = place(svc, [("tea", 1), ("ghost", 1), ("alien", 2)])
    assert events == [
        (
            Evt.ORDER_REJECTED,
            {
                "request_id": "r1",
                "user_id": "u1",
                "reason": "UNKNOWN_SKU",
                "detail": "unknown SKU alien, ghost",
            },
        )
    ]
    assert svc.db.count("orders") == 0 and stock(svc, "tea", "W1") == (10, 0, 0)


def test_out_of_stock_is_refused_and_locks_nothing(svc: InProcessService) -> None:
    events = place(svc, [("cup", 1), ("tea", 11)])
    assert [(n, b["reason"]) for n, b in events] == [(Evt.ORDER_REJECTED, "OUT_OF_STOCK")]
    assert "order_no" not in events[0][1]
    assert stock(svc, "cup", "W1") == (10, 0, 0), "the line locked before the refusal is rolled back"
    assert svc.db.count("orders") == 0 and svc.db.count("stock_locks") == 0 and svc.pending_timers() == []


def test_exactly_the_stock_there_is_is_sold(svc: InProcessService) -> None:
    made = [place(svc, [("tea", 3)], request_id=f"r{i}")[0] for i in range(4)]
    assert [n for n, _ in made] == [Evt.ORDER_CREATED] * 3 + [Evt.ORDER_REJECTED]
    assert stock(svc, "tea", "W1") == (1, 9, 0)


def test_stock_comes_from_another_warehouse_when_the_skus_own_has_too_little(svc: InProcessService) -> None:
    svc.send(Cmd.STOCK_RESTOCK, {"sku": "tea", "warehouse_id": "W0", "quantity": 20})
    svc.send(Cmd.STOCK_RESTOCK, {"sku": "tea", "warehouse_id": "W5", "quantity": 20})
    near = place(svc, [("tea", 5)], request_id="near")
    assert near[1][1]["items"] == [{"sku": "tea", "warehouse_id": "W1", "quantity": 5}], (
        "its own warehouse first"
    )
    far = place(svc, [("tea", 6)], request_id="far")
    assert far[1][1]["items"] == [{"sku": "tea", "warehouse_id": "W0", "quantity": 6}], "then by warehouse id"
    assert far[0][1]["items"][0]["warehouse_id"] == "W0"
    assert stock(svc, "tea", "W0") == (14, 6, 0) and stock(svc, "tea", "W1") == (5, 5, 0)


def test_a_coupon_is_held_by_the_pending_order(svc: InProcessService) -> None:
    grant(svc, amount=500, min_spend=1000)
    created = place(svc, [("tea", 1)], coupon_code="C1")[0][1]
    assert (created["discount_total"], created["payable"], created["coupon_code"]) == (
        500,
        1500 + 800 - 500,
        "C1",
    )
    coupon = svc.db.one("coupons", code="C1")
    assert coupon is not None and (coupon.state, coupon.order_no) == ("HELD", created["order_no"])
    other = place(svc, [("tea", 1)], request_id="r2", coupon_code="C1")
    assert [(n, b["reason"], b["detail"]) for n, b in other] == [
        (Evt.ORDER_REJECTED, "COUPON_INVALID", "coupon is held")
    ]


@pytest.mark.parametrize(
    ("code", "owner", "min_spend", "expires_in", "detail"),
    [
        ("NONE", "u1", 0, timedelta(days=1), "no coupon NONE"),
        ("C1", "u2", 0, timedelta(days=1), "coupon belongs to another user"),
        ("C1", "u1", 5000, timedelta(days=1), "goods total 1500 is below min spend 5000"),
        ("C1", "u1", 0, timedelta(seconds=-1), "coupon has expired"),
    ],
)
def test_an_invalid_coupon_is_refused(
    svc: InProcessService, code: str, owner: str, min_spend: int, expires_in: timedelta, detail: str
) -> None:
    expires = svc.clock.now() + expires_in
    svc.send(
        Cmd.COUPON_GRANT,
        {
            "code": "C1",
            "user_id": owner,
            "amount": 100,
            "min_spend": min_spend,
            "expires_at": expires.isoformat(),
        },
    )
    events = place(svc, [("tea", 1)], coupon_code=code)
    assert [(n, b["reason"], b["detail"]) for n, b in events] == [
        (Evt.ORDER_REJECTED, "COUPON_INVALID", detail)
    ]
    coupon = svc.db.one("coupons", code="C1")
    assert coupon is not None and coupon.state == "AVAILABLE" and stock(svc, "tea", "W1") == (10, 0, 0)


def test_the_hot_path_builders_write_exactly_their_models_bodies() -> None:
    body = order_created(
        order_no="O1",
        status="PENDING_PAYMENT",
        request_id="r",
        user_id="u",
        order_type="physical",
        goods_total=1,
        freight=0,
        discount_total=0,
        payable=1,
        coupon_code=None,
        pay_deadline="2026-01-01T00:15:00+00:00",
        placed_at="2026-01-01T00:00:00+00:00",
        items=[{"line_no": 1, "sku": "s"}],
    ).body()
    assert body.keys() == OrderCreated.model_fields.keys()
    assert OrderCreated.model_validate(body).body() == body
    locked = stock_locked(order_no="O1", items=[{"sku": "s", "warehouse_id": "w", "quantity": 1}])
    assert locked.name == StockLocked.name == Evt.STOCK_LOCKED
    assert StockLocked.model_validate(locked.body()).body() == locked.body()
