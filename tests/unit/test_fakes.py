"""The fakes' core (testing/fakes/db.py, uow.py): tables with PostgreSQL's defaults and keys,
snapshot and restore, the virtual clock, and what a fake unit of work writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from consumers.outcomes import Applied, Duplicate, Park
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import Command, TimerFired
from domain.errors import ParkCommand, Reason, Refusal
from domain.names import Evt
from settings import Settings
from store import tables as t
from store.ports import UnitOfWork
from testing.fakes.db import EPOCH, TABLES, DuplicateKey, FakeDatabase, NotNullViolation, Record, VirtualClock
from testing.fakes.service import HandlerFailed, InProcessService
from testing.fakes.uow import FakeUnitOfWork, new_envelope

SKU = {"sku": "tea", "name": "Tea", "unit_price": 1500, "merchant_id": "M1", "warehouse_id": "W1"}
ORDER = {
    "order_no": "O1",
    "user_id": "u1",
    "request_id": "r1",
    "order_type": "physical",
    "status": "PENDING_PAYMENT",
    "goods_total": 1500,
    "freight": 0,
    "discount_total": 0,
    "payable": 1500,
}


def test_every_table_of_the_schema_has_a_fake_table() -> None:
    assert set(TABLES) == set(t.metadata.tables)
    db = FakeDatabase()
    for name in TABLES:
        assert db.rows(name) == []


def test_server_defaults_are_filled_in() -> None:
    clock = VirtualClock(datetime(2026, 3, 1, 12, tzinfo=UTC))
    db = FakeDatabase(clock)
    sku = db.insert("skus", SKU)
    assert sku.sales_count == 0 and sku.updated_at == clock.now()
    stock = db.insert("stock", {"sku": "tea", "warehouse_id": "W1"})
    assert (stock.available, stock.locked, stock.sold, stock.restocked_total) == (0, 0, 0, 0)
    order = db.insert("orders", ORDER)
    assert (order.paid_amount, order.refunded_amount, order.version) == (0, 0, 1)
    assert order.placed_at == clock.now() and order.shipped_at is None and order.parent_no is None
    coupon = db.insert(
        "coupons", {"code": "c", "user_id": "u1", "amount": 3, "min_spend": 0, "expires_at": clock.now()}
    )
    assert coupon.state == "AVAILABLE"
    refund = db.insert(
        "refunds",
        {
            "refund_no": "R1",
            "order_no": "O1",
            "source": "USER_CANCEL",
            "source_ref": "p",
            "amount": 1,
            "status": "X",
        },
    )
    assert refund.attempts == 1


def test_autoincrement_ids_count_up_per_table() -> None:
    db = FakeDatabase()
    line = {"order_no": "O1", "actor": "user:u1", "action": "PLACE"}
    ids = [db.insert("order_timeline", line).id for _ in range(3)]
    assert ids == [1, 2, 3]
    assert db.timeline("O1")[-1].id == 3


def test_keys_and_not_null_hold_as_in_postgresql() -> None:
    db = FakeDatabase()
    db.insert("orders", ORDER)
    with pytest.raises(DuplicateKey):
        db.insert("orders", {**ORDER, "request_id": "r2"})  # primary key
    with pytest.raises(IntegrityError):
        db.insert("orders", {**ORDER, "order_no": "O2"})  # same user and request: uq_orders_user_request
    # The unique index covers parents only: a child may repeat its parent's request id.
    db.insert("orders", {**ORDER, "order_no": "O1-01", "parent_no": "O1"})
    refund = {"order_no": "O1", "source": "USER_CANCEL", "source_ref": "p", "amount": 1, "status": "X"}
    db.insert("refunds", {**refund, "refund_no": "R1"})
    with pytest.raises(DuplicateKey):
        db.insert("refunds", {**refund, "refund_no": "R2"})  # uq_refunds_source
    assert db.insert_new("refunds", {**refund, "refund_no": "R3"}) is None
    with pytest.raises(NotNullViolation):
        db.insert("skus", {"sku": "x"})
    with pytest.raises(KeyError):
        db.insert("skus", {**SKU, "colour": "green"})


def test_reads_are_copies_and_update_writes_by_primary_key() -> None:
    db = FakeDatabase()
    db.insert("stock", {"sku": "tea", "warehouse_id": "W1"})
    db.insert("stock", {"sku": "tea", "warehouse_id": "W2"})
    row = db.one("stock", sku="tea", warehouse_id="W2")
    assert row is not None
    after = db.update(row, available=5, restocked_total=5)
    assert row.available == 0, "a record read before an update keeps what it read, as a Row"
    assert after.available == 5
    assert [r.available for r in db.rows("stock", sku="tea")] == [0, 5]  # insertion order
    row.available = 99  # changes the copy only
    assert db.one("stock", warehouse_id="W2").available == 5  # type: ignore[union-attr]
    assert db.rows("stock", where=lambda r: r.available > 0) == [after]
    assert db.update_where("stock", {"locked": 1}, sku="tea")[0].locked == 1
    assert db.count("stock", locked=1) == 2
    with pytest.raises(KeyError):
        db.rows("stock", colour="green")


def test_delete_by_record_or_by_condition() -> None:
    db = FakeDatabase()
    for wh in ("W1", "W2", "W3"):
        db.insert("stock", {"sku": "tea", "warehouse_id": wh})
    assert db.delete(db.rows("stock")[0]) == 1
    assert db.delete("stock", warehouse_id="W3") == 1
    assert [r.warehouse_id for r in db.rows("stock")] == ["W2"]


def test_restore_takes_back_rows_events_timers_and_counters() -> None:
    db = FakeDatabase()
    db.insert("orders", ORDER)
    db.events.append(("order.created", {"order_no": "O1"}))
    snap = db.snapshot()
    order = db.one("orders", order_no="O1")
    assert order is not None
    db.update(order, status="PAID", receiver={"name": "a"})
    db.insert("order_timeline", {"order_no": "O1", "actor": "a", "action": "PAY"})
    db.events.append(("order.paid", {"order_no": "O1"}))
    db.timers.append({"kind": "auto-confirm", "ref": "O1", "due_at": EPOCH, "extra": {}})
    first = db.next_value()
    db.restore(snap)
    assert db.one("orders", order_no="O1") == order
    assert db.timeline("O1") == [] and db.timers == []
    assert db.events == [("order.created", {"order_no": "O1"})]
    assert db.next_value() == first
    assert db.insert("order_timeline", {"order_no": "O1", "actor": "a", "action": "X"}).id == 1
    # The snapshot stays as it was: it can be restored again.
    db.restore(snap)
    assert db.timeline("O1") == []


def test_json_columns_are_not_shared_with_the_caller() -> None:
    db = FakeDatabase()
    receiver = {"name": "Li"}
    db.insert("orders", {**ORDER, "receiver": receiver})
    receiver["name"] = "changed"
    row = db.one("orders")
    assert row is not None and row.receiver == {"name": "Li"}
    row.receiver["name"] = "changed too"
    assert db.one("orders").receiver == {"name": "Li"}  # type: ignore[union-attr]


def test_record_reads_like_a_row() -> None:
    r = Record(sku="tea", quantity=2)
    assert (r.sku, r["quantity"], r._mapping, r._asdict()) == (
        "tea",
        2,
        {"sku": "tea", "quantity": 2},
        r._mapping,
    )
    assert r == Record(sku="tea", quantity=2) and r != Record("stock", sku="tea", quantity=2)
    with pytest.raises(AttributeError):
        r.colour  # noqa: B018
    with pytest.raises(AttributeError):
        r.colour = "green"


def test_virtual_clock_moves_only_when_told() -> None:
    clock = VirtualClock()
    assert clock.now() == EPOCH == clock()
    assert clock.advance(timedelta(minutes=15)) == EPOCH + timedelta(minutes=15)
    assert clock.now() == EPOCH + timedelta(minutes=15)
    later = datetime(2027, 1, 1, tzinfo=UTC)
    assert clock.set(later) == later == clock.now()
    with pytest.raises(ValueError):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError):
        clock.set(datetime(2027, 1, 1))


def test_fake_unit_of_work_writes_events_timers_timeline_and_dedup_rows() -> None:
    clock = VirtualClock()
    db = FakeDatabase(clock)
    envelope = new_envelope("order.place", {"request_id": "r1"}, "order.placement", message_id="m1")
    assert envelope.correlation_id == "m1"
    uow = FakeUnitOfWork(db, envelope, clock)
    clock.advance(timedelta(seconds=5))
    assert uow.now == EPOCH, "now is the clock's time when the unit of work began"
    assert uow.claim() is True
    assert FakeUnitOfWork(db, envelope, clock).claim() is False
    other = new_envelope("order.place", {}, "order.payment", message_id="m1")
    assert FakeUnitOfWork(db, other, clock).claim() is True, "dedup is per consumer"
    uow.emit(Toy(Evt.STOCK_RELEASED, {"order_no": "O1", "items": []}))
    assert db.events == [("stock.released", {"order_no": "O1", "items": []})]
    (outbox,) = db.rows("outbox")
    assert (outbox.routing_key, outbox.correlation_id) == ("stock.released", "m1")
    uow.start_timer("payment-timeout", "O1", timedelta(minutes=15), note="x")
    assert db.timers == [
        {
            "kind": "payment-timeout",
            "ref": "O1",
            "due_at": EPOCH + timedelta(minutes=15),
            "extra": {"note": "x"},
            "correlation_id": "m1",
        }
    ]
    uow.record("O1", "PLACE", None, "PENDING_PAYMENT", "user:u1", {"payable": 1})
    (line,) = db.timeline("O1")
    assert (line.action, line.to_status, line.detail, line.message_id, line.at) == (
        "PLACE",
        "PENDING_PAYMENT",
        {"payable": 1},
        "m1",
        EPOCH,
    )


def test_typed_events_are_emitted_by_name_and_body() -> None:
    from consumers.events import StockReleased

    db = FakeDatabase()
    uow = FakeUnitOfWork(db, new_envelope("x", {}, "q"))
    uow.emit(StockReleased(order_no="O1", items=[{"sku": "tea", "warehouse_id": "W1", "quantity": 1}]))
    assert db.events == [
        ("stock.released", {"order_no": "O1", "items": [{"sku": "tea", "warehouse_id": "W1", "quantity": 1}]})
    ]


# -- the in-process service's message path, on a toy consumer -------------------------------------


@dataclass(frozen=True)
class Toy:
    """An event of a toy consumer (store.ports.EventLike), not one of the contract's."""

    name: str
    payload: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return dict(self.payload)


