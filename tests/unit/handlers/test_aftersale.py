"""After-sale and merchant-cancel handlers on the fake unit of work: requests, the merchant's review,
returns, the review timer (virtual clock), refund follow-ups and merchant cancels, with every
refusal. No broker, no database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from domain.errors import Reason
from domain.names import Cmd, Evt, Timer
from domain.status import AfterSaleStatus, OrderStatus
from testing.fakes.service import InProcessService
from testing.shop import (
    PaidOrder,
    advance,
    given_sku,
    last,
    new_service,
    one,
    one_child_order,
    order,
    refund_result,
    rejected,
    ship,
    two_merchant_order,
    unique,
)

REVIEW = timedelta(days=5)


@pytest.fixture
def svc() -> InProcessService:
    return new_service()


def ask(
    svc: InProcessService, paid: PaidOrder, child: str, kind: str, amount: int, reason: str = "broken"
) -> dict[str, Any]:
    """The user asks for an after-sale; its aftersale.requested (asserting it was accepted)."""
    svc.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": paid.user_id, "kind": kind, "amount": amount, "reason": reason},
    )
    answer = svc.answers[-1]
    assert answer.names() == [Evt.AFTERSALE_REQUESTED], answer.events
    return answer.events[0][1]


def aftersale(svc: InProcessService, aftersale_no: str) -> Any:
    return one(svc, "aftersales", aftersale_no=aftersale_no)


def actions(svc: InProcessService, order_no: str, prefix: str = "") -> list[str]:
    return [line.action for line in svc.db.timeline(order_no) if line.action.startswith(prefix)]


def paid_amount(svc: InProcessService, order_no: str) -> int:
    return int(order(svc, order_no).paid_amount)


# -- aftersale.request --------------------------------------------------------------------------


def test_a_request_waits_for_review_and_starts_the_review_timer(svc: InProcessService) -> None:
    # Given a paid child
    paid, child, merchant = one_child_order(svc)
    now = svc.clock.now()

    # When the user asks for part of it back
    asked = ask(svc, paid, child, "REFUND_ONLY", 1000, reason="scratched")

    # Then the after-sale waits for the merchant's review, for REVIEW at most
    aftersale_no = asked["aftersale_no"]
    assert asked == {
        "aftersale_no": aftersale_no,
        "order_no": child,
        "status": AfterSaleStatus.PENDING_REVIEW,
        "kind": "REFUND_ONLY",
        "amount": 1000,
        "user_id": paid.user_id,
        "merchant_id": merchant,
        "reason": "scratched",
        "review_deadline": (now + REVIEW).isoformat(),
    }
    row = aftersale(svc, aftersale_no)
    assert (row.status, row.merchant_id, row.review_deadline, row.refund_no) == (
        AfterSaleStatus.PENDING_REVIEW,
        merchant,
        now + REVIEW,
        None,
    )
    assert aftersale_no.startswith("A")
    (timer,) = svc.pending_timers(Timer.AFTERSALE_REVIEW)
    assert timer["ref"] == aftersale_no and timer["due_at"] == now + REVIEW
    (line,) = [x for x in svc.db.timeline(child) if x.action == "AFTERSALE_REQUESTED"]
    assert line.actor == f"user:{paid.user_id}"
    assert line.detail == {
        "aftersale_no": aftersale_no,
        "kind": "REFUND_ONLY",
        "amount": 1000,
        "reason": "scratched",
    }


def test_a_request_is_refused_for_a_stranger_a_parent_and_an_unknown_order(svc: InProcessService) -> None:
    # Given a paid child
    paid, child, _ = one_child_order(svc)
    stranger, ghost = unique("user"), unique("O-none")

    def refused(order_no: str, user_id: str) -> dict[str, Any]:
        svc.send(
            Cmd.AFTERSALE_REQUEST,
            {"order_no": order_no, "user_id": user_id, "kind": "REFUND_ONLY", "amount": 100},
        )
        return rejected(svc)

    # When a stranger asks, the owner names the parent, and someone names an order nobody made
    foreign = refused(child, stranger)
    parent = refused(paid.parent_no, paid.user_id)
    unknown = refused(ghost, paid.user_id)

    # Then each is refused with its reason, answering the sender, and no after-sale exists
    assert (foreign["reason"], foreign["user_id"], foreign["request_id"]) == (
        Reason.NOT_YOUR_ORDER,
        stranger,
        None,
    )
    assert foreign["command"] == Cmd.AFTERSALE_REQUEST
    assert parent["reason"] == Reason.INVALID_STATE and "parent order" in parent["detail"]
    assert unknown["reason"] == Reason.UNKNOWN_ORDER and unknown["order_no"] == ghost
    assert svc.db.count("aftersales") == 0 and not svc.pending_timers(Timer.AFTERSALE_REVIEW)


def test_a_request_on_an_unpaid_order_is_refused(svc: InProcessService) -> None:
    # Given a virtual order placed but not paid (virtual orders take after-sales themselves)
    sku = given_sku(svc, price=900, stock=5, merchant=unique("M"))
    user, request_id = unique("user"), unique("req")
    svc.send(
        Cmd.ORDER_PLACE,
        {
            "request_id": request_id,
            "user_id": user,
            "order_type": "virtual",
            "items": [{"sku": sku, "quantity": 1}],
        },
    )
    order_no = last(svc, Evt.ORDER_CREATED, request_id=request_id)["order_no"]

    # When the user asks for an after-sale
    svc.send(
        Cmd.AFTERSALE_REQUEST, {"order_no": order_no, "user_id": user, "kind": "REFUND_ONLY", "amount": 100}
    )

    # Then it is refused: the order's status takes no after-sale
    refused = rejected(svc)
    assert refused["reason"] == Reason.INVALID_STATE and OrderStatus.PENDING_PAYMENT in refused["detail"]


def test_open_requests_count_against_what_is_refundable(svc: InProcessService) -> None:
    # Given a paid child with an after-sale for 60% of it under review
    paid, child, _ = one_child_order(svc)
    amount = paid_amount(svc, child)
    ask(svc, paid, child, "REFUND_ONLY", amount * 6 // 10)

    # When the user asks for another 60%
    svc.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": paid.user_id, "kind": "REFUND_ONLY", "amount": amount * 6 // 10},
    )

    # Then it is refused, saying what is left
    refused = rejected(svc)
    assert refused["reason"] == Reason.AMOUNT_EXCEEDS_REFUNDABLE
    assert refused["refundable"] == amount - amount * 6 // 10
    assert svc.db.count("aftersales", order_no=child) == 1

    # And exactly what is left is accepted
    ask(svc, paid, child, "REFUND_ONLY", amount - amount * 6 // 10)


def test_a_child_its_merchant_is_cancelling_takes_no_request(svc: InProcessService) -> None:
    # Given a paid order of two merchants; the merchant of one child cancelled it (refund pending)
    paid, m1, _ = two_merchant_order(svc)
    child = paid.child_of(m1)
    svc.send(Cmd.MERCHANT_CANCEL, {"order_no": child, "merchant_id": m1, "reason": "no stock"})

    # When the user asks for an after-sale on it
    svc.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": paid.user_id, "kind": "REFUND_ONLY", "amount": 1},
    )

    # Then it is refused
    refused = rejected(svc)
    assert refused["reason"] == Reason.INVALID_STATE and "cancelled by its merchant" in refused["detail"]


# -- aftersale.approve / reject / return-received ---------------------------------------------


def test_approving_a_refund_only_request_asks_for_the_refund_at_once(svc: InProcessService) -> None:
    # Given a paid child with a refund-only request for half of it
    paid, child, merchant = one_child_order(svc)
    half = paid_amount(svc, child) // 2
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", half)["aftersale_no"]

    # When its merchant approves
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})

    # Then it awaits the refund, which is requested from the child's payment
    assert svc.answers[-1].names() == [Evt.AFTERSALE_APPROVED, Evt.REFUND_REQUESTED]
    assert last(svc, Evt.AFTERSALE_APPROVED) == {
        "aftersale_no": aftersale_no,
        "order_no": child,
        "status": AfterSaleStatus.AWAITING_REFUND,
        "kind": "REFUND_ONLY",
        "amount": half,
        "by": f"merchant:{merchant}",
    }
    refund = last(svc, Evt.REFUND_REQUESTED, order_no=child)
    assert (refund["amount"], refund["reason"], refund["payment_no"]) == (
        half,
        Reason.AFTERSALE,
        paid.payment_no,
    )
    assert aftersale(svc, aftersale_no).refund_no == refund["refund_no"]
    assert actions(svc, child, "AFTERSALE") == ["AFTERSALE_REQUESTED", "AFTERSALE_APPROVE_REFUND"]

    # When the refund succeeds
    refund_result(svc, refund["refund_no"])

    # Then the after-sale succeeded; a partial refund leaves the order as it was
    assert last(svc, Evt.AFTERSALE_COMPLETED) == {
        "aftersale_no": aftersale_no,
        "order_no": child,
        "status": AfterSaleStatus.SUCCEEDED,
        "kind": "REFUND_ONLY",
        "amount": half,
        "refund_no": refund["refund_no"],
    }
    row = order(svc, child)
    assert (row.status, row.refunded_amount) == (OrderStatus.PAID, half)
    assert not svc.db.events_named(Evt.ORDER_CLOSED)


def test_a_return_waits_for_the_goods_and_a_full_refund_closes_the_order(svc: InProcessService) -> None:
    # Given a shipped child with a return-refund request for all of it
    paid, child, merchant = one_child_order(svc)
    ship(svc, child)
    amount = paid_amount(svc, child)
    aftersale_no = ask(svc, paid, child, "RETURN_REFUND", amount)["aftersale_no"]

    # When its merchant approves
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})

    # Then it waits for the goods; no refund yet
    assert svc.answers[-1].names() == [Evt.AFTERSALE_APPROVED]
    assert last(svc, Evt.AFTERSALE_APPROVED)["status"] == AfterSaleStatus.AWAITING_RETURN

    # When the goods come back, and the refund succeeds
    svc.send(Cmd.AFTERSALE_RETURN_RECEIVED, {"aftersale_no": aftersale_no, "merchant_id": merchant})
    assert svc.answers[-1].names() == [Evt.REFUND_REQUESTED]
    refund = last(svc, Evt.REFUND_REQUESTED, order_no=child)
    assert (
        refund["amount"] == amount and aftersale(svc, aftersale_no).status == AfterSaleStatus.AWAITING_REFUND
    )
    refund_result(svc, refund["refund_no"])

    # Then the after-sale succeeded, the fully refunded child closed, and its parent with it
    closed = last(svc, Evt.ORDER_CLOSED, order_no=child)
    assert closed == {
        "order_no": child,
        "parent_no": paid.parent_no,
        "user_id": paid.user_id,
        "status": OrderStatus.CLOSED,
        "reason": Reason.AFTERSALE,
        "refunded_amount": amount,
        "closed_at": svc.clock.now().isoformat(),
    }
    assert last(svc, Evt.ORDER_CLOSED, order_no=paid.parent_no)["derived_from_children"] is True
    assert aftersale(svc, aftersale_no).status == AfterSaleStatus.SUCCEEDED
    assert order(svc, child).status == OrderStatus.CLOSED
    assert actions(svc, child, "AFTERSALE") == [
        "AFTERSALE_REQUESTED",
        "AFTERSALE_APPROVE_RETURN",
        "AFTERSALE_RETURN_RECEIVED",
        "AFTERSALE_REFUND_SUCCEEDED",
    ]


def test_the_review_is_refused_for_another_merchant_or_an_unknown_after_sale(svc: InProcessService) -> None:
    # Given a paid child with a request
    paid, child, merchant = one_child_order(svc)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", 100)["aftersale_no"]
    other, ghost = unique("M"), unique("A-none")

    # When another merchant approves, rejects or receives it, and its merchant names a ghost
    answers = []
    keys = (Cmd.AFTERSALE_APPROVE, Cmd.AFTERSALE_REJECT, Cmd.AFTERSALE_RETURN_RECEIVED)
    for key in keys:
        svc.send(key, {"aftersale_no": aftersale_no, "merchant_id": other})
        answers.append(rejected(svc))
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": ghost, "merchant_id": merchant})
    unknown = rejected(svc)

    # Then each is refused, naming the after-sale, the merchant and the command
    for answer, key in zip(answers, keys, strict=True):
        assert answer["reason"] == Reason.MERCHANT_MISMATCH and answer["command"] == key
        assert answer["aftersale_no"] == aftersale_no
        assert (answer["merchant_id"], answer["order_no"]) == (other, child)
    assert unknown["reason"] == Reason.UNKNOWN_AFTERSALE
    assert (unknown["aftersale_no"], unknown["order_no"], unknown["merchant_id"]) == (ghost, None, merchant)
    assert aftersale(svc, aftersale_no).status == AfterSaleStatus.PENDING_REVIEW


def test_goods_cannot_come_back_before_approval(svc: InProcessService) -> None:
    # Given a return-refund request not reviewed yet
    paid, child, merchant = one_child_order(svc)
    aftersale_no = ask(svc, paid, child, "RETURN_REFUND", 100)["aftersale_no"]

    # When its merchant says the goods arrived
    svc.send(Cmd.AFTERSALE_RETURN_RECEIVED, {"aftersale_no": aftersale_no, "merchant_id": merchant})

    # Then it is refused and no refund is made
    assert rejected(svc)["reason"] == Reason.INVALID_STATE
    assert svc.db.count("refunds", order_no=child) == 0


def test_a_rejection_is_final_and_frees_the_amount(svc: InProcessService) -> None:
    # Given a paid child with a request for all of it
    paid, child, merchant = one_child_order(svc)
    amount = paid_amount(svc, child)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", amount)["aftersale_no"]

    # When its merchant rejects it, then rejects and approves it again
    svc.send(Cmd.AFTERSALE_REJECT, {"aftersale_no": aftersale_no, "merchant_id": merchant, "reason": "used"})
    assert last(svc, Evt.AFTERSALE_REJECTED) == {
        "aftersale_no": aftersale_no,
        "order_no": child,
        "status": AfterSaleStatus.REJECTED,
        "kind": "REFUND_ONLY",
        "amount": amount,
        "reason": "used",
    }
    svc.send(Cmd.AFTERSALE_REJECT, {"aftersale_no": aftersale_no, "merchant_id": merchant, "reason": "x"})
    again = rejected(svc)
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})
    late = rejected(svc)

    # Then both are refused as a wrong state, and no refund was made
    assert again["reason"] == late["reason"] == Reason.INVALID_STATE
    assert aftersale(svc, aftersale_no).reject_reason == "used"
    assert svc.db.count("refunds", order_no=child) == 0

    # And the whole amount may be asked for again
    assert ask(svc, paid, child, "REFUND_ONLY", amount)["aftersale_no"] != aftersale_no


def test_a_closed_order_takes_no_request(svc: InProcessService) -> None:
    # Given a paid child with two requests, one of them for all that is left, refunded in full
    paid, child, merchant = one_child_order(svc)
    amount = paid_amount(svc, child)
    first = ask(svc, paid, child, "RETURN_REFUND", 100)["aftersale_no"]
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": first, "merchant_id": merchant})
    second = ask(svc, paid, child, "REFUND_ONLY", amount - 100)["aftersale_no"]
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": second, "merchant_id": merchant})
    refund_result(svc, last(svc, Evt.REFUND_REQUESTED, order_no=child)["refund_no"])
    assert order(svc, child).status == OrderStatus.PAID  # the return still holds its 100
    svc.send(Cmd.AFTERSALE_RETURN_RECEIVED, {"aftersale_no": first, "merchant_id": merchant})
    refund_result(svc, last(svc, Evt.REFUND_REQUESTED, order_no=child)["refund_no"])
    assert order(svc, child).status == OrderStatus.CLOSED

    # When a third request is made on the closed child
    svc.send(
        Cmd.AFTERSALE_REQUEST,
        {"order_no": child, "user_id": paid.user_id, "kind": "REFUND_ONLY", "amount": 1},
    )

    # Then it is refused
    refused = rejected(svc)
    assert refused["reason"] == Reason.INVALID_STATE and OrderStatus.CLOSED in refused["detail"]


def test_no_approval_once_the_order_was_closed(svc: InProcessService) -> None:
    # Given a request under review on a child that was closed meanwhile
    paid, child, merchant = one_child_order(svc)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", 100)["aftersale_no"]
    svc.db.update(order(svc, child), status=OrderStatus.CLOSED)

    # When its merchant approves
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})

    # Then it is refused and the request still waits
    refused = rejected(svc)
    assert (refused["reason"], refused["aftersale_no"]) == (Reason.INVALID_STATE, aftersale_no)
    assert aftersale(svc, aftersale_no).status == AfterSaleStatus.PENDING_REVIEW


# -- the review timer ---------------------------------------------------------------------------


def test_an_unanswered_request_is_approved_by_the_system_after_five_days(svc: InProcessService) -> None:
    # Given a paid child with a refund-only request
    paid, child, _ = one_child_order(svc)
    third = paid_amount(svc, child) // 3
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", third)["aftersale_no"]

    # When almost REVIEW passes, nothing happens
    assert advance(svc, REVIEW - timedelta(seconds=1), Timer.AFTERSALE_REVIEW) == []

    # When the rest passes
    (fired,) = advance(svc, timedelta(seconds=1), Timer.AFTERSALE_REVIEW)

    # Then the system approved it and asked for the refund
    assert fired.names() == [Evt.AFTERSALE_APPROVED, Evt.REFUND_REQUESTED]
    approved = fired.of(Evt.AFTERSALE_APPROVED)[0]
    assert approved["by"] == "system" and approved["status"] == AfterSaleStatus.AWAITING_REFUND
    refund = fired.of(Evt.REFUND_REQUESTED)[0]
    assert refund["amount"] == third and refund["reason"] == Reason.AFTERSALE
    row = aftersale(svc, aftersale_no)
    assert (row.status, row.refund_no) == (AfterSaleStatus.AWAITING_REFUND, refund["refund_no"])


def test_an_unanswered_return_is_approved_to_wait_for_the_goods(svc: InProcessService) -> None:
    # Given a shipped child with a return-refund request
    paid, child, _ = one_child_order(svc)
    ship(svc, child)
    aftersale_no = ask(svc, paid, child, "RETURN_REFUND", 500)["aftersale_no"]

    # When the review runs out
    (fired,) = advance(svc, REVIEW, Timer.AFTERSALE_REVIEW)

    # Then the system approved it; no refund before the goods are back
    assert fired.names() == [Evt.AFTERSALE_APPROVED]
    assert aftersale(svc, aftersale_no).status == AfterSaleStatus.AWAITING_RETURN


def test_the_timer_of_an_answered_request_does_nothing(svc: InProcessService) -> None:
    # Given a request its merchant rejected
    paid, child, merchant = one_child_order(svc)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", 100)["aftersale_no"]
    svc.send(Cmd.AFTERSALE_REJECT, {"aftersale_no": aftersale_no, "merchant_id": merchant, "reason": "no"})

    # When the review timer runs out, and a timer names an after-sale nobody made
    (fired,) = advance(svc, REVIEW, Timer.AFTERSALE_REVIEW)
    ghost = svc.fire({"kind": Timer.AFTERSALE_REVIEW, "ref": unique("A-none"), "due_at": svc.clock.now()})

    # Then neither changes anything
    assert fired.names() == [] and ghost.names() == []
    assert aftersale(svc, aftersale_no).status == AfterSaleStatus.REJECTED


def test_an_early_review_timer_changes_nothing(svc: InProcessService) -> None:
    # Given a request under review
    paid, child, _ = one_child_order(svc)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", 100)["aftersale_no"]

    # When a timer for it arrives a day early (forged or misrouted)
    fired = svc.fire({"kind": Timer.AFTERSALE_REVIEW, "ref": aftersale_no, "due_at": svc.clock.now()})

    # Then nothing changes
    assert fired.names() == [] and aftersale(svc, aftersale_no).status == AfterSaleStatus.PENDING_REVIEW


def test_a_claim_lapses_when_the_money_went_another_way_or_the_order_closed(svc: InProcessService) -> None:
    # Given two children with a request each (refund-only, return-refund)
    paid, m1, m2 = two_merchant_order(svc)
    first, second = paid.child_of(m1), paid.child_of(m2)
    short = ask(svc, paid, first, "REFUND_ONLY", 100)["aftersale_no"]
    closing = ask(svc, paid, second, "RETURN_REFUND", 100)["aftersale_no"]
    # and, meanwhile, the payment's money was refunded another way and the second child closed
    svc.db.update(one(svc, "payments", payment_no=paid.payment_no), refundable=50)
    svc.db.update(order(svc, second), status=OrderStatus.CLOSED)

    # When the review runs out
    fired = advance(svc, REVIEW, Timer.AFTERSALE_REVIEW)

    # Then both claims lapse: closed by the system, nothing approved or refunded
    assert [answer.names() for answer in fired] == [[], []]
    assert aftersale(svc, short).status == aftersale(svc, closing).status == AfterSaleStatus.CLOSED
    assert svc.db.count("refunds") == 0
    assert "AFTERSALE_CLOSE" in actions(svc, first) and "AFTERSALE_CLOSE" in actions(svc, second)


# -- merchant.cancel ----------------------------------------------------------------------------


def test_a_merchant_cancels_one_child_of_two(svc: InProcessService) -> None:
    # Given a paid order of two merchants, with an open request on the child to cancel
    paid, m1, m2 = two_merchant_order(svc)
    cancelled, kept = paid.child_of(m2), paid.child_of(m1)
    amount = paid_amount(svc, cancelled)
    claim = ask(svc, paid, cancelled, "REFUND_ONLY", 100)["aftersale_no"]

    # When its merchant cancels it
    svc.send(Cmd.MERCHANT_CANCEL, {"order_no": cancelled, "merchant_id": m2, "reason": "out of stock"})

    # Then the open request is void and the whole paid amount is refunded
    assert svc.answers[-1].names() == [Evt.REFUND_REQUESTED]
    refund = last(svc, Evt.REFUND_REQUESTED, order_no=cancelled)
    assert (refund["amount"], refund["reason"]) == (amount, Reason.MERCHANT_CANCEL)
    assert aftersale(svc, claim).status == AfterSaleStatus.CLOSED
    record = one(svc, "merchant_cancellations", order_no=cancelled)
    assert (record.step, record.refund_no, record.merchant_id) == (
        "REFUND_REQUESTED",
        refund["refund_no"],
        m2,
    )
    assert order(svc, cancelled).status == OrderStatus.PAID

    # When the refund succeeds
    refund_result(svc, refund["refund_no"])

    # Then the units go back on sale, the child (only) closes, each step once
    restored = last(svc, Evt.STOCK_RESTORED, order_no=cancelled)
    assert restored["parent_no"] == paid.parent_no and restored["reason"] == Reason.MERCHANT_CANCEL
    assert [i["quantity"] for i in restored["items"]] == [1]
    closed = last(svc, Evt.ORDER_CLOSED, order_no=cancelled)
    assert (closed["reason"], closed["refunded_amount"]) == (Reason.MERCHANT_CANCEL, amount)
    assert order(svc, cancelled).status == OrderStatus.CLOSED
    assert order(svc, kept).status == order(svc, paid.parent_no).status == OrderStatus.PAID
    assert one(svc, "merchant_cancellations", order_no=cancelled).step == "CLOSED"
    steps = actions(svc, cancelled)
    for step in (
        "MERCHANT_CANCEL_REQUESTED",
        "REFUND_REQUESTED",
        "MERCHANT_CANCEL_REFUND_REQUESTED",
        "MERCHANT_CANCEL_REFUNDED",
        "STOCK_RESTORED",
        "REFUND_CLOSE",
        "MERCHANT_CANCEL_CLOSED",
    ):
        assert steps.count(step) == 1, f"{step} in {steps}"

    # And the other child still ships, which ships the parent
    ship(svc, kept)
    assert order(svc, paid.parent_no).status == OrderStatus.SHIPPED


def test_a_repeated_cancel_resumes_and_retries_a_failed_refund(svc: InProcessService) -> None:
    # Given a child its merchant cancelled
    _, child, merchant = one_child_order(svc)
    cancel = {"order_no": child, "merchant_id": merchant, "reason": "damaged"}
    svc.send(Cmd.MERCHANT_CANCEL, cancel)
    refund = last(svc, Evt.REFUND_REQUESTED, order_no=child)

    # When the merchant cancels again while the refund is pending
    svc.send(Cmd.MERCHANT_CANCEL, cancel)

    # Then nothing new is asked
    assert svc.answers[-1].names() == []
    assert svc.db.count("refunds", order_no=child) == 1
    (repeat,) = [x for x in svc.db.timeline(child) if x.action == "MERCHANT_CANCEL_REPEATED"]
    assert repeat.detail == {
        "step": "REFUND_REQUESTED",
        "refund_no": refund["refund_no"],
        "refund_retried": False,
    }

    # When the refund fails and the merchant cancels once more
    refund_result(svc, refund["refund_no"], "FAILED")
    svc.send(Cmd.MERCHANT_CANCEL, cancel)

    # Then the same refund is submitted again
    again = last(svc, Evt.REFUND_REQUESTED, order_no=child)
    assert (again["refund_no"], again["attempt"]) == (refund["refund_no"], 2)
    assert svc.db.count("refunds", order_no=child) == 1

    # And when it succeeds the child closes once, even if the result comes twice
    refund_result(svc, refund["refund_no"])
    refund_result(svc, refund["refund_no"])
    assert len(svc.db.events_named(Evt.ORDER_CLOSED)) == 2  # the child and its parent
    assert len(svc.db.events_named(Evt.STOCK_RESTORED)) == 1


def test_a_merchant_cancel_is_refused_for_a_stranger_a_parent_or_once_shipped(svc: InProcessService) -> None:
    # Given a paid order of two merchants, one child shipped
    paid, m1, m2 = two_merchant_order(svc)
    shipped, waiting = paid.child_of(m1), paid.child_of(m2)
    ship(svc, shipped)

    def cancel(order_no: str, merchant: str) -> dict[str, Any]:
        svc.send(Cmd.MERCHANT_CANCEL, {"order_no": order_no, "merchant_id": merchant, "reason": "r"})
        return rejected(svc)

    # When another merchant cancels the waiting child, someone names the parent, and the
    # shipped child's merchant cancels it
    foreign = cancel(waiting, m1)
    parent = cancel(paid.parent_no, m2)
    late = cancel(shipped, m1)

    # Then each is refused and no refund is made
    assert (foreign["reason"], foreign["merchant_id"], foreign["command"]) == (
        Reason.MERCHANT_MISMATCH,
        m1,
        Cmd.MERCHANT_CANCEL,
    )
    assert parent["reason"] == Reason.INVALID_STATE and "not a child order" in parent["detail"]
    assert late["reason"] == Reason.ALREADY_SHIPPED
    assert svc.db.count("refunds") == 0 and svc.db.count("merchant_cancellations") == 0


def test_a_merchant_cancel_is_refused_when_nothing_is_left_or_the_child_closed(svc: InProcessService) -> None:
    # Given a paid child whose whole amount an approved request is being refunded
    paid, child, merchant = one_child_order(svc)
    amount = paid_amount(svc, child)
    aftersale_no = ask(svc, paid, child, "REFUND_ONLY", amount)["aftersale_no"]
    svc.send(Cmd.AFTERSALE_APPROVE, {"aftersale_no": aftersale_no, "merchant_id": merchant})
    cancel = {"order_no": child, "merchant_id": merchant, "reason": "r"}

    # When its merchant cancels it
    svc.send(Cmd.MERCHANT_CANCEL, cancel)

    # Then it is refused: nothing is left to refund
    nothing = rejected(svc)
    assert nothing["reason"] == Reason.INVALID_STATE and "nothing left" in nothing["detail"]

    # When the refund succeeds (the child closes) and the merchant cancels again
    refund_result(svc, last(svc, Evt.REFUND_REQUESTED, order_no=child)["refund_no"])
    svc.send(Cmd.MERCHANT_CANCEL, cancel)

    # Then it is refused as a wrong state, and no cancellation was recorded
    closed = rejected(svc)
    assert closed["reason"] == Reason.INVALID_STATE and OrderStatus.CLOSED in closed["detail"]
    assert svc.db.count("merchant_cancellations") == 0
