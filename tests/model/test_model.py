"""A model-based test of the whole service: hypothesis sends contract commands in any order.

One system of our own (vhost, database, every consumer, ORDER_PAYMENT_TIMEOUT=3s) serves the
whole module. Each hypothesis example gets fresh merchants, SKUs, users and coupons, so the
invariants only look at what the current example made (an earlier example's damage must not
fail, and so mis-shrink, a later one). The rules send any contract command, correct or not,
for the right or the wrong order and user, re-send message ids, and wait so the payment
timeout fires between steps. After each rule the command must be answered: an event carrying
its message_id as correlation_id (a refusal, or `command.rejected` when parked), or its dedup
row when the contract wants no event at all (the same payment_no or refund result again).

The invariants are the product's promises (README "Guarantees", CONTRACT v1.1):
  I1 nothing lost, I2 nothing twice, I3 stock adds up, I4 a payment is applied or refunded,
  I5 refunds never exceed the payment; order.cancel after a shipped child is ALREADY_SHIPPED.
Timers race with commands, so outcomes that depend on the race (did a payment beat the
timeout?) are read back from the events; the invariants hold whichever way it went.

A failure prints, after the shrunk steps, the commands of that example as a JSON list of
{routing_key, body, message_id}; each can be re-sent with
`orders send ROUTING_KEY 'BODY' --message-id MESSAGE_ID` (order, after-sale and refund numbers
are those of the failing run: on another system, substitute the ones its events name).

Profiles: MODEL_EXAMPLES (default 30) examples of at most MODEL_STEPS (default 25) steps;
MODEL_REVIEW_TIMEOUT / MODEL_AUTO_CONFIRM (default 1h: out of the way) make the after-sale
review and auto-confirm timers race the commands too (`make test-model` sets 4s and 6s).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import psycopg2
import psycopg2.extensions
import psycopg2.extras
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

from consumers.registry import consumer_specs
from domain.names import (
    AFTERSALE_QUEUE,
    CATALOG_QUEUE,
    EVENTS_EXCHANGE,
    FULFILLMENT_QUEUE,
    PAYMENT_QUEUE,
    PLACEMENT_QUEUE,
    TIMEOUTS_QUEUE,
    UNROUTED_QUEUE,
)
from publishers.commands import CommandPublisher
from settings import Settings
from testing.broker import Event, EventListener
from testing.model_records import PlacedOrder, Sent, Sku
from testing.system import System, fresh_system

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "30"))
STEPS = int(os.environ.get("MODEL_STEPS", "25"))
PAYMENT_TIMEOUT_S = 3.0
ANSWER_TIMEOUT_S = 10.0  # a failing handler goes through the 1s and 2s retry queues before parking
DUPLICATE_GRACE_S = 0.5
DRAIN_TIMEOUT_S = 5.0
CLI_EVERY = 10  # steps between two checks of a sample order through `orders show --json`

# The run is one pytest item: give it the time its profile needs (pyproject says 300 s).
pytestmark = pytest.mark.timeout(max(300, EXAMPLES * STEPS * 4))

CONSUMER_QUEUES = (
    CATALOG_QUEUE,
    PLACEMENT_QUEUE,
    PAYMENT_QUEUE,
    FULFILLMENT_QUEUE,
    AFTERSALE_QUEUE,
    TIMEOUTS_QUEUE,
    UNROUTED_QUEUE,
)
# Which consumer applies (and writes the dedup row of) each command.
# The queue that applies each command, from the composition root (no second list to keep).
CONSUMER_OF = {key: spec.queue for spec in consumer_specs(Settings()).values() for key in spec.routes}
RECEIVER = {"name": "Li Lei", "phone": "13800000000", "address": "1 Garden Road, Hangzhou"}
# Refunds that return a payment the order never took (not part of its paid amount).
FOREIGN_REFUNDS = ("LATE_PAYMENT", "PAYMENT_REJECTED")
# Events that change something: a repeated payment or refund result must cause none of them.
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


# --------------------------------------------------------------------------------------------
# The system under test, shared by every example of the module


@dataclass
class World:
    system: System
    events: EventListener
    publisher: CommandPublisher
    poll_conn: Any  # psycopg2 connection, autocommit: one statement, one snapshot
    snap_conn: Any  # psycopg2 connection, REPEATABLE READ: several statements, one snapshot

    def read(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with self.poll_conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params or None)
            return [dict(r) for r in cur.fetchall()]

    @contextmanager
    def snapshot(self) -> Iterator[Callable[..., list[dict[str, Any]]]]:
        """Queries that all see the same committed state (timers keep committing meanwhile)."""

        def query(sql: str, *params: Any) -> list[dict[str, Any]]:
            with self.snap_conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(sql, params or None)
                return [dict(r) for r in cur.fetchall()]

        try:
            yield query
        finally:
            self.snap_conn.rollback()


_WORLD: World | None = None


@pytest.fixture(scope="module", autouse=True)
def world(infrastructure: None) -> Iterator[World]:
    global _WORLD
    with fresh_system(
        ORDER_PAYMENT_TIMEOUT=f"{int(PAYMENT_TIMEOUT_S)}s",
        # By default the model races only the payment timer; MODEL_REVIEW_TIMEOUT and
        # MODEL_AUTO_CONFIRM (e.g. 4s, 6s) let the other two race the commands as well.
        AFTERSALE_REVIEW_TIMEOUT=os.environ.get("MODEL_REVIEW_TIMEOUT", "1h"),
        AUTO_CONFIRM_RECEIPT_AFTER=os.environ.get("MODEL_AUTO_CONFIRM", "1h"),
    ) as system:
        system.start(*CONSUMER_QUEUES)
        listener = EventListener(system.amqp_url).start()
        dsn = system.db.dsn
        poll_conn = psycopg2.connect(dsn)
        poll_conn.autocommit = True
        snap_conn = psycopg2.connect(dsn)
        snap_conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
        )
        publisher = system.publisher()
        _WORLD = World(system, listener, publisher, poll_conn, snap_conn)
        try:
            yield _WORLD
        finally:
            _WORLD = None
            publisher.close()
            poll_conn.close()
            snap_conn.close()
            listener.stop()


# --------------------------------------------------------------------------------------------
# The model


LINES = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=2, unique_by=lambda x: x[0]
)  # (SKU index, quantity)
COUPON = st.none() | st.integers(0, 1)  # index of one of the user's coupons


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def keys(events: list[Event]) -> list[str]:
    return [e.routing_key for e in events]


def of(events: list[Event], routing_key: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e.body
        for e in events
        if e.routing_key == routing_key and all(e.body.get(k) == v for k, v in fields.items())
    ]


def shown(events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
    return [(e.routing_key, e.body) for e in events]


def outcome(events: list[Event]) -> str:
    """What a command led to, in a word or two (hypothesis statistics count them)."""
    said = {
        e.routing_key
        + (f"({e.body.get('code') or e.body['reason']})" if e.routing_key.endswith("rejected") else "")
        for e in events
    }
    return " ".join(sorted(said)) or "nothing"


def now() -> str:
    return datetime.now(UTC).isoformat()


class OrderServiceModel(RuleBasedStateMachine):
    """Commands in any order against the running service; its promises checked after each."""

    orders = Bundle("orders")  # parent order numbers (and virtual orders)
    children = Bundle("children")  # child order numbers, from order.split
    aftersales = Bundle("aftersales")  # after-sale numbers, from aftersale.requested
    refunds = Bundle("refunds")  # refund numbers, from refund.requested

    def __init__(self) -> None:
        super().__init__()
        assert _WORLD is not None, "the module fixture starts the system"
        self.w = _WORLD
        self.log: list[Sent] = []  # every command of this example, in order
        self.applied: list[Sent] = []  # commands answered without a park: may be re-sent as they are
        self.placed: dict[str, PlacedOrder] = {}
        self.parent_of: dict[str, str] = {}  # child -> parent
        self.tracking: dict[str, str] = {}  # child -> tracking number it shipped with
        self.payments: list[Sent] = []  # recorded payment.notify commands (correct signature)
        self.refund_pool: list[str] = []  # every refund number any event named
        self.skus: list[Sku] = []
        self.users: list[str] = []
        self.merchants: list[str] = []
        self.coupons: dict[str, list[str]] = {}
        self.steps = 0

    # -- talking to the service -----------------------------------------------------------------

    def publish(self, routing_key: str, body: dict[str, Any], message_id: str | None = None) -> Sent:
        sent = Sent(routing_key, body, message_id or str(uuid.uuid4()))
        self.log.append(sent)
        self.w.publisher.send(routing_key, body, message_id=sent.message_id)
        return sent

    def events_of(self, message_id: str) -> dict[str, Event]:
        """Events caused by a command, once each (events are delivered at least once)."""
        found: dict[str, Event] = {}
        for e in self.w.events.for_correlation(message_id):
            found.setdefault(e.properties.message_id, e)
        return found

    def answer(self, sent: Sent, timeout: float = ANSWER_TIMEOUT_S) -> list[Event]:
        """Wait until the command is answered; returns the events it caused (all of them)."""
        consumer = CONSUMER_OF.get(sent.routing_key, UNROUTED_QUEUE)
        deadline = time.monotonic() + timeout
        while True:
            # One statement, one snapshot: the dedup row and the outbox rows commit together.
            row = self.w.read(
                "SELECT EXISTS(SELECT 1 FROM processed_messages WHERE consumer = %s AND message_id = %s)"
                " AS done, ARRAY(SELECT message_id FROM outbox WHERE correlation_id = %s AND exchange = %s)"
                " AS events",
                consumer,
                sent.message_id,
                sent.message_id,
                EVENTS_EXCHANGE,
            )[0]
            if row["done"] or row["events"]:
                seen = self.events_of(sent.message_id)
                if set(row["events"]) <= set(seen):
                    answered = list(seen.values())
                    if "command.rejected" not in keys(answered):
                        self.applied.append(sent)
                    self.learn(answered)
                    event(f"{sent.routing_key} -> {outcome(answered)}")
                    return answered
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"I1 nothing lost: {sent.routing_key} {sent.message_id} was not answered within "
                    f"{timeout}s (no event with its correlation id, not parked, not applied)"
                )
            time.sleep(0.03)

    def send(self, routing_key: str, body: dict[str, Any]) -> list[Event]:
        return self.answer(self.publish(routing_key, body))

    def signed(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.w.system.signed(body)

    def learn(self, events: list[Event]) -> None:
        """Numbers the service hands out, read from its events."""
        for e in events:
            if e.routing_key == "order.split" and e.body["order_no"] in self.placed:
                parent = self.placed[e.body["order_no"]]
                for child in e.body["children"]:
                    if child["order_no"] not in self.parent_of:
                        self.parent_of[child["order_no"]] = parent.order_no
                        parent.children.append(child["order_no"])
            elif e.routing_key == "refund.requested" and e.body["refund_no"] not in self.refund_pool:
                self.refund_pool.append(e.body["refund_no"])

    def member(self, parent: str, which: int) -> str:
        """An order of a family: the parent (which=0), or one of its children when it has any."""
        kids = self.placed[parent].children
        return kids[(which - 1) % len(kids)] if which and kids else parent

    def user(self, index: int) -> str:
        return self.users[index % len(self.users)]

    def owner(self, order_no: str) -> str:
        parent = self.parent_of.get(order_no, order_no)
        return self.placed[parent].user_id if parent in self.placed else self.users[0]

    def merchant_for(self, order_no: str, right: bool) -> str:
        """The merchant answerable for an order (right=True), or the other one."""
        rows = self.w.read(
            "SELECT merchant_id FROM order_items WHERE order_no = %s OR child_order_no = %s LIMIT 1",
            order_no,
            order_no,
        )
        merchant = rows[0]["merchant_id"] if rows else self.merchants[0]
        return merchant if right else next(m for m in self.merchants if m != merchant)

    # -- Given: a catalogue, users and coupons of this example ------------------------------------

    @initialize(target=orders)
    def given_a_catalogue_and_a_paid_order(self) -> Any:
        # Given two merchants, three SKUs over two warehouses with little stock, two users
        # with two coupons each
        tag = uuid.uuid4().hex[:6]
        self.merchants = [f"M{i}-{tag}" for i in (1, 2)]
        m1, m2 = self.merchants
        self.skus = [
            Sku(f"tea-{tag}", 1500, m1, "W1", 4),
            Sku(f"pot-{tag}", 4000, m2, "W2", 3),
            Sku(f"cup-{tag}", 700, m1, "W2", 3),
        ]
        self.users = [f"u{i}-{tag}" for i in (1, 2)]
        pending = [
            self.publish(
                "sku.upsert",
                {
                    "sku": s.sku,
                    "name": f"Item {s.sku}",
                    "unit_price": s.price,
                    "merchant_id": s.merchant_id,
                    "warehouse_id": s.warehouse_id,
                },
            )
            for s in self.skus
        ]
        for user in self.users:
            self.coupons[user] = []
            for amount in (300, 600):
                code = f"c{amount}-{user}"
                self.coupons[user].append(code)
                pending.append(
                    self.publish(
                        "coupon.grant",
                        {
                            "code": code,
                            "user_id": user,
                            "amount": amount,
                            "min_spend": 0,
                            "expires_at": "2099-01-01T00:00:00Z",
                        },
                    )
                )
        for sent in pending:
            assert "command.rejected" not in keys(self.answer(sent)), sent
        restocks = [
            self.publish("stock.restock", {"sku": s.sku, "warehouse_id": s.warehouse_id, "quantity": s.stock})
            for s in self.skus
        ]
        for sent in restocks:
            assert keys(self.answer(sent)) == ["stock.restocked"], sent
        # And an order of both merchants, paid (two children), so every example starts deep enough
        order_no = self.place(0, [(0, 1), (1, 1)], virtual=False, coupon=None)
        assert order_no is not None
        assert len(self.notify(order_no, "exact")) == 2
        return order_no

    # -- When: orders are placed --------------------------------------------------------------------

    def place(self, user: int, lines: list[tuple[int, int]], virtual: bool, coupon: int | None) -> str | None:
        """Place an order; its number, or None when it was refused."""
        user_id = self.user(user)
        items = [{"sku": self.skus[i].sku, "quantity": q} for i, q in lines]
        body: dict[str, Any] = {
            "request_id": unique("req"),
            "user_id": user_id,
            "order_type": "virtual" if virtual else "physical",
            "items": items,
        }
        if not virtual:
            body["receiver"] = RECEIVER
        if coupon is not None:
            body["coupon_code"] = self.coupons[user_id][coupon]
        available = {
            r["sku"]: r["available"]
            for r in self.w.read(
                "SELECT sku, available FROM stock WHERE sku = ANY(%s)", [i["sku"] for i in items]
            )
        }
        # When the user places it
        sent = self.publish("order.place", body)
        answered = self.answer(sent)
        created = of(answered, "order.created")
        # Then it is created with its stock locked, or refused with a reason
        if not created:
            (rejected,) = of(answered, "order.rejected") or [None]
            assert rejected is not None, f"order.place answered with {shown(answered)}"
            if rejected["reason"] == "OUT_OF_STOCK":
                # Stock only grows while a command is in flight (timers release, nothing else locks)
                assert any(i["quantity"] > available.get(i["sku"], 0) for i in items), (
                    f"OUT_OF_STOCK although every line was available: {available} {items}"
                )
            return None
        assert len(created) == 1 and "stock.locked" in keys(answered), shown(answered)
        order = created[0]
        goods = sum(self.skus[i].price * q for i, q in lines)
        assert order["goods_total"] == goods, order
        assert order["payable"] == order["goods_total"] + order["freight"] - order["discount_total"], order
        assert order["payable"] > 0, order
        self.placed[order["order_no"]] = PlacedOrder(
            order["order_no"],
            user_id,
            body["order_type"],
            order["payable"],
            sent,
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
        # (the common path in one step, so that short examples reach shipping and after-sales)
        order_no = self.place(user, lines, virtual, coupon)
        if order_no is None:
            return multiple()
        self.notify(order_no, "exact")
        return order_no

    @rule(order=orders)
    def place_the_same_request_again(self, order: str) -> None:
        # When the same order.place arrives again under a new message id
        placed = self.placed[order]
        answered = self.send("order.place", placed.place.body)
        # Then it makes no second order and locks nothing
        other = [c for c in of(answered, "order.created") if c["order_no"] != order]
        assert not other and "stock.locked" not in keys(answered), (
            f"one request_id made two orders: {shown(answered)}"
        )

    # -- When: payments arrive ----------------------------------------------------------------------

    @rule(
        target=children,
        order=orders,
        how=st.sampled_from(["exact", "exact", "exact", "wrong_amount", "bad_signature"]),
    )
    def pay(self, order: str, how: str) -> Any:
        return multiple(*self.notify(order, how))

    def notify(self, order: str, how: str) -> list[str]:
        """Send a payment of the order; returns the children its split made."""
        placed = self.placed[order]
        amount = placed.payable + (100 if how == "wrong_amount" else 0)
        body = self.signed(
            {
                "order_no": order,
                "payment_no": unique("pay"),
                "method": "card",
                "amount": amount,
                "paid_at": now(),
            }
        )
        if how == "bad_signature":
            body["signature"] = "0" * 64
        before = self.w.read("SELECT status FROM orders WHERE order_no = %s", order)[0]["status"]
        # When the provider notifies a payment
        answered = self.send("payment.notify", body)
        rejected = of(answered, "payment.rejected")
        refunds = of(answered, "refund.requested")
        if how == "bad_signature":
            # Then a forged notification is refused and changes nothing
            assert keys(answered) == ["payment.rejected"] and rejected[0]["reason"] == "BAD_SIGNATURE", shown(
                answered
            )
            return []
        self.payments.append(Sent("payment.notify", body, ""))
        if how == "wrong_amount":
            # Then it is refused for its amount, and the money taken goes back (contract v1.1)
            assert [r["reason"] for r in rejected] == ["AMOUNT_MISMATCH"], shown(answered)
            assert [(r["reason"], r["amount"]) for r in refunds] == [("PAYMENT_REJECTED", amount)], (
                f"I4: a signed payment of the wrong amount was kept, not refunded: {shown(answered)}"
            )
            return []
        # Then it pays the order (if the timer did not cancel it first), or it is refunded
        paid = of(answered, "order.paid", order_no=order)
        if before != "PENDING_PAYMENT":
            assert not paid, f"a {before} order was paid again: {shown(answered)}"
        if paid:
            assert "stock.deducted" in keys(answered), shown(answered)
            if placed.order_type == "virtual":
                assert of(answered, "order.completed", order_no=order), shown(answered)
            else:
                (split,) = of(answered, "order.split", order_no=order)
                assert sum(c["payable"] for c in split["children"]) == placed.payable, split
                return [c["order_no"] for c in split["children"]]
            return []
        assert [(r["reason"], r["amount"]) for r in refunds] == [("LATE_PAYMENT", amount)], (
            f"I4: a payment of the right amount was neither applied nor refunded: {shown(answered)}"
        )
        return []

    @precondition(lambda self: self.payments)
    @rule(pick=st.integers(0, 1000))
    def notify_the_same_payment_again(self, pick: int) -> None:
        # When the provider notifies a payment it already notified (same payment_no, new message id)
        first = self.payments[pick % len(self.payments)]
        answered = self.send("payment.notify", first.body)
        # Then nothing changes
        assert not STATE_CHANGES & set(keys(answered)), f"the same payment_no twice: {shown(answered)}"

    def pay_an_unknown_order(self) -> None:
        # When a payment names no order
        body = self.signed(
            {
                "order_no": unique("O-none"),
                "payment_no": unique("pay"),
                "method": "card",
                "amount": 100,
                "paid_at": now(),
            }
        )
        answered = self.send("payment.notify", body)
        # Then it is refused
        assert [r["reason"] for r in of(answered, "payment.rejected")] == ["UNKNOWN_ORDER"], shown(answered)

    # -- When: the user cancels ---------------------------------------------------------------------

    @rule(target=refunds, parent=orders, which=st.sampled_from([0, 0, 0, 1]), user=st.integers(0, 2))
    def cancel(self, parent: str, which: int, user: int) -> Any:
        order = self.member(parent, which)
        user_id = self.owner(order) if user == 2 else self.user(user)
        shipped = self.w.read(
            "SELECT order_no FROM orders WHERE parent_no = %s AND shipped_at IS NOT NULL", order
        )
        # When a user cancels an order
        answered = self.send(
            "order.cancel", {"order_no": order, "user_id": user_id, "reason": "changed my mind"}
        )
        refunds = of(answered, "refund.requested")
        # Then, once a child has shipped, the owner is refused ALREADY_SHIPPED (contract v1.1)
        if shipped and user_id == self.owner(order) and order in self.placed:
            rejected = of(answered, "order.rejected")
            assert not refunds and [r["reason"] for r in rejected] == ["ALREADY_SHIPPED"], (
                f"cancel after {shipped[0]['order_no']} shipped: {shown(answered)}"
            )
        if user_id != self.owner(order):
            assert not refunds and not of(answered, "order.cancelled"), (
                f"a stranger cancelled: {shown(answered)}"
            )
        return multiple(*(r["refund_no"] for r in refunds))

    # -- When: the merchant ships, the carrier tracks, the user confirms ---------------------------

    @rule(parent=orders, which=st.integers(0, 3))
    def ship(self, parent: str, which: int) -> None:
        order = self.member(parent, which)
        tracking_no = unique("SF")
        answered = self.send("order.ship", {"order_no": order, "carrier": "SF", "tracking_no": tracking_no})
        if of(answered, "order.shipped", order_no=order):
            self.tracking[order] = tracking_no
            assert order in self.parent_of, f"a parent order shipped by itself: {shown(answered)}"

    @rule(order=children, status=st.sampled_from(["PICKED_UP", "IN_TRANSIT", "DELIVERED"]))
    def logistics_update(self, order: str, status: str) -> None:
        self.send(
            "logistics.update",
            {
                "order_no": order,
                "tracking_no": self.tracking.get(order, "SF-unknown"),
                "status": status,
                "at": now(),
                "detail": "",
            },
        )

    @rule(order=children, user=st.integers(0, 2))
    def confirm_receipt(self, order: str, user: int) -> None:
        user_id = self.owner(order) if user == 2 else self.user(user)
        answered = self.send("order.confirm-receipt", {"order_no": order, "user_id": user_id})
        if user_id != self.owner(order):
            assert not of(answered, "order.completed"), f"a stranger confirmed: {shown(answered)}"

    @rule(order=orders, user=st.integers(0, 2))
    def update_address(self, order: str, user: int) -> None:
        user_id = self.owner(order) if user == 2 else self.user(user)
        receiver = {**RECEIVER, "address": unique("street")}
        self.send("order.update-address", {"order_no": order, "user_id": user_id, "receiver": receiver})

    @rule(parent=orders, which=st.integers(0, 3), author=st.sampled_from(["buyer", "stranger", "ops"]))
    def remark(self, parent: str, which: int, author: str) -> None:
        order = self.member(parent, which)
        owner = self.owner(order)
        stranger = next(u for u in [*self.users, "nobody"] if u != owner)
        by = {"buyer": f"user:{owner}", "stranger": f"user:{stranger}", "ops": "ops:alice"}[author]
        text = unique("note")
        answered = self.send("order.remark", {"order_no": order, "author": by, "text": text})
        kept = of(answered, "order.remarked", order_no=order)
        if author == "stranger":
            assert not kept, f"a stranger's remark was kept: {shown(answered)}"
        else:
            assert kept == [{"order_no": order, "author": by, "text": text}], shown(answered)

    # -- When: after-sales --------------------------------------------------------------------------

    def refundable(self, order_no: str) -> int | None:
        """What may still be refunded on an order (a child, or a virtual order), by the contract:
        its share, and the payment, less refunds not failed and claims not yet behind a refund.
        None when the order has not been paid."""
        root = self.parent_of.get(order_no, order_no)
        with self.w.snapshot() as q:
            target = q("SELECT paid_amount FROM orders WHERE order_no = %s", order_no)
            payment = q(
                "SELECT coalesce(sum(amount), 0)::bigint AS amount FROM payments "
                "WHERE order_no = %s AND outcome = 'APPLIED'",
                root,
            )[0]["amount"]
            refunds = q(
                "SELECT order_no, amount FROM refunds WHERE (order_no = %s OR order_no LIKE %s) "
                "AND status <> 'FAILED' AND source <> ALL(%s)",
                root,
                f"{root}-%",
                list(FOREIGN_REFUNDS),
            )
            claims = q(
                "SELECT order_no, amount FROM aftersales WHERE (order_no = %s OR order_no LIKE %s) "
                "AND status IN ('PENDING_REVIEW', 'AWAITING_RETURN')",
                root,
                f"{root}-%",
            )
        if not target or not payment:
            return None
        spent = refunds + claims
        own = target[0]["paid_amount"] - sum(r["amount"] for r in spent if r["order_no"] == order_no)
        return int(min(own, payment - sum(r["amount"] for r in spent)))

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
        paid = int(self.w.read("SELECT paid_amount FROM orders WHERE order_no = %s", order)[0]["paid_amount"])
        amount = {"one": 1, "quarter": paid // 4, "half": paid // 2, "all": paid, "more": paid + 1}[share]
        amount = max(amount, 1)
        left = self.refundable(order)
        # When the user asks for money back
        answered = self.send(
            "aftersale.request",
            {"order_no": order, "user_id": user_id, "kind": kind, "amount": amount, "reason": "broken"},
        )
        requested = of(answered, "aftersale.requested")
        refused = [r["reason"] for r in of(answered, "order.rejected")]
        # Then no more than what remains refundable is promised, and what remains is not refused (I5)
        if requested and left is not None:
            assert amount <= left, (
                f"I5: an after-sale of {amount} accepted with only {left} left to refund: {shown(answered)}"
            )
        if refused == ["AMOUNT_EXCEEDS_REFUNDABLE"] and left is not None:
            assert amount > left, (
                f"I5: an after-sale of {amount} refused with {left} left (a failed refund gives its "
                f"amount back): {shown(answered)}"
            )
        return multiple(*(r["aftersale_no"] for r in requested))

    def aftersale_order(self, aftersale: str) -> str:
        return str(
            self.w.read("SELECT order_no FROM aftersales WHERE aftersale_no = %s", aftersale)[0]["order_no"]
        )

    @rule(target=refunds, aftersale=aftersales, right=st.booleans())
    def approve_aftersale(self, aftersale: str, right: bool) -> Any:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answered = self.send("aftersale.approve", {"aftersale_no": aftersale, "merchant_id": merchant})
        if not right:
            assert not of(answered, "aftersale.approved"), f"a stranger approved: {shown(answered)}"
        return multiple(*(r["refund_no"] for r in of(answered, "refund.requested")))

    @rule(aftersale=aftersales, right=st.booleans())
    def reject_aftersale(self, aftersale: str, right: bool) -> None:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answered = self.send(
            "aftersale.reject", {"aftersale_no": aftersale, "merchant_id": merchant, "reason": "used"}
        )
        if not right:
            assert not of(answered, "aftersale.rejected"), f"a stranger rejected: {shown(answered)}"

    @rule(target=refunds, aftersale=aftersales, right=st.booleans())
    def receive_return(self, aftersale: str, right: bool) -> Any:
        merchant = self.merchant_for(self.aftersale_order(aftersale), right)
        answered = self.send(
            "aftersale.return-received", {"aftersale_no": aftersale, "merchant_id": merchant}
        )
        return multiple(*(r["refund_no"] for r in of(answered, "refund.requested")))

    @rule(target=refunds, parent=orders, which=st.integers(0, 3), right=st.booleans())
    def merchant_cancel(self, parent: str, which: int, right: bool) -> Any:
        order = self.member(parent, which)
        merchant = self.merchant_for(order, right)
        answered = self.send(
            "merchant.cancel", {"order_no": order, "merchant_id": merchant, "reason": "no stock"}
        )
        if not right:
            assert not of(answered, "refund.requested"), f"a stranger cancelled: {shown(answered)}"
        return multiple(*(r["refund_no"] for r in of(answered, "refund.requested")))

    # -- When: the refund provider reports ----------------------------------------------------------

    def report_refund(self, refund_no: str, status: str) -> None:
        body = self.signed({"refund_no": refund_no, "status": status, "provider_refund_no": unique("prv")})
        if status == "FORGED":
            body = {**body, "status": "SUCCEEDED"}  # signed for another status
        answered = self.send("refund.result", body)
        if status == "FORGED":
            # Then a result that does not match its signature is parked, and changes nothing
            assert "command.rejected" in keys(answered) and not STATE_CHANGES & set(keys(answered)), shown(
                answered
            )
        else:
            assert "command.rejected" not in keys(answered), (
                f"a known refund's result parked: {shown(answered)}"
            )

    @rule(refund=refunds, status=st.sampled_from(["SUCCEEDED", "SUCCEEDED", "FAILED", "FORGED"]))
    def refund_result(self, refund: str, status: str) -> None:
        self.report_refund(refund, status)

    @precondition(lambda self: self.refund_pool)
    @rule(pick=st.integers(0, 1000), status=st.sampled_from(["SUCCEEDED", "FAILED"]))
    def refund_result_of_any_refund(self, pick: int, status: str) -> None:
        # (late payments and refused payments are refunded too: their numbers are in the pool;
        # refunds still waiting for their result come first)
        waiting = [
            r["refund_no"]
            for r in self.w.read(
                "SELECT refund_no FROM refunds WHERE refund_no = ANY(%s) AND status = 'REQUESTED' "
                "ORDER BY refund_no",
                self.refund_pool,
            )
        ]
        pool = waiting or self.refund_pool
        self.report_refund(pool[pick % len(pool)], status)

    # -- When: time passes, messages repeat, producers misbehave ------------------------------------

    def something_unpaid(self) -> bool:
        return bool(self.placed) and bool(
            self.w.read(
                "SELECT 1 FROM orders WHERE order_no = ANY(%s) AND status = 'PENDING_PAYMENT' LIMIT 1",
                list(self.placed),
            )
        )

    @precondition(something_unpaid)
    @rule(seconds=st.sampled_from([0.5, 1.5, PAYMENT_TIMEOUT_S + 0.5]))
    def wait(self, seconds: float) -> None:
        # When time passes while an order is unpaid (its payment timer may run out)
        time.sleep(seconds)

    @precondition(lambda self: self.applied)
    @rule(pick=st.integers(0, 1000))
    def redeliver(self, pick: int) -> None:
        # When a command already applied is delivered again (same message_id)
        sent = self.applied[pick % len(self.applied)]
        before = {r["message_id"] for r in self.outbox_of(sent.message_id)}
        self.log.append(sent)
        self.w.publisher.send(sent.routing_key, sent.body, message_id=sent.message_id)
        time.sleep(DUPLICATE_GRACE_S)
        self.wait_drained()
        # Then it causes nothing new (I2); only the payment timer of a placed order may speak later
        new = [
            (r["routing_key"], r["body"])
            for r in self.outbox_of(sent.message_id)
            if r["message_id"] not in before
            and not (
                sent.routing_key == "order.place"
                and (
                    (r["routing_key"] == "order.cancelled" and r["body"].get("reason") == "PAYMENT_TIMEOUT")
                    or r["routing_key"] == "stock.released"
                )
            )
        ]
        assert not new, f"I2 nothing twice: {sent.routing_key} {sent.message_id} again caused {new}"

    def outbox_of(self, message_id: str) -> list[dict[str, Any]]:
        return self.w.read(
            "SELECT message_id, routing_key, body FROM outbox WHERE correlation_id = %s AND exchange = %s",
            message_id,
            EVENTS_EXCHANGE,
        )

    @rule(
        where=st.sampled_from(
            [
                "order.cancel reason",
                "order.place address",
                "aftersale.request reason",
                "logistics.update detail",
                "unknown routing key",
                "payment for no order",
            ]
        )
    )
    def misbehave(self, where: str) -> None:
        """A producer sends what the contract does not allow, or what names nothing."""
        if where == "unknown routing key":
            return self.send_an_unknown_command()
        if where == "payment for no order":
            return self.pay_an_unknown_order()
        return self.send_a_control_character(where)

    def send_a_control_character(self, where: str) -> None:
        # When a command carries NUL in a free-text field (the contract allows no control character
        # but tab, line feed and carriage return)
        bad = "a\u0000b"
        order = next(iter(self.placed), unique("O-none"))
        bodies: dict[str, tuple[str, dict[str, Any]]] = {
            "order.cancel reason": (
                "order.cancel",
                {"order_no": order, "user_id": self.users[0], "reason": bad},
            ),
            "order.place address": (
                "order.place",
                {
                    "request_id": unique("req"),
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
                    "at": now(),
                    "detail": bad,
                },
            ),
        }
        routing_key, body = bodies[where]
        answered = self.send(routing_key, body)
        # Then it is invalid: parked and answered with command.rejected
        assert keys(answered) == ["command.rejected"], f"NUL in {where} was not parked: {shown(answered)}"

    def send_an_unknown_command(self) -> None:
        # When a command's routing key is one the service does not know
        answered = self.send("order.teleport", {"order_no": unique("O-none")})
        # Then it is parked, not lost
        assert keys(answered) == ["command.rejected"], shown(answered)

    # -- Then: the promises, after every step -------------------------------------------------------

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        conn = pika.BlockingConnection(pika.URLParameters(self.w.system.amqp_url))
        try:
            ch = conn.channel()
            while True:
                depth = {q: ch.queue_declare(q, passive=True).method.message_count for q in CONSUMER_QUEUES}
                stuck = {q: n for q, n in depth.items() if n}
                if not stuck:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"I1 nothing lost: messages stuck in {stuck} for {timeout}s")
                time.sleep(0.1)
        finally:
            conn.close()

    @invariant()
    def i1_no_consumer_queue_is_stuck(self) -> None:
        self.steps += 1
        self.wait_drained()

    @invariant()
    def i2_nothing_twice(self) -> None:
        family: dict[str, str] = {o: o for o in self.placed} | self.parent_of
        created: dict[str, set[str]] = defaultdict(set)
        paid: dict[str, set[str]] = defaultdict(set)
        moved: dict[tuple[str, str, str, str], int] = defaultdict(int)
        seen: set[str] = set()
        with self.w.events._cond:
            events = list(self.w.events.events)
        for e in events:
            order_no = e.body.get("order_no")
            if order_no not in family or e.properties.message_id in seen:
                continue
            seen.add(e.properties.message_id)
            if e.routing_key == "order.created":
                created[order_no].add(e.properties.message_id)
            elif e.routing_key == "order.paid":
                paid[order_no].add(e.properties.message_id)
            elif e.routing_key.startswith("stock."):
                for item in e.body["items"]:
                    moved[(e.routing_key, family[order_no], item["sku"], item["warehouse_id"])] += item[
                        "quantity"
                    ]
        assert all(len(v) <= 1 for v in created.values()), f"I2: two order.created: {dict(created)}"
        assert all(len(v) <= 1 for v in paid.values()), f"I2: two order.paid: {dict(paid)}"
        for (kind, parent, sku, warehouse), quantity in moved.items():
            ordered = self.placed[parent].lines.get((sku, warehouse), 0)
            assert quantity <= ordered, (
                f"I2: {kind} moved {quantity} of {sku}/{warehouse} for {parent}, which ordered {ordered}"
            )

    @invariant()
    def i3_stock_adds_up(self) -> None:
        skus = [s.sku for s in self.skus]
        with self.w.snapshot() as q:
            rows = q("SELECT * FROM stock WHERE sku = ANY(%s)", skus)
            ledger = q(
                "SELECT sku, warehouse_id, state, sum(quantity)::bigint AS quantity FROM stock_locks "
                "WHERE sku = ANY(%s) GROUP BY sku, warehouse_id, state",
                skus,
            )
            shipped = q(
                "SELECT o.order_no, l.sku, l.state FROM orders o "
                "JOIN stock_locks l ON l.child_order_no = o.order_no "
                "WHERE l.sku = ANY(%s) AND o.shipped_at IS NOT NULL AND l.state <> 'DEDUCTED'",
                skus,
            )
        by_state = {(r["sku"], r["warehouse_id"], r["state"]): r["quantity"] for r in ledger}
        for r in rows:
            counts = {k: r[k] for k in ("available", "locked", "sold", "restocked_total")}
            assert r["available"] + r["locked"] + r["sold"] == r["restocked_total"], (
                f"I3: {r['sku']}/{r['warehouse_id']} does not add up: {counts}"
            )
            assert min(r["available"], r["locked"], r["sold"]) >= 0, f"I3: negative stock {counts}"
            where = (r["sku"], r["warehouse_id"])
            assert r["locked"] == by_state.get((*where, "LOCKED"), 0), (
                f"I3: {where} locked {r['locked']}, ledger LOCKED {by_state.get((*where, 'LOCKED'), 0)}"
            )
            assert r["sold"] == by_state.get((*where, "DEDUCTED"), 0), (
                f"I3: {where} sold {r['sold']}, ledger DEDUCTED {by_state.get((*where, 'DEDUCTED'), 0)}"
            )
        assert not shipped, f"I3: units of a shipped child are no longer sold: {shipped}"

    def family_rows(self, q: Callable[..., list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], ...]:
        users = self.users
        orders = q(
            "SELECT order_no, parent_no, status, paid_amount, refunded_amount, shipped_at FROM orders "
            "WHERE user_id = ANY(%s)",
            users,
        )
        numbers = [o["order_no"] for o in orders]
        payments = q("SELECT * FROM payments WHERE order_no = ANY(%s)", numbers)
        refunds = q("SELECT * FROM refunds WHERE order_no = ANY(%s)", numbers)
        return orders, payments, refunds

    @invariant()
    def i4_every_payment_is_applied_or_refunded(self) -> None:
        with self.w.snapshot() as q:
            orders, payments, refunds = self.family_rows(q)
        status = {o["order_no"]: o["status"] for o in orders}
        for p in payments:
            if p["outcome"] == "APPLIED":
                assert status[p["order_no"]] != "CANCELLED", f"I4: a cancelled order kept payment {p}"
                continue
            back = [r for r in refunds if r["source_ref"] == p["payment_no"] and r["amount"] == p["amount"]]
            assert back, (
                f"I4: payment {p['payment_no']} of {p['amount']} ({p['outcome']}) on {p['order_no']} "
                f"({status.get(p['order_no'])}) was kept, not refunded"
            )

    @invariant()
    def i5_refunds_never_exceed_the_payment(self) -> None:
        with self.w.snapshot() as q:
            orders, payments, refunds = self.family_rows(q)
        applied = {p["order_no"]: p for p in payments if p["outcome"] == "APPLIED"}
        root = {o["order_no"]: o["parent_no"] or o["order_no"] for o in orders}
        owed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in refunds:
            if r["source"] not in FOREIGN_REFUNDS and r["status"] != "FAILED":
                owed[root[r["order_no"]]].append(r)
        for parent, taken in owed.items():
            payment = applied.get(parent)
            total = sum(r["amount"] for r in taken)
            listed = [(r["refund_no"], r["order_no"], r["source"], r["amount"], r["status"]) for r in taken]
            assert payment is not None, f"I5: refunds of {parent}, which took no payment: {listed}"
            assert total <= payment["amount"], (
                f"I5: refunds of {total} against payment {payment['payment_no']} of {payment['amount']} "
                f"on {parent}: {listed}"
            )

    @invariant()
    def sample_order_as_the_cli_shows_it(self) -> None:
        if self.steps % CLI_EVERY or not self.placed:
            return
        order_no = list(self.placed)[(self.steps // CLI_EVERY) % len(self.placed)]
        sku = self.skus[(self.steps // CLI_EVERY) % len(self.skus)].sku
        for attempt in (1, 2):  # a timer may commit between the CLI and the database read
            view = json.loads(self.w.system.orders("show", order_no, "--json").stdout)
            stock = json.loads(self.w.system.orders("stock", sku, "--json").stdout)
            with self.w.snapshot() as q:
                rows = q(
                    "SELECT order_no, status, paid_amount, refunded_amount FROM orders "
                    "WHERE order_no = %s OR parent_no = %s ORDER BY order_no",
                    order_no,
                    order_no,
                )
                counts = q(
                    "SELECT sum(available)::bigint AS available, sum(locked)::bigint AS locked, "
                    "sum(sold)::bigint AS sold, sum(restocked_total)::bigint AS restocked_total "
                    "FROM stock WHERE sku = %s",
                    sku,
                )[0]
            fields = ("order_no", "status", "paid_amount", "refunded_amount")
            cli = [{k: o[k] for k in fields} for o in [view, *view["children"]]]
            cli_stock = {k: stock[k] for k in ("available", "locked", "sold", "restocked_total")}
            if cli == rows and cli_stock == counts:
                break
            assert attempt == 1, (
                f"orders show/stock --json disagree with the database: {cli} {rows} {cli_stock} {counts}"
            )
        assert (
            cli_stock["available"] + cli_stock["locked"] + cli_stock["sold"] == cli_stock["restocked_total"]
        )

    # -- After each example -------------------------------------------------------------------------

    def teardown(self) -> None:
        note(
            "Commands of this example, re-sendable with `orders send ROUTING_KEY 'BODY' --message-id ID`:\n"
            + json.dumps([s.replayable() for s in self.log], indent=1, ensure_ascii=True)
        )
        heal(self.w)


def heal(w: World) -> None:
    """Leave the service usable for the next example: a consumer that died is restarted and a
    queue that stays stuck is emptied (the failure was reported already), so one example's
    damage does not fail, and so mis-shrink, the next ones."""
    system = w.system
    dead = [q for q, p in system.processes.items() if p.poll() is not None]
    conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        ch = conn.channel()
        stuck = [q for q in CONSUMER_QUEUES if ch.queue_declare(q, passive=True).method.message_count]
    finally:
        conn.close()
    broken = sorted(set(dead) | set(stuck))
    if not broken:
        return
    time.sleep(DRAIN_TIMEOUT_S)  # maybe only slow: look again before touching anything
    conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        ch = conn.channel()
        broken = [
            q
            for q in broken
            if system.processes[q].poll() is not None
            or ch.queue_declare(q, passive=True).method.message_count
        ]
        if broken:
            system.stop(*broken)
            for q in broken:
                ch.queue_purge(q)
    finally:
        conn.close()
    if broken:
        system.start(*broken)


OrderServiceModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,  # write nothing into the repository (.hypothesis/)
    suppress_health_check=list(HealthCheck),
)
TestOrderServiceModel = OrderServiceModel.TestCase
