"""consumers/timeouts.py on the fake unit of work, with the virtual clock: the payment-timeout
timer flow end to end (placed, the clock passes the deadline, the timer fires through the
timeouts route), and how a timer message carrying several timers is applied."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from consumers import timeouts
from consumers.outcomes import Applied
from consumers.timers import TimerKind
from domain.errors import Reason, Refusal
from domain.names import TIMEOUTS_QUEUE, TIMERS_FIRED_EXCHANGE, Cmd, Evt, Timer
from settings import Settings
from store.ports import UnitOfWork
from testing.fakes.service import InProcessService

TIMEOUT = timedelta(minutes=15)
RECEIVER = {"name": "Ann", "phone": "123", "address": "1 Road"}


@pytest.fixture
def svc() -> InProcessService:
    service = InProcessService(
        Settings(order_payment_timeout=TIMEOUT, payment_webhook_secret=SecretStr("timeouts-test-secret-7d1e"))
    )
    service.send(
        Cmd.SKU_UPSERT,
        {"sku": "tea", "name": "Tea", "unit_price": 1500, "merchant_id": "M1", "warehouse_id": "W1"},
    )
    service.send(Cmd.STOCK_RESTOCK, {"sku": "tea", "warehouse_id": "W1", "quantity": 10})
    expires = service.clock.now() + timedelta(days=1)
    service.send(
        Cmd.COUPON_GRANT,
        {"code": "C1", "user_id": "u1", "amount": 300, "min_spend": 0, "expires_at": expires.isoformat()},
    )
    return service


def place(svc: InProcessService, request_id: str = "r1", **extra: Any) -> str:
    body = {
        "request_id": request_id,
        "user_id": "u1",
        "order_type": "physical",
        "items": [{"sku": "tea", "quantity": 4}],
        "receiver": RECEIVER,
        **extra,
    }
    answer = svc.deliver(Cmd.ORDER_PLACE, body, f"place-{request_id}")
    assert answer.names() == [Evt.ORDER_CREATED, Evt.STOCK_LOCKED]
    return str(answer.events[0][1]["order_no"])


def stock(svc: InProcessService) -> tuple[int, int]:
    row = svc.db.one("stock", sku="tea", warehouse_id="W1")
    assert row is not None
    return row.available, row.locked


def test_an_unpaid_order_is_cancelled_when_its_deadline_passes(svc: InProcessService) -> None:
    order_no = place(svc, coupon_code="C1")
    placed_at = svc.clock.now()
    assert stock(svc) == (6, 4)

    assert svc.advance(TIMEOUT - timedelta(seconds=1)) == [], "nothing is due before the deadline"
    (fired,) = svc.advance(timedelta(seconds=1))

    assert fired.outcome == Applied()
    assert fired.events == [
        (
            Evt.ORDER_CANCELLED,
            {
                "order_no": order_no,
                "status": "CANCELLED",
                "reason": "PAYMENT_TIMEOUT",
                "user_id": "u1",
                "coupon_code": "C1",
                "cancelled_at": (placed_at + TIMEOUT).isoformat(),
            },
        ),
        (
            Evt.STOCK_RELEASED,
            {"order_no": order_no, "items": [{"sku": "tea", "warehouse_id": "W1", "quantity": 4}]},
        ),
    ]
    order = svc.db.one("orders", order_no=order_no)
    assert order is not None and (order.status, order.cancelled_at, order.version) == (
        "CANCELLED",
        placed_at + TIMEOUT,
        2,
    )
    assert stock(svc) == (10, 0)
    assert [r.state for r in svc.db.rows("stock_locks", order_no=order_no)] == ["RELEASED"]
    coupon = svc.db.one("coupons", code="C1")
    assert coupon is not None and (coupon.state, coupon.order_no) == ("AVAILABLE", None)
    assert [(r.action, r.to_status, r.actor) for r in svc.db.timeline(order_no)][-1] == (
        "PAYMENT_TIMEOUT",
        "CANCELLED",
        "timer:payment-timeout",
    )
    # The events carry the correlation id of the order.place that started the timer.
    assert {
        r.correlation_id for r in svc.db.rows("outbox", lambda r: r.body.get("order_no") == order_no)
    } == {"place-r1"}
    # The coupon can be used again.
    assert place(svc, "r2", coupon_code="C1")


def test_a_timer_before_the_stored_deadline_changes_nothing(svc: InProcessService) -> None:
    order_no = place(svc)
    (timer,) = svc.pending_timers(Timer.PAYMENT_TIMEOUT)
    svc.clock.advance(TIMEOUT - timedelta(minutes=1))
    early = svc.fire(timer)  # delivered early (forged, or a delay queue misconfigured)
    assert early.outcome == Applied() and early.events == []
    order = svc.db.one("orders", order_no=order_no)
    assert order is not None and order.status == "PENDING_PAYMENT" and stock(svc) == (6, 4)
    svc.clock.advance(timedelta(minutes=1))
    assert svc.fire(timer).names() == [Evt.ORDER_CANCELLED, Evt.STOCK_RELEASED], "at the deadline it applies"


def test_a_timer_for_an_order_no_longer_unpaid_changes_nothing(svc: InProcessService) -> None:
    order_no = place(svc, coupon_code="C1")
    cancelled = svc.deliver(
        Cmd.ORDER_CANCEL, {"order_no": order_no, "user_id": "u1", "reason": "changed mind"}, "c1"
    )
    assert cancelled.names() == [Evt.ORDER_CANCELLED, Evt.STOCK_RELEASED]
    before = (svc.db.rows("orders"), svc.db.rows("stock"), svc.db.rows("coupons"), svc.db.rows("stock_locks"))
    (fired,) = svc.advance(TIMEOUT)
    assert fired.outcome == Applied() and fired.events == []
    assert (
        svc.db.rows("orders"),
        svc.db.rows("stock"),
        svc.db.rows("coupons"),
        svc.db.rows("stock_locks"),
    ) == before


def test_the_same_timer_delivered_twice_cancels_once(svc: InProcessService) -> None:
    place(svc)
    (timer,) = svc.pending_timers(Timer.PAYMENT_TIMEOUT)
    svc.clock.advance(TIMEOUT)
    assert svc.fire(timer).names() == [Evt.ORDER_CANCELLED, Evt.STOCK_RELEASED]
    assert svc.fire(timer).events == []
    assert stock(svc) == (10, 0)


def test_a_merged_timer_message_applies_each_of_its_timers(svc: InProcessService) -> None:
    first, second = place(svc, "r1"), place(svc, "r2")
    svc.db.timers.clear()  # delivered below as one message, as coalesce_timers merges them
    svc.clock.advance(TIMEOUT)
    answer = svc.deliver(
        Timer.fired_key(Timer.PAYMENT_TIMEOUT),
        {
            "kind": Timer.PAYMENT_TIMEOUT,
            "due_at": svc.clock.now().isoformat(),
            "refs": [first, second],
            "correlation_ids": ["place-r1", "place-r2"],
        },
        "merged",
        exchange=TIMERS_FIRED_EXCHANGE,
    )
    assert [(n, b["order_no"]) for n, b in answer.events] == [
        (Evt.ORDER_CANCELLED, first),
        (Evt.STOCK_RELEASED, first),
        (Evt.ORDER_CANCELLED, second),
        (Evt.STOCK_RELEASED, second),
    ]
    assert stock(svc) == (10, 0)
    cids = {
        r.body["order_no"]: r.correlation_id for r in svc.db.rows("outbox", routing_key=Evt.ORDER_CANCELLED)
    }
    assert cids == {first: "place-r1", second: "place-r2"}, "each timer's events keep its own command's id"


def test_a_refused_timer_of_a_merged_message_leaves_the_others() -> None:
    def fire(uow: UnitOfWork, ref: str) -> None:
        uow.record(ref, "TOUCH", None, None, "timer:toy")
        if ref == "bad":
            raise Refusal(Reason.INVALID_STATE, "no")

    def never(*_args: Any) -> list[str]:
        raise AssertionError("the sweeper does not run here")

    settings = Settings()
    kind = TimerKind("toy", fire, never, delay=timedelta(minutes=1))
    svc = InProcessService(settings, specs={TIMEOUTS_QUEUE: timeouts.spec(settings, [kind])})
    answer = svc.deliver(
        Timer.fired_key("toy"),
        {"kind": "toy", "due_at": svc.clock.now().isoformat(), "refs": ["a", "bad", "c"]},
        "m1",
        exchange=TIMERS_FIRED_EXCHANGE,
    )
    assert answer.outcome == Applied()
    assert [r.order_no for r in svc.db.rows("order_timeline")] == ["a", "c"]
