"""The model-based test, fast profile: the same kind of machine as test_model.py, in one process.

Hypothesis sends contract commands in any order to `testing.fakes.service.InProcessService`:
every consumer's real handlers and routes, the loop's own validation, dedup and refusal path,
on the fake database (testing/fakes/) with a virtual clock. No broker, no PostgreSQL: an
example is a few milliseconds, so thousands of interleavings run in a minute, and the timers
(payment timeout, after-sale review, auto-confirm) race the commands whenever the clock is
advanced past them. Because nothing runs concurrently, outcomes that the real-broker model
has to read back from events are decided here: a payment of the right amount for an unpaid
order must pay it.

The invariants after every step are the product's promises (README "Guarantees"):
  I2 nothing twice (a message id applies once, a re-sent one causes nothing; one order.created
     and one order.paid per order; stock moves at most what was ordered),
  I3 stock adds up per (sku, warehouse), and matches its ledger,
  I4 a payment is applied or refunded (a cancelled order kept no payment; a paid order that
     ends cancelled or closed had its money refunded),
  I5 refunds never exceed the payment they return (refundable balance never negative),
  and no order is in a status its kind cannot have.
A failure can be a fake's bug or the service's: compare the fake with its SQL twin in store/.

Profile: MODEL_INPROCESS_EXAMPLES (default 300) examples of at most MODEL_INPROCESS_STEPS
(default 40) steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from pydantic import SecretStr

from consumers.events import EVENTS
from consumers.outcomes import Applied, Duplicate, Park
from domain.names import UNROUTED_QUEUE
from domain.signing import sign
from domain.status import OrderStatus, parent_status
from settings import Settings
from testing.fakes.db import FakeDatabase, Record
from testing.fakes.service import Answer, InProcessService
from testing.model_records import PlacedOrder, Sent, Sku

EXAMPLES = int(os.environ.get("MODEL_INPROCESS_EXAMPLES", "300"))
STEPS = int(os.environ.get("MODEL_INPROCESS_STEPS", "40"))

PAYMENT_TIMEOUT = timedelta(seconds=30)
REVIEW_TIMEOUT = timedelta(seconds=45)
AUTO_CONFIRM = timedelta(seconds=60)
SECRET = "in-process-model-webhook-secret-0123456789abcdef"
SETTINGS = Settings(
    payment_webhook_secret=SecretStr(SECRET),
    order_payment_timeout=PAYMENT_TIMEOUT,
    aftersale_review_timeout=REVIEW_TIMEOUT,
    auto_confirm_receipt_after=AUTO_CONFIRM,
)
# Steps of the clock: short ones between commands, and ones past each timer's delay.
ADVANCES = [timedelta(seconds=s) for s in (1, 5, 20, 31, 46, 61, 120)]

RECEIVER = {"name": "Li Lei", "phone": "13800000000", "address": "1 Garden Road, Hangzhou"}
FOREIGN_REFUNDS = ("LATE_PAYMENT", "PAYMENT_REJECTED")
STATE_CHANGES = frozenset(
    {
        "order.paid",
        "order.split",
        "order.completed",
        "order.cancelled",
        "order.closed",
        "stock.released",
        "stock.deducted",
        "stock.restored",
        "refund.requested",
        "refund.succeeded",
        "refund.failed",
    }
)
STATUSES = {s.value for s in OrderStatus}
# Statuses each kind of order can be in.
PARENT_STATUSES = STATUSES  # physical parent: unpaid, cancelled, or derived from its children
CHILD_STATUSES = {"PAID", "SHIPPED", "COMPLETED", "CLOSED"}  # made at payment, never cancelled
VIRTUAL_STATUSES = {"PENDING_PAYMENT", "CANCELLED", "PAID", "COMPLETED", "CLOSED"}  # never shipped

LINES = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=2, unique_by=lambda x: x[0]
)  # (SKU index, quantity)
COUPON = st.none() | st.integers(0, 1)  # index of one of the user's coupons
RIGHT = st.sampled_from([True, True, True, False])  # the merchant answerable, or another one


def shown(answer: Answer) -> list[tuple[str, dict[str, Any]]]:
    return answer.events


def said(answer: Answer) -> str:
    """What a command led to, in a word or two (hypothesis statistics count them)."""
    if isinstance(answer.outcome, Duplicate):
        return "duplicate"
    words = {
        name + (f"({body.get('code') or body.get('reason')})" if name.endswith("rejected") else "")
        for name, body in answer.events
    }
    return " ".join(sorted(words)) or "nothing"


def on_contract(answer: Answer) -> None:
    """Every event an answer holds is one of the contract's, and fits its typed model."""
    for name, body in answer.events:
        assert name in EVENTS, f"event {name} is not in consumers/events.py: {shown(answer)}"
        EVENTS[name].model_validate(body)


