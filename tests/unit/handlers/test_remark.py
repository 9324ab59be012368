"""order.remark (contract v1.1) on the fake unit of work: a note kept in the order's timeline and
announced with order.remarked; by the buyer, a merchant of the order's goods or an operator."""

from __future__ import annotations

import pytest

from domain.errors import Reason, RejectCode
from domain.names import Cmd, Evt
from testing.fakes.service import InProcessService
from testing.shop import last, new_service, one_child_order, order, rejected, two_merchant_order, unique


@pytest.fixture
def svc() -> InProcessService:
    return new_service()


def remark(svc: InProcessService, order_no: str, author: str, text: str = "please ring twice") -> None:
    svc.send(Cmd.ORDER_REMARK, {"order_no": order_no, "author": author, "text": text})


def remarks(svc: InProcessService, order_no: str) -> list[tuple[str, str]]:
    lines = svc.db.timeline(order_no)
    return [(line.actor, line.detail["text"]) for line in lines if line.action == "REMARK"]


def test_the_buyer_remarks_on_the_parent(svc: InProcessService) -> None:
    paid, _, _ = one_child_order(svc)
    status = order(svc, paid.parent_no).status

    remark(svc, paid.parent_no, f"user:{paid.user_id}", "leave it at the door\nthanks")

    assert svc.answers[-1].names() == [Evt.ORDER_REMARKED]
    assert last(svc, Evt.ORDER_REMARKED) == {
        "order_no": paid.parent_no,
        "author": f"user:{paid.user_id}",
        "text": "leave it at the door\nthanks",
    }
    assert remarks(svc, paid.parent_no) == [(f"user:{paid.user_id}", "leave it at the door\nthanks")]
    assert order(svc, paid.parent_no).status == status  # a remark changes nothing else


def test_a_merchant_remarks_on_its_child_and_an_operator_on_any_order(svc: InProcessService) -> None:
    paid, m1, m2 = two_merchant_order(svc)
    child = paid.child_of(m1)

    remark(svc, child, f"merchant:{m1}", "packed with care")
    remark(svc, paid.parent_no, f"merchant:{m2}", "second parcel tomorrow")
    remark(svc, child, "ops:alice", "customer called")

    assert remarks(svc, child) == [(f"merchant:{m1}", "packed with care"), ("ops:alice", "customer called")]
    assert remarks(svc, paid.parent_no) == [(f"merchant:{m2}", "second parcel tomorrow")]


def test_another_user_or_merchant_is_refused(svc: InProcessService) -> None:
    paid, m1, m2 = two_merchant_order(svc)

    remark(svc, paid.parent_no, "user:someone-else")
    assert rejected(svc)["reason"] == Reason.NOT_YOUR_ORDER

    remark(svc, paid.child_of(m1), f"merchant:{m2}")
    assert rejected(svc)["reason"] == Reason.MERCHANT_MISMATCH
    assert remarks(svc, paid.parent_no) == remarks(svc, paid.child_of(m1)) == []


def test_an_unknown_order_is_answered_with_order_rejected(svc: InProcessService) -> None:
    remark(svc, "NO-SUCH-ORDER", "ops:alice")

    body = rejected(svc)
    assert body["reason"] == Reason.UNKNOWN_ORDER
    assert body["order_no"] == "NO-SUCH-ORDER"


@pytest.mark.parametrize(
    "author, text",
    [("buyer:u1", "hi"), ("user:", "hi"), ("user:u1", ""), ("user:u1", "x" * 501), ("user:a b", "hi")],
)
def test_a_malformed_remark_is_parked(svc: InProcessService, author: str, text: str) -> None:
    paid, _, _ = one_child_order(svc)

    remark(svc, paid.parent_no, author, text)

    assert svc.answers[-1].names() == [Evt.COMMAND_REJECTED]
    assert svc.answers[-1].events[0][1]["code"] == RejectCode.SCHEMA_INVALID
    assert remarks(svc, paid.parent_no) == []


def test_the_same_message_twice_is_one_remark(svc: InProcessService) -> None:
    paid, _, _ = one_child_order(svc)
    body = {"order_no": paid.parent_no, "author": "ops:bob", "text": unique("note")}

    svc.send(Cmd.ORDER_REMARK, body, message_id="remark-1")
    svc.send(Cmd.ORDER_REMARK, body, message_id="remark-1")

    assert len(remarks(svc, paid.parent_no)) == 1