class Touch(Command):
    order_no: str
    then: str = "apply"  # apply | refuse | park | fail


def _toy_service() -> InProcessService:
    def touch(cmd: Touch, uow: Any) -> None:
        uow.record(cmd.order_no, "TOUCH", None, None, "test")
        uow.emit(Toy("order.touched", {"order_no": cmd.order_no}))
        uow.start_timer("touch-timeout", cmd.order_no, timedelta(seconds=10))
        if cmd.then == "refuse":
            raise Refusal(Reason.INVALID_STATE, "no")
        if cmd.then == "park":
            raise ParkCommand("UNKNOWN_SKU", "later")
        if cmd.then == "fail":
            raise RuntimeError("bug")

    def refuse(cmd: Touch, refusal: Refusal, uow: Any) -> None:
        uow.emit(Toy("order.rejected", {"order_no": cmd.order_no, "reason": refusal.reason}))

    def timeout(cmd: TimerFired, uow: Any) -> None:
        uow.emit(Toy("order.timed-out", {"ref": cmd.ref, "at": uow.now.isoformat()}))

    specs = {
        "toy": ConsumerSpec("toy", {"order.touch": Route(Touch, touch, refuse)}),
        "timeouts": ConsumerSpec(
            "timeouts",
            {"timer.touch-timeout": Route(TimerFired, timeout)},
            (("order.timers.fired", "timer.#"),),
        ),
    }
    return InProcessService(Settings(), specs=specs)