class InProcessOrderModel(RuleBasedStateMachine):
    """Commands in any order against the service in memory; its promises checked after each."""

    orders = Bundle("orders")
    aftersales = Bundle("aftersales")
    refunds = Bundle("refunds")

    def __init__(self) -> None:
        super().__init__()
        self.svc = InProcessService(SETTINGS)
        self.db: FakeDatabase = self.svc.db
        self.counter = 0
        self.log: list[Sent] = []
        self.applied: list[Sent] = []  # commands applied (not parked): may be re-sent as they are
        self.placed: dict[str, PlacedOrder] = {}
        self.parent_of: dict[str, str] = {}
        self.tracking: dict[str, str] = {}
        self.payments: list[Sent] = []
        self.refund_pool: list[str] = []
        self.fired: list[dict[str, Any]] = []  # timers fired so far, as they were scheduled
        self.skus: list[Sku] = []
        self.users: list[str] = []
        self.merchants: list[str] = []
        self.coupons: dict[str, list[str]] = {}

    # -- talking to the service -------------------------------------------------------------------

    def unique(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def now(self) -> str:
        return self.svc.clock.now().isoformat()

    def send(self, routing_key: str, body: dict[str, Any], message_id: str | None = None) -> Answer:
        sent = Sent(routing_key, body, message_id or self.unique("msg"))
        self.log.append(sent)
        answer = self.svc.deliver(routing_key, body, sent.message_id)
        self.check_answered(sent, answer)
        if isinstance(answer.outcome, Applied):
            self.applied.append(sent)
        self.learn(answer)
        event(f"{routing_key} -> {said(answer)}")
        return answer

    def check_answered(self, sent: Sent, answer: Answer) -> None:
        """I1 in memory: every command is applied (its dedup row written), parked with
        command.rejected, or a duplicate that changed nothing."""
        outcome = answer.outcome
        on_contract(answer)
        consumer = self.svc.queue_of.get(sent.routing_key, UNROUTED_QUEUE)
        if isinstance(outcome, Applied):
            assert self.db.count("processed_messages", consumer=consumer, message_id=sent.message_id) == 1
        elif isinstance(outcome, Park):
            assert answer.names() == ["command.rejected"], shown(answer)
        elif isinstance(outcome, Duplicate):
            assert not answer.events, f"I2: a duplicate of {sent} caused {shown(answer)}"
        else:
            raise AssertionError(f"{sent}: unexpected outcome {outcome}")

    def signed(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "signature": sign(body, SECRET)}

    def learn(self, answer: Answer) -> None:
        for name, body in answer.events:
            if name == "order.split" and body["order_no"] in self.placed:
                parent = self.placed[body["order_no"]]
                for child in body["children"]:
                    if child["order_no"] not in self.parent_of:
                        self.parent_of[child["order_no"]] = parent.order_no
                        parent.children.append(child["order_no"])
            elif name == "refund.requested" and body["refund_no"] not in self.refund_pool:
                self.refund_pool.append(body["refund_no"])

    def member(self, parent: str, which: int) -> str:
        kids = self.placed[parent].children
        return kids[(which - 1) % len(kids)] if which and kids else parent

    def user(self, index: int) -> str:
        return self.users[index % len(self.users)]

    def owner(self, order_no: str) -> str:
        parent = self.parent_of.get(order_no, order_no)
        return self.placed[parent].user_id if parent in self.placed else self.users[0]

    def order(self, order_no: str) -> Record:
        row = self.db.one("orders", order_no=order_no)
        assert row is not None, f"order {order_no} vanished"
        return row

    def merchant_for(self, order_no: str, right: bool) -> str:
        rows = self.db.rows("order_items", where=lambda r: order_no in (r.order_no, r.child_order_no))
        merchant = rows[0].merchant_id if rows else self.merchants[0]
        return merchant if right else next(m for m in self.merchants if m != merchant)

    # -- Given ------------------------------------------------------------------------------------

    @initialize(target=orders)
    def given_a_catalogue_and_a_paid_order(self) -> Any:
        self.merchants = ["M1", "M2"]
        self.skus = [
            Sku("tea", 1500, "M1", "W1", 4),
            Sku("pot", 4000, "M2", "W2", 3),
            Sku("cup", 700, "M1", "W2", 3),
        ]
        self.users = ["u1", "u2"]
        for s in self.skus:
            answer = self.send(
                "sku.upsert",
                {
                    "sku": s.sku,
                    "name": f"Item {s.sku}",
                    "unit_price": s.price,
                    "merchant_id": s.merchant_id,
                    "warehouse_id": s.warehouse_id,
                },
            )
            assert answer.names() == ["sku.upserted"], shown(answer)
        for user in self.users:
            self.coupons[user] = []
            for amount in (300, 600):
                code = f"c{amount}-{user}"
                self.coupons[user].append(code)
                body = {
                    "code": code,
                    "user_id": user,
                    "amount": amount,
                    "min_spend": 0,
                    "expires_at": "2099-01-01T00:00:00Z",
                }
                assert self.send("coupon.grant", body).names() == ["coupon.granted"]
        for s in self.skus:
            answer = self.send(
                "stock.restock", {"sku": s.sku, "warehouse_id": s.warehouse_id, "quantity": s.stock}
            )
            assert answer.names() == ["stock.restocked"], shown(answer)
        order_no = self.place(0, [(0, 1), (1, 1)], virtual=False, coupon=None)
        assert order_no is not None
        assert len(self.notify(order_no, "exact")) == 2
        return order_no

    # -- When: orders are placed ------------------------------------------------------------------

    def place(self, user: int, lines: list[tuple[int, int]], virtual: bool, coupon: int | None) -> str | None:
        user_id = self.user(user)
        items: list[dict[str, Any]] = [{"sku": self.skus[i].sku, "quantity": q} for i, q in lines]
        body: dict[str, Any] = {
            "request_id": self.unique("req"),
            "user_id": user_id,
            "order_type": "virtual" if virtual else "physical",
            "items": items,
        }
        if not virtual:
            body["receiver"] = RECEIVER
        if coupon is not None:
            body["coupon_code"] = self.coupons[user_id][coupon]
        available: dict[str, int] = defaultdict(int)
        for row in self.db.rows("stock"):
            available[row.sku] = max(available[row.sku], int(row.available))
        answer = self.send("order.place", body)
        created = answer.of("order.created")
        if not created:
            rejections = answer.of("order.rejected")
            assert len(rejections) == 1, f"order.place answered with {shown(answer)}"
            rejected = rejections[0]
            if rejected["reason"] == "OUT_OF_STOCK":
                assert any(i["quantity"] > available[i["sku"]] for i in items), (
                    f"OUT_OF_STOCK although every line was available: {dict(available)} {items}"
                )
            else:
                assert rejected["reason"] == "COUPON_INVALID" and coupon is not None, shown(answer)
            return None
        assert len(created) == 1 and "stock.locked" in answer.names(), shown(answer)
        order = created[0]
        assert order["goods_total"] == sum(self.skus[i].price * q for i, q in lines), order
        assert order["payable"] == order["goods_total"] + order["freight"] - order["discount_total"], order
        assert order["payable"] > 0, order
        self.placed[order["order_no"]] = PlacedOrder(
            order["order_no"],
            user_id,
            body["order_type"],
            order["payable"],
            self.log[-1],
            {(self.skus[i].sku, self.skus[i].warehouse_id): q for i, q in lines},
        )
        return str(order["order_no"])

    @rule(target=orders, user=st.integers(0, 1), lines=LINES, virtual=st.booleans(), coupon=COUPON)
    def place_order(self, user: int, lines: list[tuple[int, int]], virtual: bool, coupon: int | None) -> Any:
        order_no = self.place(user, lines, virtual, coupon)
        return multiple() if order_no is None else order_no

    @rule(target=orders, user=st.integers(0, 1), lines=LINES, virtual=st.booleans(), coupon=COUPON)
    def place_and_pay(
        self, user: int, lines: list[tuple[int, int]], virtual: bool, coupon: int | None
    ) -> Any:
        order_no = self.place(user, lines, virtual, coupon)
        if order_no is None:
            return multiple()
        self.notify(order_no, "exact")
        return order_no

    @rule(order=orders)
    def place_the_same_request_again(self, order: str) -> None:
        answer = self.send("order.place", self.placed[order].place.body)
        assert not answer.of("order.created") and "stock.locked" not in answer.names(), (
            f"one request_id made two orders: {shown(answer)}"
        )
        assert [r["reason"] for r in answer.of("order.rejected")] == ["DUPLICATE_REQUEST"], shown(answer)

    # -- When: payments arrive --------------------------------------------------------------------

    @rule(order=orders, how=st.sampled_from(["exact", "exact", "exact", "wrong_amount", "bad_signature"]))
    def pay(self, order: str, how: str) -> None:
        self.notify(order, how)

    def notify(self, order: str, how: str) -> list[str]:
        placed = self.placed[order]
        amount = placed.payable + (100 if how == "wrong_amount" else 0)
        body = self.signed(
            {
                "order_no": order,
                "payment_no": self.unique("pay"),
                "method": "card",
                "amount": amount,
                "paid_at": self.now(),
            }
        )
        if how == "bad_signature":
            body["signature"] = "0" * 64
        before = self.order(order).status
        answer = self.send("payment.notify", body)
        rejected = answer.of("payment.rejected")
        refunds = answer.of("refund.requested")
        if how == "bad_signature":
            assert answer.names() == ["payment.rejected"] and rejected[0]["reason"] == "BAD_SIGNATURE", shown(
                answer
            )
            return []
        self.payments.append(Sent("payment.notify", body, ""))
        if how == "wrong_amount":
            assert [r["reason"] for r in rejected] == ["AMOUNT_MISMATCH"], shown(answer)
            assert [(r["reason"], r["amount"]) for r in refunds] == [("PAYMENT_REJECTED", amount)], (
                f"I4: a signed payment of the wrong amount was kept, not refunded: {shown(answer)}"
            )
            return []
        paid = answer.of("order.paid", order_no=order)
        # In one process nothing races: an unpaid order takes the payment, any other refunds it.
        assert bool(paid) == (before == "PENDING_PAYMENT"), f"a {before} order: {shown(answer)}"
        if paid:
            assert "stock.deducted" in answer.names(), shown(answer)
            if placed.order_type == "virtual":
                assert answer.of("order.completed", order_no=order), shown(answer)
                return []
            (split,) = answer.of("order.split", order_no=order)
            assert sum(c["payable"] for c in split["children"]) == placed.payable, split
            return [c["order_no"] for c in split["children"]]
        assert [(r["reason"], r["amount"]) for r in refunds] == [("LATE_PAYMENT", amount)], (
            f"I4: a payment of the right amount was neither applied nor refunded: {shown(answer)}"
        )
        return []

    @precondition(lambda self: self.payments)
    @rule(pick=st.integers(0, 1000))
    def notify_the_same_payment_again(self, pick: int) -> None:
        first = self.payments[pick % len(self.payments)]
        answer = self.send("payment.notify", first.body)
        assert not STATE_CHANGES & set(answer.names()), f"the same payment_no twice: {shown(answer)}"

    # -- When: the user cancels -------------------------------------------------------------------

    @rule(target=refunds, parent=orders, which=st.sampled_from([0, 0, 0, 1]), user=st.integers(0, 2))
    def cancel(self, parent: str, which: int, user: int) -> Any:
        order = self.member(parent, which)
        user_id = self.owner(order) if user == 2 else self.user(user)
        shipped = self.db.rows("orders", where=lambda r: r.parent_no == order and r.shipped_at is not None)
        before = self.order(order).status
        answer = self.send(
            "order.cancel", {"order_no": order, "user_id": user_id, "reason": "changed my mind"}
        )
        refunds = answer.of("refund.requested")
        stranger = user_id != self.owner(order)
        if stranger:
            assert not refunds and not answer.of("order.cancelled"), f"a stranger cancelled: {shown(answer)}"
        elif shipped and order in self.placed:
            rejected = answer.of("order.rejected")
            assert not refunds and [r["reason"] for r in rejected] == ["ALREADY_SHIPPED"], (
                f"cancel after {shipped[0].order_no} shipped: {shown(answer)}"
            )
        elif before == "PENDING_PAYMENT" and order in self.placed:
            assert answer.of("order.cancelled", order_no=order), shown(answer)
            assert self.order(order).status == "CANCELLED"
        return multiple(*(r["refund_no"] for r in refunds))

    # -- When: the merchant ships, the carrier tracks, the user confirms -------------------------

    @rule(parent=orders, which=st.integers(0, 3))
    def ship(self, parent: str, which: int) -> None:
        order = self.member(parent, which)
        tracking_no = self.unique("SF")
        before = self.order(order).status
        answer = self.send("order.ship", {"order_no": order, "carrier": "SF", "tracking_no": tracking_no})
        if answer.of("order.shipped", order_no=order):
            self.tracking[order] = tracking_no
            assert order in self.parent_of, f"a parent order shipped by itself: {shown(answer)}"
            assert before == "PAID", f"a {before} order shipped: {shown(answer)}"

    @rule(
        parent=orders,
        which=st.integers(1, 3),
        status=st.sampled_from(["PICKED_UP", "IN_TRANSIT", "DELIVERED"]),
    )
    def logistics_update(self, parent: str, which: int, status: str) -> None:
        order = self.member(parent, which)  # a child, once the order has split
        self.send(
            "logistics.update",
            {
                "order_no": order,
                "tracking_no": self.tracking.get(order, "SF-unknown"),
                "status": status,
                "at": self.now(),
                "detail": "",
            },
        )

    @rule(parent=orders, which=st.integers(1, 3), user=st.sampled_from([0, 1, 2, 2]))
    def confirm_receipt(self, parent: str, which: int, user: int) -> None:
        order = self.member(parent, which)
        user_id = self.owner(order) if user == 2 else self.user(user)
        before = self.order(order).status
        answer = self.send("order.confirm-receipt", {"order_no": order, "user_id": user_id})
        if user_id != self.owner(order):
            assert not answer.of("order.completed"), f"a stranger confirmed: {shown(answer)}"
        elif before == "SHIPPED":
            assert answer.of("order.completed", order_no=order), shown(answer)

    @rule(order=orders, user=st.integers(0, 2))
    def update_address(self, order: str, user: int) -> None:
        user_id = self.owner(order) if user == 2 else self.user(user)
        receiver = {**RECEIVER, "address": self.unique("street")}
        answer = self.send(
            "order.update-address", {"order_no": order, "user_id": user_id, "receiver": receiver}
        )
        if user_id != self.owner(order):
            assert not answer.of("order.address-updated"), f"a stranger moved the address: {shown(answer)}"

    @rule(
        parent=orders,
        which=st.integers(0, 3),
        author=st.sampled_from(["buyer", "stranger", "merchant", "other-merchant", "ops"]),
    )
    def remark(self, parent: str, which: int, author: str) -> None:
        order = self.member(parent, which)
        lines = self.db.rows("order_items", where=lambda r: order in (r.order_no, r.child_order_no))
        merchants = sorted({r.merchant_id for r in lines})
        stranger = next(u for u in [*self.users, "nobody"] if u != self.owner(order))
        by = {
            "buyer": f"user:{self.owner(order)}",
            "stranger": f"user:{stranger}",
            "merchant": f"merchant:{merchants[0] if merchants else 'none'}",
            "other-merchant": "merchant:nobody",
            "ops": "ops:alice",
        }[author]
        before = self.order(order)
        text = self.unique("note")
        answer = self.send("order.remark", {"order_no": order, "author": by, "text": text})
        if author in ("buyer", "merchant", "ops") and (author != "merchant" or merchants):
            kept = {"order_no": order, "author": by, "text": text}
            assert answer.of("order.remarked") == [kept], shown(answer)
        else:
            assert not answer.of("order.remarked"), f"a stranger's remark was kept: {shown(answer)}"
            assert answer.of("order.rejected", order_no=order), shown(answer)
        after = self.order(order)
        assert (after.status, after.version) == (before.status, before.version), "a remark changed the order"

    # -- When: after-sales ------------------------------------------------------------------------

    def refundable(self, order_no: str) -> int | None:
        """What may still be refunded on an order (a child, or a virtual order), by the contract:
        its own share (paid, less its refunds, a failed one included: it may still be retried
        or succeed late, and claims not yet behind a refund) and what remains of the payment
        (less refunds not failed and claims). None when the order has not been paid."""
        root = self.parent_of.get(order_no, order_no)
        target = self.db.one("orders", order_no=order_no)
        payment = sum(p.amount for p in self.db.rows("payments", order_no=root, outcome="APPLIED"))
        if target is None or not payment:
            return None
        family = {root, *self.placed[root].children} if root in self.placed else {root}
        refunds = self.db.rows(
            "refunds", where=lambda r: r.order_no in family and r.source not in FOREIGN_REFUNDS
        )
        claims = self.db.rows(
            "aftersales",
            where=lambda a: a.order_no in family and a.status in ("PENDING_REVIEW", "AWAITING_RETURN"),
        )
        own = target.paid_amount - sum(x.amount for x in [*refunds, *claims] if x.order_no == order_no)
        of_payment = payment - sum(
            x.amount for x in [*refunds, *claims] if getattr(x, "status", "") != "FAILED"
        )
        return int(min(own, of_payment))

    @rule(
        target=aftersales,
        parent=orders,
        which=st.integers(0, 3),
        user=st.integers(0, 2),
        kind=st.sampled_from(["REFUND_ONLY", "RETURN_REFUND"]),
        share=st.sampled_from(["one", "quarter", "half", "all", "more"]),
    )
    def request_aftersale(self, parent: str, which: int, user: int, kind: str, share: str) -> Any:
        order = self.member(parent, which)
        user_id = self.owner(order) if user == 2 else self.user(user)
        paid = self.order(order).paid_amount
        amount = max(
            1, {"one": 1, "quarter": paid // 4, "half": paid // 2, "all": paid, "more": paid + 1}[share]
        )
        left = self.refundable(order)
        answer = self.send(
            "aftersale.request",
            {"order_no": order, "user_id": user_id, "kind": kind, "amount": amount, "reason": "broken"},
        )
        requested = answer.of("aftersale.requested")
        refused = [r["reason"] for r in answer.of("order.rejected")]
        if requested:
            assert user_id == self.owner(order), f"a stranger asked for money back: {shown(answer)}"
            assert left is not None and amount <= left, (
                f"I5: an after-sale of {amount} accepted with only {left} left to refund: {shown(answer)}"
            )
        if refused == ["AMOUNT_EXCEEDS_REFUNDABLE"] and left is not None:
            assert amount > left, f"I5: an after-sale of {amount} refused with {left} left: {shown(answer)}"
        return multiple(*(r["aftersale_no"] for r in requested))

    def aftersale_order(self, aftersale: str) -> str:
        row = self.db.one("aftersales", aftersale_no=aftersale)
        assert row is not None
        return str(row.order_no)

    @rule(target=refunds, aftersale=aftersales, right=RIGHT)
    def approve_aftersale(self, aftersale: str, right: bool) -> Any:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answer = self.send("aftersale.approve", {"aftersale_no": aftersale, "merchant_id": merchant})
        if not right:
            assert not answer.of("aftersale.approved"), f"a stranger approved: {shown(answer)}"
        return multiple(*(r["refund_no"] for r in answer.of("refund.requested")))

    @rule(aftersale=aftersales, right=RIGHT)
    def reject_aftersale(self, aftersale: str, right: bool) -> None:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answer = self.send(
            "aftersale.reject", {"aftersale_no": aftersale, "merchant_id": merchant, "reason": "used"}
        )
        if not right:
            assert not answer.of("aftersale.rejected"), f"a stranger rejected: {shown(answer)}"

    @rule(target=refunds, aftersale=aftersales, right=RIGHT)
    def receive_return(self, aftersale: str, right: bool) -> Any:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answer = self.send("aftersale.return-received", {"aftersale_no": aftersale, "merchant_id": merchant})
        if not right:
            assert not answer.of("refund.requested"), f"a stranger received a return: {shown(answer)}"
        return multiple(*(r["refund_no"] for r in answer.of("refund.requested")))

    @rule(target=refunds, parent=orders, which=st.integers(0, 3), right=RIGHT)
    def merchant_cancel(self, parent: str, which: int, right: bool) -> Any:
        order = self.member(parent, which)
        merchant = self.merchant_for(order, right)
        answer = self.send(
            "merchant.cancel", {"order_no": order, "merchant_id": merchant, "reason": "no stock"}
        )
        if not right:
            assert not answer.of("refund.requested"), f"a stranger cancelled: {shown(answer)}"
        return multiple(*(r["refund_no"] for r in answer.of("refund.requested")))

    # -- When: the refund provider reports --------------------------------------------------------

    def report_refund(self, refund_no: str, status: str) -> None:
        body = self.signed(
            {"refund_no": refund_no, "status": status, "provider_refund_no": self.unique("prv")}
        )
        if status == "FORGED":
            body = {**body, "status": "SUCCEEDED"}  # signed for another status
        refund = self.db.one("refunds", refund_no=refund_no)
        assert refund is not None
        payment = self.db.one("payments", payment_no=refund.payment_no)
        answer = self.send("refund.result", body)
        if status == "FORGED":
            assert isinstance(answer.outcome, Park) and not STATE_CHANGES & set(answer.names()), shown(answer)
        elif isinstance(answer.outcome, Park):
            # Only a success reported after a failure, once the amount given back has been
            # promised again (REFUND_CONFLICT): an operator reconciles it with the provider.
            conflict = (
                status == "SUCCEEDED"
                and refund.status == "FAILED"
                and payment is not None
                and payment.refundable < refund.amount
            )
            assert conflict and answer.outcome.code == "REFUND_CONFLICT", (
                f"a known refund's result parked: {shown(answer)}"
            )
            assert self.db.one("refunds", refund_no=refund_no) == refund, "a parked result changed its refund"

    @rule(refund=refunds, status=st.sampled_from(["SUCCEEDED", "SUCCEEDED", "FAILED", "FORGED"]))
    def refund_result(self, refund: str, status: str) -> None:
        self.report_refund(refund, status)

    @precondition(lambda self: self.refund_pool)
    @rule(pick=st.integers(0, 1000), status=st.sampled_from(["SUCCEEDED", "FAILED"]))
    def refund_result_of_any_refund(self, pick: int, status: str) -> None:
        waiting = sorted(r.refund_no for r in self.db.rows("refunds", status="REQUESTED"))
        pool = waiting or self.refund_pool
        self.report_refund(pool[pick % len(pool)], status)

    # -- When: time passes, messages repeat, producers misbehave ----------------------------------

    @rule(step=st.sampled_from(ADVANCES))
    def time_passes(self, step: timedelta) -> None:
        # When time passes: the timers that fall due fire, in due order, between the commands
        for answer in self.svc.advance(step):
            assert answer.timer is not None
            assert not isinstance(answer.outcome, Park), f"timer {answer.timer} parked: {shown(answer)}"
            on_contract(answer)
            self.fired.append(dict(answer.timer))
            self.learn(answer)
            event(f"timer {answer.timer['kind']} -> {said(answer)}")

    @precondition(lambda self: self.fired)
    @rule(pick=st.integers(0, 1000))
    def a_timer_fires_again(self, pick: int) -> None:
        # A timer delivered twice (the sweeper and its message, or a redelivery): the second
        # finds its transition done and changes nothing
        timer = self.fired[pick % len(self.fired)]
        answer = self.svc.fire(timer)
        event(f"timer {timer['kind']} again -> {said(answer)}")
        assert not STATE_CHANGES & set(answer.names()), f"timer {timer} fired twice: {shown(answer)}"

    @precondition(lambda self: self.applied)
    @rule(pick=st.integers(0, 1000))
    def redeliver(self, pick: int) -> None:
        sent = self.applied[pick % len(self.applied)]
        answer = self.svc.deliver(sent.routing_key, sent.body, sent.message_id)
        self.log.append(sent)
        assert isinstance(answer.outcome, Duplicate) and not answer.events, (
            f"I2 nothing twice: {sent.routing_key} {sent.message_id} again: {answer.outcome} {shown(answer)}"
        )

    @rule(what=st.sampled_from(["order", "after-sale", "refund"]))
    def name_what_does_not_exist(self, what: str) -> None:
        # When a command names an order, after-sale or refund the service never made
        if what == "order":
            answer = self.send("order.cancel", {"order_no": self.unique("O-none"), "user_id": self.users[0]})
            assert [r["reason"] for r in answer.of("order.rejected")] == ["UNKNOWN_ORDER"], shown(answer)
        elif what == "after-sale":
            body = {"aftersale_no": self.unique("A-none"), "merchant_id": self.merchants[0]}
            answer = self.send("aftersale.approve", body)
            assert [r["reason"] for r in answer.of("order.rejected")] == ["UNKNOWN_AFTERSALE"], shown(answer)
        else:
            body = self.signed({"refund_no": self.unique("R-none"), "status": "SUCCEEDED"})
            answer = self.send("refund.result", body)
            assert isinstance(answer.outcome, Park) and answer.outcome.code == "UNKNOWN_REFUND", shown(answer)

    @rule(
        where=st.sampled_from(
            [
                "order.cancel reason",
                "order.place address",
                "aftersale.request reason",
                "logistics.update detail",
                "unknown routing key",
                "payment for no order",
                "no message id",
            ]
        )
    )
    def misbehave(self, where: str) -> None:
        """A producer sends what the contract does not allow."""
        if where == "unknown routing key":
            answer = self.send("order.teleport", {"order_no": self.unique("O-none")})
            assert isinstance(answer.outcome, Park) and answer.events[0][1]["code"] == "UNKNOWN_ROUTING_KEY"
            return
        if where == "no message id":
            answer = self.svc.deliver("order.cancel", {"order_no": "O", "user_id": "u"}, None)
            assert isinstance(answer.outcome, Park) and answer.events[0][1]["code"] == "MISSING_MESSAGE_ID"
            return
        if where == "payment for no order":
            body = self.signed(
                {
                    "order_no": self.unique("O-none"),
                    "payment_no": self.unique("pay"),
                    "method": "card",
                    "amount": 100,
                    "paid_at": self.now(),
                }
            )
            answer = self.send("payment.notify", body)
            assert [r["reason"] for r in answer.of("payment.rejected")] == ["UNKNOWN_ORDER"], shown(answer)
            return
        bad = "a\u0000b"
        order = next(iter(self.placed), "O-none")
        bodies: dict[str, tuple[str, dict[str, Any]]] = {
            "order.cancel reason": (
                "order.cancel",
                {"order_no": order, "user_id": self.users[0], "reason": bad},
            ),
            "order.place address": (
                "order.place",
                {
                    "request_id": self.unique("req"),
                    "user_id": self.users[0],
                    "order_type": "physical",
                    "items": [{"sku": self.skus[0].sku, "quantity": 1}],
                    "receiver": {**RECEIVER, "address": bad},
                },
            ),
            "aftersale.request reason": (
                "aftersale.request",
                {
                    "order_no": order,
                    "user_id": self.users[0],
                    "kind": "REFUND_ONLY",
                    "amount": 1,
                    "reason": bad,
                },
            ),
            "logistics.update detail": (
                "logistics.update",
                {
                    "order_no": order,
                    "tracking_no": "SF-x",
                    "status": "IN_TRANSIT",
                    "at": self.now(),
                    "detail": bad,
                },
            ),
        }
        routing_key, body = bodies[where]
        answer = self.send(routing_key, body)
        assert isinstance(answer.outcome, Park), f"NUL in {where} was not parked: {shown(answer)}"

    # -- Then: the promises, after every step -----------------------------------------------------

    @invariant()
    def i2_nothing_twice(self) -> None:
        family: dict[str, str] = {o: o for o in self.placed} | self.parent_of
        created: dict[str, int] = defaultdict(int)
        paid: dict[str, int] = defaultdict(int)
        moved: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for name, body in self.db.events:
            order_no = body.get("order_no")
            if order_no not in family:
                continue
            if name == "order.created":
                created[order_no] += 1
            elif name == "order.paid":
                paid[order_no] += 1
            elif name.startswith("stock.") and name != "stock.restocked":
                for item in body["items"]:
                    moved[(name, family[order_no], item["sku"], item["warehouse_id"])] += item["quantity"]
        assert all(n <= 1 for n in created.values()), f"I2: two order.created: {dict(created)}"
        assert all(n <= 1 for n in paid.values()), f"I2: two order.paid: {dict(paid)}"
        for (kind, parent, sku, warehouse), quantity in moved.items():
            ordered = self.placed[parent].lines.get((sku, warehouse), 0)
            assert quantity <= ordered, (
                f"I2: {kind} moved {quantity} of {sku}/{warehouse} for {parent}, which ordered {ordered}"
            )
        # Each message applied once: one dedup row per applied message (commands and timers).
        applied = sum(isinstance(a.outcome, Applied) for a in self.svc.answers)
        assert self.db.count("processed_messages") == applied, "I2: dedup rows and applied messages differ"

    @invariant()
    def i3_stock_adds_up(self) -> None:
        ledger: dict[tuple[str, str, str], int] = defaultdict(int)
        for lock in self.db.rows("stock_locks"):
            ledger[(lock.sku, lock.warehouse_id, lock.state)] += lock.quantity
        for r in self.db.rows("stock"):
            counts = {k: r[k] for k in ("available", "locked", "sold", "restocked_total")}
            assert r.available + r.locked + r.sold == r.restocked_total, (
                f"I3: {r.sku}/{r.warehouse_id} does not add up: {counts}"
            )
            assert min(r.available, r.locked, r.sold) >= 0, f"I3: negative stock {counts}"
            assert r.locked == ledger[(r.sku, r.warehouse_id, "LOCKED")], (
                f"I3: {r.sku}/{r.warehouse_id} locked {r.locked}, ledger {dict(ledger)}"
            )
            assert r.sold == ledger[(r.sku, r.warehouse_id, "DEDUCTED")], (
                f"I3: {r.sku}/{r.warehouse_id} sold {r.sold}, ledger {dict(ledger)}"
            )
        shipped = {o.order_no for o in self.db.rows("orders", where=lambda o: o.shipped_at is not None)}
        unsold = [
            (lock.child_order_no, lock.sku, lock.state)
            for lock in self.db.rows("stock_locks", where=lambda lock: lock.child_order_no in shipped)
            if lock.state != "DEDUCTED"
        ]
        assert not unsold, f"I3: units of a shipped child are no longer sold: {unsold}"

    @invariant()
    def i4_every_payment_is_applied_or_refunded(self) -> None:
        orders = {o.order_no: o for o in self.db.rows("orders")}
        refunds = self.db.rows("refunds")
        for p in self.db.rows("payments"):
            if p.outcome == "APPLIED":
                assert orders[p.order_no].status != "CANCELLED", f"I4: a cancelled order kept payment {p}"
                continue
            back = [r for r in refunds if r.source_ref == p.payment_no and r.amount == p.amount]
            assert back, f"I4: payment {p} ({orders.get(p.order_no)}) was kept, not refunded"
        # Money taken and the order gone: its money is on its way back.
        for o in orders.values():
            if o.status in ("CANCELLED", "CLOSED") and o.paid_amount > 0:
                # Its own refund, its parent's (a user cancel), or its children's (each closed).
                family = {o.order_no, o.parent_no} | {
                    c.order_no for c in orders.values() if c.parent_no == o.order_no
                }
                back = [r for r in refunds if r.order_no in family and r.source not in FOREIGN_REFUNDS]
                assert back, f"I4: {o.order_no} is {o.status} and kept {o.paid_amount}: no refund"
            if o.status == "CANCELLED":
                assert o.paid_amount == 0, f"I4: cancelled order {o.order_no} shows paid {o.paid_amount}"

    @invariant()
    def i5_refunds_never_exceed_the_payment(self) -> None:
        payments = {p.payment_no: p for p in self.db.rows("payments")}
        taken: dict[str, int] = defaultdict(int)
        for r in self.db.rows("refunds"):
            if r.status != "FAILED":
                assert r.payment_no in payments, f"I5: refund {r} returns no payment"
                taken[r.payment_no] += r.amount
        for payment_no, p in payments.items():
            assert taken[payment_no] <= p.amount, (
                f"I5: refunds of {taken[payment_no]} against payment {payment_no} of {p.amount}"
            )
            assert p.refundable >= 0, f"I5: payment {payment_no} refundable {p.refundable}"
            assert p.refundable <= p.amount - taken[payment_no], (
                f"I5: payment {payment_no} of {p.amount}: refundable {p.refundable}, "
                f"refunds {taken[payment_no]}"
            )
        orders = self.db.rows("orders")
        for o in orders:
            assert 0 <= o.refunded_amount <= o.paid_amount, (
                f"I5: {o.order_no} refunded {o.refunded_amount} of {o.paid_amount}"
            )

    @invariant()
    def no_order_in_an_impossible_status(self) -> None:
        orders = self.db.rows("orders")
        kids: dict[str, list[Record]] = defaultdict(list)
        for o in orders:
            if o.parent_no is not None:
                kids[o.parent_no].append(o)
        for o in orders:
            assert o.status in STATUSES, f"{o.order_no}: unknown status {o.status}"
            if o.parent_no is not None:
                assert o.status in CHILD_STATUSES, f"child {o.order_no} is {o.status}"
            elif o.order_type == "virtual":
                assert o.status in VIRTUAL_STATUSES and not kids[o.order_no], (
                    f"virtual {o.order_no} is {o.status}"
                )
            elif kids[o.order_no] and o.status != "CLOSED":
                derived = parent_status([k.status for k in kids[o.order_no]])
                assert o.status == derived, (
                    f"parent {o.order_no} is {o.status}; its children {[k.status for k in kids[o.order_no]]} "
                    f"make it {derived}"
                )
            if o.status in ("SHIPPED", "COMPLETED") and o.order_type == "physical" and o.parent_no:
                assert o.shipped_at is not None, f"{o.order_no} is {o.status} but never shipped"
            if o.status == "PENDING_PAYMENT":
                assert o.paid_amount == 0 and not kids[o.order_no], (
                    f"unpaid {o.order_no} has money or children"
                )

    # -- After each example -----------------------------------------------------------------------

    def teardown(self) -> None:
        note("Commands of this example:\n" + json.dumps([s.replayable() for s in self.log], indent=1))


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Thousands of refusals and parks: their log lines would only cost time here."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def test_a_late_payment_refund_does_not_hold_back_an_aftersale() -> None:
    # Given a paid virtual order, and a second payment of it, refunded (LATE_PAYMENT, pending)
    svc = InProcessService(SETTINGS)
    sku = {"sku": "tea", "name": "Tea", "unit_price": 1500, "merchant_id": "M1", "warehouse_id": "W1"}
    svc.send("sku.upsert", sku)
    svc.send("stock.restock", {"sku": "tea", "warehouse_id": "W1", "quantity": 5})
    place = {
        "request_id": "r1",
        "user_id": "u1",
        "order_type": "virtual",
        "items": [{"sku": "tea", "quantity": 1}],
    }
    (created,) = svc.deliver("order.place", place, "m-place").of("order.created")
    order_no = created["order_no"]
    for payment_no in ("pay-1", "pay-2"):
        body = {"order_no": order_no, "payment_no": payment_no, "method": "card", "amount": 1500}
        body = {**body, "paid_at": svc.clock.now().isoformat()}
        svc.send("payment.notify", {**body, "signature": sign(body, SECRET)})
    assert [r.source for r in svc.db.rows("refunds")] == ["LATE_PAYMENT"]
    # When the user asks for 1 back on the order (1500 paid, nothing refunded)
    request = {"order_no": order_no, "user_id": "u1", "kind": "REFUND_ONLY", "amount": 1, "reason": "broken"}
    answer = svc.deliver("aftersale.request", request, "m-request")
    # Then it is accepted: the late payment's refund returns another payment
    assert answer.of("aftersale.requested"), answer.events


InProcessOrderModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TestInProcessOrderModel = InProcessOrderModel.TestCase
