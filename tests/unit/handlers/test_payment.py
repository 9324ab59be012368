"""The order.payment queue's handlers on the fake unit of work (consumers/payment.py, cancel.py,
refunds.py): payment.notify and the split, order.cancel, refund.result and its follow-ups, and
the payment timeout racing a payment. No broker, no database: milliseconds each."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from consumers.cancel import fire_payment_timeouts
from consumers.outcomes import Applied, Park
from consumers.refunds import retry_refund
from domain.errors import Reason, Refusal
from domain.names import TIMEOUTS_QUEUE, Cmd, Evt, Timer
from store.envelope import Envelope
from store.ports import NewPayment
from testing.fakes.service import InProcessService
from testing.fakes.uow import FakeUnitOfWork, new_envelope
from testing.fakes.windows import FakeTimerWindow
from testing.shop import (
    RECEIVER,
    given_paid_order,
    given_sku,
    last,
    new_service,
    order,
    refund_result,
    rejected,
    ship,
    signed,
    unique,
)

PAY_TIMEOUT = timedelta(minutes=15)  # the default ORDER_PAYMENT_TIMEOUT
TIMER_KEY = Timer.fired_key(Timer.PAYMENT_TIMEOUT)


@pytest.fixture
def svc() -> InProcessService:
    return new_service()


def place(svc: InProcessService, lines: list[tuple[str, int]], **extra: Any) -> dict[str, Any]:
    """Place an order (unpaid); its order.created."""
    request_id = unique("req")
    user_id = str(extra.pop("user_id", unique("user")))
    svc.send(
        Cmd.ORDER_PLACE,
        {
            "request_id": request_id,
            "user_id": user_id,
            "order_type": extra.pop("order_type", "physical"),
            "items": [{"sku": sku, "quantity": qty} for sku, qty in lines],
            "receiver": RECEIVER,
            **extra,
        },
    )
    return last(svc, Evt.ORDER_CREATED, request_id=request_id)


def notify(
    svc: InProcessService, order_no: str, amount: int, payment_no: str | None = None, secret_ok: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """Send a payment.notify; the events it caused."""
    body = {
        "order_no": order_no,
        "payment_no": payment_no or unique("pay"),
        "method": "card",
        "amount": amount,
        "paid_at": svc.clock.now().isoformat(),
    }
    sent = signed(body) if secret_ok else {**body, "signature": "00" * 32}
    answer = svc.deliver(Cmd.PAYMENT_NOTIFY, sent, unique("msg"))
    assert isinstance(answer.outcome, Applied), answer
    return answer.events


def cancel(svc: InProcessService, order_no: str, user_id: str) -> list[tuple[str, dict[str, Any]]]:
    answer = svc.deliver(
        Cmd.ORDER_CANCEL,
        {"order_no": order_no, "user_id": user_id, "reason": "changed my mind"},
        unique("msg"),
    )
    assert isinstance(answer.outcome, Applied), answer
    return answer.events


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


def row(svc: InProcessService, table: str, **equals: Any) -> Any:
    found = svc.db.one(table, **equals)
    assert found is not None, (table, equals)
    return found


def stock_row(svc: InProcessService, sku: str, warehouse: str = "W1") -> Any:
    return row(svc, "stock", sku=sku, warehouse_id=warehouse)


def refund_of(svc: InProcessService, order_no: str, reason: str) -> dict[str, Any]:
    return last(svc, Evt.REFUND_REQUESTED, order_no=order_no, reason=reason)


# ---------------------------------------------------------------------------------------------
# payment.notify


def test_a_payment_pays_the_order_deducts_its_stock_and_splits_it(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(svc, price=15000, stock=5, merchant="M2", warehouse="W2")
    created = place(svc, [(tea, 2), (pot, 1)])
    order_no, payable = created["order_no"], created["payable"]

    events = notify(svc, order_no, payable, payment_no="P1")

    assert names(events) == [Evt.ORDER_PAID, Evt.STOCK_DEDUCTED, Evt.ORDER_SPLIT]
    paid = events[0][1]
    assert paid == {
        "order_no": order_no,
        "status": "PAID",
        "user_id": created["user_id"],
        "payment_no": "P1",
        "method": "card",
        "amount": payable,
        "paid_at": paid["paid_at"],
    }
    assert sorted(i["sku"] for i in events[1][1]["items"]) == sorted([tea, pot])
    split = events[2][1]
    assert split["status"] == "PAID" and split["payable"] == payable
    children = {c["merchant_id"]: c for c in split["children"]}
    assert set(children) == {"M1", "M2"}
    assert sum(c["payable"] for c in split["children"]) == payable
    assert [c["order_no"] for c in split["children"]] == [f"{order_no}-01", f"{order_no}-02"]
    for child in split["children"]:
        child_row = order(svc, child["order_no"])
        assert (child_row.status, child_row.parent_no, child_row.payment_no, child_row.paid_amount) == (
            "PAID",
            order_no,
            "P1",
            child["payable"],
        )
        assert [i.child_order_no for i in svc.db.rows("order_items", sku=child["items"][0]["sku"])] == [
            child["order_no"]
        ]
        locks = svc.db.rows("stock_locks", order_no=order_no, sku=child["items"][0]["sku"])
        assert [lock.child_order_no for lock in locks] == [child["order_no"]]
    parent = order(svc, order_no)
    assert (parent.status, parent.paid_amount, parent.payment_no) == ("PAID", payable, "P1")
    payment = row(svc, "payments", payment_no="P1")
    assert (payment.outcome, payment.refundable, payment.order_no) == ("APPLIED", payable, order_no)
    tea_stock = stock_row(svc, tea, "W1")
    assert (tea_stock.available, tea_stock.locked, tea_stock.sold) == (8, 0, 2)
    # The pay deadline passing afterwards changes nothing.
    fired = svc.advance(PAY_TIMEOUT + timedelta(minutes=1))
    assert fired and all(answer.events == [] for answer in fired)
    assert order(svc, order_no).status == "PAID"


def test_a_virtual_order_is_completed_when_paid(svc: InProcessService) -> None:
    card = given_sku(svc, price=5000, stock=3, merchant="M1")
    created = place(svc, [(card, 1)], order_type="virtual")

    events = notify(svc, created["order_no"], created["payable"])

    assert names(events) == [Evt.ORDER_PAID, Evt.STOCK_DEDUCTED, Evt.ORDER_COMPLETED]
    assert events[2][1] == {
        "order_no": created["order_no"],
        "status": "COMPLETED",
        "user_id": created["user_id"],
        "completed_at": svc.clock.now().isoformat(),
    }
    assert svc.db.rows("orders", parent_no=created["order_no"]) == []


def test_the_same_payment_twice_changes_nothing(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 1)])
    notify(svc, created["order_no"], created["payable"], payment_no="P1")

    assert notify(svc, created["order_no"], created["payable"], payment_no="P1") == []
    assert svc.db.count("orders", parent_no=created["order_no"]) == 1


def test_a_payment_of_the_wrong_amount_is_rejected_and_refunded_in_full(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 1)])
    order_no = created["order_no"]

    events = notify(svc, order_no, created["payable"] - 1, payment_no="P1")

    assert names(events) == [Evt.REFUND_REQUESTED, Evt.PAYMENT_REJECTED]
    refund = events[0][1]
    assert refund == {
        "refund_no": refund["refund_no"],
        "order_no": order_no,
        "amount": created["payable"] - 1,
        "reason": Reason.PAYMENT_REJECTED,
        "payment_no": "P1",
        "refund_status": "REQUESTED",
    }
    assert events[1][1] == {
        "order_no": order_no,
        "payment_no": "P1",
        "amount": created["payable"] - 1,
        "reason": Reason.AMOUNT_MISMATCH,
        "detail": f"paid {created['payable'] - 1}, payable is {created['payable']}",
    }
    assert order(svc, order_no).status == "PENDING_PAYMENT"
    payment = row(svc, "payments", payment_no="P1")
    assert (payment.outcome, payment.refundable) == ("REJECTED", 0)
    # The same wrong payment again: dealt with the first time, refunded once.
    assert notify(svc, order_no, created["payable"] - 1, payment_no="P1") == []
    assert svc.db.count("refunds", source=Reason.PAYMENT_REJECTED) == 1
    # Its refund succeeding returns none of the order's own money.
    refund_result(svc, refund["refund_no"])
    assert order(svc, order_no).refunded_amount == 0
    assert [line.action for line in svc.db.timeline(order_no)][-1] == "REJECTED_PAYMENT_REFUNDED"


def test_a_payment_with_a_bad_signature_is_rejected_and_nothing_is_recorded(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 1)])

    events = notify(svc, created["order_no"], created["payable"], payment_no="P1", secret_ok=False)

    assert names(events) == [Evt.PAYMENT_REJECTED]
    assert events[0][1]["reason"] == Reason.BAD_SIGNATURE
    assert svc.db.one("payments", payment_no="P1") is None
    assert order(svc, created["order_no"]).status == "PENDING_PAYMENT"


def test_a_payment_for_an_unknown_or_child_order_is_rejected(svc: InProcessService) -> None:
    assert notify(svc, "O-nope", 100)[0][1]["reason"] == Reason.UNKNOWN_ORDER
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    paid = given_paid_order(svc, [(tea, 1)])
    (child,) = paid.children
    events = notify(svc, child, 100)
    assert names(events) == [Evt.PAYMENT_REJECTED] and events[0][1]["reason"] == Reason.UNKNOWN_ORDER


def test_a_second_payment_of_a_paid_order_is_refunded(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    paid = given_paid_order(svc, [(tea, 1)])
    payable = order(svc, paid.parent_no).payable

    events = notify(svc, paid.parent_no, payable, payment_no="P2")

    assert names(events) == [Evt.REFUND_REQUESTED]
    assert events[0][1]["reason"] == Reason.LATE_PAYMENT and events[0][1]["payment_no"] == "P2"
    assert row(svc, "payments", payment_no="P2").outcome == "LATE_REFUNDED"
    assert order(svc, paid.parent_no).payment_no == paid.payment_no


# ---------------------------------------------------------------------------------------------
# The payment racing its timeout: exactly one wins


def test_a_payment_after_the_timeout_leaves_the_order_cancelled_and_refunds_it(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 2)])
    order_no = created["order_no"]

    (fired,) = svc.advance(PAY_TIMEOUT)
    assert fired.names() == [Evt.ORDER_CANCELLED, Evt.STOCK_RELEASED]
    assert fired.events[0][1]["reason"] == Reason.PAYMENT_TIMEOUT
    events = notify(svc, order_no, created["payable"], payment_no="P1")

    assert names(events) == [Evt.REFUND_REQUESTED]
    assert events[0][1]["reason"] == Reason.LATE_PAYMENT and events[0][1]["amount"] == created["payable"]
    assert order(svc, order_no).status == "CANCELLED"
    assert svc.db.events_named(Evt.ORDER_PAID) == []
    assert (stock_row(svc, tea).available, stock_row(svc, tea).sold) == (10, 0)
    refund_result(svc, events[0][1]["refund_no"])
    assert last(svc, Evt.REFUND_SUCCEEDED)["reason"] == Reason.LATE_PAYMENT
    assert [line.action for line in svc.db.timeline(order_no)][-1] == "LATE_PAYMENT_REFUNDED"


@pytest.mark.parametrize("first", ["payment", "timer"])
def test_a_payment_and_its_timeout_exactly_one_wins(svc: InProcessService, first: str) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 1)])
    order_no = created["order_no"]
    svc.clock.advance(PAY_TIMEOUT)  # both at the deadline: the payment and the timer come together
    (timer,) = svc.pending_timers()
    svc.db.timers.remove(timer)

    if first == "payment":
        notify(svc, order_no, created["payable"])
        svc.fire(timer)
    else:
        svc.fire(timer)
        notify(svc, order_no, created["payable"])

    paid, cancelled = svc.db.events_named(Evt.ORDER_PAID), svc.db.events_named(Evt.ORDER_CANCELLED)
    assert len(paid) + len(cancelled) == 1
    status = order(svc, order_no).status
    assert status == ("PAID" if first == "payment" else "CANCELLED")
    late = [r for r in svc.db.events_named(Evt.REFUND_REQUESTED) if r["reason"] == Reason.LATE_PAYMENT]
    assert len(late) == (1 if first == "timer" else 0)


def test_a_timer_before_the_stored_deadline_changes_nothing(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    created = place(svc, [(tea, 1)])
    (timer,) = svc.pending_timers()

    answer = svc.fire({**timer, "due_at": svc.clock.now()})

    assert answer.events == []
    assert order(svc, created["order_no"]).status == "PENDING_PAYMENT"


def test_a_window_of_payment_timers_cancels_the_unpaid_orders_together(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1000, stock=20, merchant="M1")
    user_id = unique("user")
    coupon = unique("coupon")
    svc.send(
        Cmd.COUPON_GRANT,
        {
            "code": coupon,
            "user_id": user_id,
            "amount": 100,
            "min_spend": 0,
            "expires_at": (svc.clock.now() + timedelta(days=1)).isoformat(),
        },
    )
    with_coupon = place(svc, [(tea, 1)], user_id=user_id, coupon_code=coupon)["order_no"]
    plain = place(svc, [(tea, 2)])["order_no"]
    paid_one = place(svc, [(tea, 3)])
    notify(svc, paid_one["order_no"], paid_one["payable"])
    svc.clock.advance(PAY_TIMEOUT)
    before = len(svc.db.events)
    refs = [with_coupon, plain, paid_one["order_no"], "O-unknown"]
    timers = [(ref, new_envelope(TIMER_KEY, {}, TIMEOUTS_QUEUE, correlation_id=f"c-{ref}")) for ref in refs]

    fire_payment_timeouts(FakeTimerWindow(svc.db, timers))

    events = svc.db.events[before:]
    assert names(events) == [Evt.ORDER_CANCELLED] * 2 + [Evt.STOCK_RELEASED] * 2
    assert [body["order_no"] for _, body in events] == [with_coupon, plain, with_coupon, plain]
    assert events[0][1] == {
        "order_no": with_coupon,
        "status": "CANCELLED",
        "reason": Reason.PAYMENT_TIMEOUT,
        "user_id": user_id,
        "coupon_code": coupon,
        "cancelled_at": svc.clock.now().isoformat(),
    }
    assert events[1][1]["coupon_code"] is None
    assert events[3][1]["items"] == [{"sku": tea, "warehouse_id": "W1", "quantity": 2}]
    assert [order(svc, no).status for no in (with_coupon, plain, paid_one["order_no"])] == [
        "CANCELLED",
        "CANCELLED",
        "PAID",
    ]
    assert order(svc, plain).version == 2
    assert row(svc, "coupons", code=coupon).state == "AVAILABLE"
    assert (stock_row(svc, tea).available, stock_row(svc, tea).locked) == (17, 0)
    # Each order's events and timeline carry its own timer's correlation and message.
    outbox = svc.db.rows("outbox")[-4:]
    assert [row.correlation_id for row in outbox] == [f"c-{with_coupon}", f"c-{plain}"] * 2
    assert svc.db.timeline(plain)[-1].action == "PAYMENT_TIMEOUT"


# ---------------------------------------------------------------------------------------------
# order.cancel


def test_cancelling_an_unpaid_order_releases_its_stock_and_returns_its_coupon(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1000, stock=5, merchant="M1")
    user_id, coupon = unique("user"), unique("coupon")
    svc.send(
        Cmd.COUPON_GRANT,
        {
            "code": coupon,
            "user_id": user_id,
            "amount": 100,
            "min_spend": 0,
            "expires_at": (svc.clock.now() + timedelta(days=1)).isoformat(),
        },
    )
    order_no = place(svc, [(tea, 2)], user_id=user_id, coupon_code=coupon)["order_no"]

    events = cancel(svc, order_no, user_id)

    assert names(events) == [Evt.ORDER_CANCELLED, Evt.STOCK_RELEASED]
    assert events[0][1] == {
        "order_no": order_no,
        "status": "CANCELLED",
        "reason": Reason.USER,
        "user_id": user_id,
        "coupon_code": coupon,
        "cancelled_at": svc.clock.now().isoformat(),
    }
    released = {"order_no": order_no, "items": [{"sku": tea, "warehouse_id": "W1", "quantity": 2}]}
    assert events[1][1] == released
    assert row(svc, "coupons", code=coupon).state == "AVAILABLE"
    assert stock_row(svc, tea).available == 5
    # Its timer then finds nothing to do.
    assert all(answer.events == [] for answer in svc.advance(PAY_TIMEOUT))


def test_cancelling_a_paid_order_refunds_it_then_closes_it_and_its_children(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(svc, price=15000, stock=5, merchant="M2", warehouse="W2")
    paid = given_paid_order(svc, [(tea, 2), (pot, 1)])
    payable = order(svc, paid.parent_no).payable

    events = cancel(svc, paid.parent_no, paid.user_id)

    assert names(events) == [Evt.REFUND_REQUESTED]
    refund = events[0][1]
    assert refund["reason"] == Reason.USER_CANCEL
    assert (refund["amount"], refund["payment_no"]) == (payable, paid.payment_no)
    assert row(svc, "payments", payment_no=paid.payment_no).refundable == 0
    # A second cancellation while its refund is under way is refused.
    cancel(svc, paid.parent_no, paid.user_id)
    assert rejected(svc)["reason"] == Reason.INVALID_STATE

    refund_result(svc, refund["refund_no"])

    answer = svc.answers[-1]
    assert answer.names() == [
        Evt.REFUND_SUCCEEDED,
        Evt.STOCK_RESTORED,
        Evt.ORDER_CLOSED,
        Evt.ORDER_CLOSED,
        Evt.ORDER_CLOSED,
    ]
    closed = [body for name, body in answer.events if name == Evt.ORDER_CLOSED]
    assert {c["order_no"] for c in closed} == {paid.parent_no, *paid.children}
    assert {(c["status"], c["reason"], c["refund_no"]) for c in closed} == {
        ("CLOSED", Reason.USER_CANCEL, refund["refund_no"])
    }
    parent = order(svc, paid.parent_no)
    assert (parent.status, parent.refunded_amount) == ("CLOSED", payable)
    assert (stock_row(svc, tea).available, stock_row(svc, tea).sold) == (10, 0)
    assert row(svc, "skus", sku=tea).sales_count == 0


def test_an_order_cannot_be_cancelled_once_a_child_shipped(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    paid = given_paid_order(svc, [(tea, 1)])
    (child,) = paid.children
    ship(svc, child)

    cancel(svc, paid.parent_no, paid.user_id)

    body = rejected(svc)
    assert (body["reason"], body["order_no"], body["command"]) == (
        Reason.ALREADY_SHIPPED,
        paid.parent_no,
        Cmd.ORDER_CANCEL,
    )
    assert svc.db.count("refunds") == 0


def test_cancel_refusals_name_the_reason(svc: InProcessService) -> None:
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    paid = given_paid_order(svc, [(tea, 1)])
    (child,) = paid.children

    cancel(svc, paid.parent_no, "someone-else")
    assert rejected(svc)["reason"] == Reason.NOT_YOUR_ORDER
    cancel(svc, child, paid.user_id)
    assert rejected(svc)["reason"] == Reason.INVALID_STATE
    cancel(svc, "O-nope", paid.user_id)
    assert rejected(svc) == {
        "reason": Reason.UNKNOWN_ORDER,
        "order_no": "O-nope",
        "request_id": None,
        "user_id": paid.user_id,
        "detail": "no order O-nope",
        "command": Cmd.ORDER_CANCEL,
    }


# ---------------------------------------------------------------------------------------------
# refund.result


def paid_and_cancelled(svc: InProcessService) -> tuple[str, str, str, int]:
    """A paid order its user cancelled: (order_no, payment_no, refund_no, amount)."""
    tea = given_sku(svc, price=1200, stock=10, merchant="M1")
    paid = given_paid_order(svc, [(tea, 1)])
    cancel(svc, paid.parent_no, paid.user_id)
    refund = refund_of(svc, paid.parent_no, Reason.USER_CANCEL)
    return paid.parent_no, paid.payment_no, refund["refund_no"], refund["amount"]


def test_a_failed_refund_gives_its_amount_back_and_can_be_retried(svc: InProcessService) -> None:
    order_no, payment_no, refund_no, amount = paid_and_cancelled(svc)

    refund_result(svc, refund_no, "FAILED")

    failed = svc.answers[-1]
    assert failed.names() == [Evt.REFUND_FAILED]
    assert failed.events[0][1] == {
        "refund_no": refund_no,
        "order_no": order_no,
        "amount": amount,
        "reason": Reason.USER_CANCEL,
        "refund_status": "FAILED",
        "provider_refund_no": failed.events[0][1]["provider_refund_no"],
    }
    assert row(svc, "payments", payment_no=payment_no).refundable == amount
    assert order(svc, order_no).status == "PAID"

    uow = FakeUnitOfWork(svc.db, Envelope("cli", None, "cli-1", "refund.retry"))
    assert retry_refund(uow, refund_no, "cli") is True
    assert svc.db.events[-1] == (
        Evt.REFUND_REQUESTED,
        {
            "refund_no": refund_no,
            "order_no": order_no,
            "amount": amount,
            "reason": Reason.USER_CANCEL,
            "payment_no": payment_no,
            "refund_status": "REQUESTED",
            "attempt": 2,
        },
    )
    assert row(svc, "payments", payment_no=payment_no).refundable == 0
    assert retry_refund(uow, refund_no, "cli") is False  # not failed any more
    refund_result(svc, refund_no)
    assert order(svc, order_no).status == "CLOSED"


def test_the_same_refund_result_twice_changes_nothing(svc: InProcessService) -> None:
    order_no, _, refund_no, _ = paid_and_cancelled(svc)
    refund_result(svc, refund_no)
    assert svc.answers[-1].names()[0] == Evt.REFUND_SUCCEEDED

    refund_result(svc, refund_no)
    assert svc.answers[-1].events == []
    refund_result(svc, refund_no, "FAILED")  # a late failure cannot undo a success
    assert svc.answers[-1].events == []
    assert order(svc, order_no).refunded_amount == order(svc, order_no).paid_amount


def test_a_success_after_the_amount_went_elsewhere_is_parked_as_a_conflict(svc: InProcessService) -> None:
    _, payment_no, refund_no, amount = paid_and_cancelled(svc)
    refund_result(svc, refund_no, "FAILED")
    # Meanwhile the amount given back is refunded another way.
    FakeUnitOfWork(svc.db, Envelope("test", None, None, "test")).refunds.claim(payment_no, amount)
    before = len(svc.db.events)

    outcome = svc.send(
        Cmd.REFUND_RESULT, signed({"refund_no": refund_no, "status": "SUCCEEDED", "provider_refund_no": "X"})
    )

    assert isinstance(outcome, Park) and outcome.code == Reason.REFUND_CONFLICT
    assert names(svc.db.events[before:]) == [Evt.COMMAND_REJECTED]
    assert row(svc, "refunds", refund_no=refund_no).status == "FAILED"


def test_unsigned_or_unknown_refund_results_are_parked(svc: InProcessService) -> None:
    _, _, refund_no, _ = paid_and_cancelled(svc)
    body = {"refund_no": refund_no, "status": "SUCCEEDED", "provider_refund_no": "X"}

    forged = svc.send(Cmd.REFUND_RESULT, {**body, "signature": "00" * 32})
    unknown = svc.send(Cmd.REFUND_RESULT, signed({**body, "refund_no": "R-nope"}))

    assert isinstance(forged, Park) and forged.code == Reason.BAD_SIGNATURE
    assert isinstance(unknown, Park) and unknown.code == Reason.UNKNOWN_REFUND
    assert row(svc, "refunds", refund_no=refund_no).status == "REQUESTED"


# ---------------------------------------------------------------------------------------------
# The refundable balance (uow.refunds on the fake)


def test_refunds_of_one_payment_never_exceed_it(svc: InProcessService) -> None:
    _, payment_no, _, amount = paid_and_cancelled(svc)
    uow = FakeUnitOfWork(svc.db, Envelope("test", None, None, "test"))
    assert uow.refunds.balance(payment_no) == 0

    with pytest.raises(Refusal) as refused:
        uow.refunds.request("O-x", 1, Reason.AFTERSALE, "A-1", payment_no)

    assert refused.value.reason == Reason.AMOUNT_EXCEEDS_REFUNDABLE
    assert svc.db.count("refunds", source=Reason.AFTERSALE) == 0
    uow.refunds.give_back(payment_no, amount)
    first = uow.refunds.request("O-x", amount, Reason.AFTERSALE, "A-1", payment_no)
    again = uow.refunds.request("O-x", amount, Reason.AFTERSALE, "A-1", payment_no)
    assert first.created and not again.created and again.refund_no == first.refund_no
    assert uow.refunds.balance(payment_no) == 0
    with pytest.raises(Refusal):
        uow.refunds.claim(None, 1)
    # A payment number recorded once (`once`: a refused payment seen twice is recorded once).
    known = svc.db.one("payments", payment_no=payment_no)
    duplicate = NewPayment(payment_no, "O-x", "card", 1, uow.now, "REJECTED", {})
    assert not uow.refunds.add_payment(duplicate, once=True)
    assert svc.db.one("payments", payment_no=payment_no) == known