def test_service_applies_once_and_skips_a_duplicate() -> None:
    svc = _toy_service()
    assert svc.send("order.touch", {"order_no": "O1"}, message_id="m1") == Applied()
    assert svc.db.events == [("order.touched", {"order_no": "O1"})]
    assert svc.send("order.touch", {"order_no": "O1"}, message_id="m1") == Duplicate()
    assert len(svc.db.events) == 1 and len(svc.db.timeline("O1")) == 1
    assert svc.db.one("processed_messages", message_id="m1").consumer == "toy"  # type: ignore[union-attr]


def test_service_rolls_back_a_refused_command_and_writes_only_its_refusal() -> None:
    svc = _toy_service()
    answer = svc.deliver("order.touch", {"order_no": "O1", "then": "refuse"}, "m1")
    assert answer.outcome == Applied()
    assert answer.events == [("order.rejected", {"order_no": "O1", "reason": "INVALID_STATE"})]
    assert svc.db.timeline("O1") == [] and svc.db.timers == []
    assert svc.db.count("processed_messages", message_id="m1") == 1, "a refusal is an answer: deduped"
    assert svc.send("order.touch", {"order_no": "O1", "then": "refuse"}, message_id="m1") == Duplicate()


def test_service_parks_what_cannot_be_applied() -> None:
    svc = _toy_service()
    answer = svc.deliver("order.touch", {"order_no": "O1", "then": "park"}, "m1")
    assert answer.outcome == Park("UNKNOWN_SKU", "later")
    assert answer.names() == ["command.rejected"] and svc.db.timers == []
    assert svc.db.count("processed_messages") == 0, "a parked message may be replayed"
    cases: list[tuple[str, dict[str, Any] | bytes, str]] = [
        ("order.touch", {"then": "apply"}, "SCHEMA_INVALID"),
        ("order.teleport", {"order_no": "O1"}, "UNKNOWN_ROUTING_KEY"),
        ("order.touch", b"{not json", "INVALID_JSON"),
    ]
    for routing_key, body, code in cases:
        parked = svc.deliver(routing_key, body, "m2")
        assert isinstance(parked.outcome, Park) and parked.outcome.code == code, parked
    assert svc.deliver("order.touch", {"order_no": "O1"}, None).outcome.code == "MISSING_MESSAGE_ID"  # type: ignore[union-attr]


def test_service_raises_on_a_failing_handler_with_nothing_kept() -> None:
    svc = _toy_service()
    with pytest.raises(HandlerFailed):
        svc.send("order.touch", {"order_no": "O1", "then": "fail"})
    assert svc.db.events == [] and svc.db.timers == [] and svc.db.count("processed_messages") == 0


def test_service_fires_timers_in_due_order_as_the_clock_passes_them() -> None:
    svc = _toy_service()
    svc.send("order.touch", {"order_no": "O1"}, message_id="m1")
    svc.clock.advance(timedelta(seconds=3))
    svc.send("order.touch", {"order_no": "O2"}, message_id="m2")
    assert svc.advance(timedelta(seconds=6)) == []
    fired = svc.advance(timedelta(seconds=30))
    assert [a.events for a in fired] == [
        [("order.timed-out", {"ref": "O1", "at": (EPOCH + timedelta(seconds=10)).isoformat()})],
        [("order.timed-out", {"ref": "O2", "at": (EPOCH + timedelta(seconds=13)).isoformat()})],
    ]
    assert svc.clock.now() == EPOCH + timedelta(seconds=39) and svc.db.timers == []
    # The events a timer causes carry the correlation id of the command that started it.
    timed_out = svc.db.rows("outbox", routing_key="order.timed-out")
    assert [r.correlation_id for r in timed_out] == ["m1", "m2"]


def test_unique_keys_follow_updates_deletes_and_restores() -> None:
    db = FakeDatabase()
    refund = {"order_no": "O1", "source": "USER_CANCEL", "amount": 1, "status": "X"}
    r1 = db.insert("refunds", {**refund, "refund_no": "R1", "source_ref": "a"})
    snap = db.snapshot()
    db.update(r1, source_ref="b")  # frees key a, takes key b
    db.insert("refunds", {**refund, "refund_no": "R2", "source_ref": "a"})
    with pytest.raises(DuplicateKey):
        db.insert("refunds", {**refund, "refund_no": "R3", "source_ref": "b"})
    with pytest.raises(DuplicateKey):
        db.update(r1, source_ref="a")
    db.delete(r1)
    db.insert("refunds", {**refund, "refund_no": "R1", "source_ref": "b"})  # both keys free again
    assert [r.refund_no for r in db.rows("refunds")] == ["R2", "R1"]
    db.restore(snap)
    assert [(r.refund_no, r.source_ref) for r in db.rows("refunds")] == [("R1", "a")]
    with pytest.raises(DuplicateKey):
        db.insert("refunds", {**refund, "refund_no": "R2", "source_ref": "a"})
    # A changed primary key keeps the row's place.
    db.insert("refunds", {**refund, "refund_no": "R5", "source_ref": "c"})
    db.update(db.rows("refunds")[0], refund_no="R0")
    assert [r.refund_no for r in db.rows("refunds")] == ["R0", "R5"]
    assert db.one("refunds", refund_no="R0") is not None and db.one("refunds", refund_no="R1") is None


def test_the_fake_unit_of_work_is_a_unit_of_work() -> None:
    # mypy checks this assignment against store/ports.py (every repository protocol included)
    uow: UnitOfWork = FakeUnitOfWork(FakeDatabase(), new_envelope("order.place", {}, "order.placement"))
    assert uow.correlation_id is not None


def test_a_savepoint_rolls_back_only_its_own_effects() -> None:
    db = FakeDatabase()
    uow = FakeUnitOfWork(db, new_envelope("timer.x", {}, "order.timeouts", message_id="m1"))
    uow.emit(Toy("order.kept", {}))
    with pytest.raises(RuntimeError), uow.savepoint(new_envelope("timer.x", {}, "order.timeouts")) as one:
        one.emit(Toy("order.lost", {}))
        raise RuntimeError("refused")
    with uow.savepoint(new_envelope("timer.x", {}, "order.timeouts", correlation_id="c2")) as two:
        two.emit(Toy("order.also-kept", {}))
    assert [name for name, _ in db.events] == ["order.kept", "order.also-kept"]
    assert [r.correlation_id for r in db.rows("outbox")] == ["m1", "c2"]
