"""The `orders` command against the real service: show, stock, send, parking lot, check, health, report."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from testing.broker import EventListener
from testing.builders import RECEIVER, given_sku
from testing.system import System, fresh_system, unique


def orders_json(system: System, *args: str) -> Any:
    result = system.orders(*args, "--json")
    return json.loads(result.stdout)


def send_order(system: System, user: str, sku: str, quantity: int) -> str:
    body = {
        "request_id": unique("req"),
        "user_id": user,
        "order_type": "physical",
        "items": [{"sku": sku, "quantity": quantity}],
        "receiver": RECEIVER,
    }
    return system.orders("send", "order.place", json.dumps(body)).stdout.strip()


@pytest.fixture
def spare_system() -> Iterator[System]:
    """A system of its own (no consumers unless a test starts them): safe to corrupt or to replay --all."""
    with fresh_system() as spare:
        yield spare


# ---------------------------------------------------------------------------------------------
# send, show, stock


def test_send_then_show_round_trip(system: System, events: EventListener) -> None:
    # Given a SKU with stock
    sku = given_sku(system, events, price=1200, stock=10)
    user = unique("user")
    # When an order is placed with `orders send`
    message_id = send_order(system, user, sku, 2)
    # Then the command went out under the printed message id and made an order
    assert uuid.UUID(message_id)
    created = events.one("order.created", user_id=user)
    assert events.for_correlation(message_id)[0].routing_key in ("order.created", "stock.locked")
    # And `orders show --json` has its status, money, items and timeline
    order = orders_json(system, "show", created["order_no"])
    assert order["order_no"] == created["order_no"]
    assert order["status"] == "PENDING_PAYMENT"
    assert order["user_id"] == user
    assert order["money"]["payable"] == created["payable"] == order["payable"]
    assert [(i["sku"], i["quantity"]) for i in order["items"]] == [(sku, 2)]
    assert order["children"] == []
    assert order["timeline"] and order["timeline"][0]["order_no"] == created["order_no"]
    assert order["timeline"][0]["to_status"] == "PENDING_PAYMENT"
    # And the table form names the order, its status and the SKU
    table = system.orders("show", created["order_no"]).stdout
    assert created["order_no"] in table and "PENDING_PAYMENT" in table and sku in table


def test_show_paid_order_with_children(system: System, events: EventListener) -> None:
    # Given a paid order of two merchants, split into two children
    tea = given_sku(system, events, price=1200, stock=10, merchant="M1", warehouse="W1")
    pot = given_sku(system, events, price=15000, stock=5, merchant="M2", warehouse="W2")
    user = unique("user")
    body = {
        "request_id": unique("req"),
        "user_id": user,
        "order_type": "physical",
        "receiver": RECEIVER,
        "items": [{"sku": tea, "quantity": 2}, {"sku": pot, "quantity": 1}],
    }
    system.orders("send", "order.place", json.dumps(body))
    created = events.one("order.created", user_id=user)
    parent_no, payment_no = created["order_no"], unique("pay")
    system.send(
        "payment.notify",
        system.signed(
            {
                "order_no": parent_no,
                "payment_no": payment_no,
                "method": "card",
                "amount": created["payable"],
                "paid_at": "2025-03-01T12:00:00+00:00",
            }
        ),
    )
    split = events.one("order.split", order_no=parent_no)
    # When the parent is shown
    parent = orders_json(system, "show", parent_no)
    # Then it is paid, with both children, the payment and a timeline over the family
    assert parent["status"] == "PAID" and parent["paid_amount"] == created["payable"]
    children = {c["order_no"]: c for c in parent["children"]}
    assert set(children) == {c["order_no"] for c in split["children"]}
    assert {(c["merchant_id"], c["status"]) for c in children.values()} == {("M1", "PAID"), ("M2", "PAID")}
    assert sum(c["payable"] for c in children.values()) == created["payable"]
    assert sorted(i["sku"] for c in children.values() for i in c["items"]) == sorted([tea, pot])
    assert [(p["payment_no"], p["amount"]) for p in parent["payments"]] == [(payment_no, created["payable"])]
    assert any(e["to_status"] == "PAID" for e in parent["timeline"])
    assert {e["order_no"] for e in parent["timeline"]} <= {parent_no, *children}
    times = [e["at"] for e in parent["timeline"]]
    assert times == sorted(times)
    # And a child shows its own lines, its parent and the parent's timeline
    child_no = next(no for no, c in children.items() if c["merchant_id"] == "M2")
    child = orders_json(system, "show", child_no)
    assert child["parent_no"] == parent_no and child["status"] == "PAID"
    assert [(i["sku"], i["quantity"]) for i in child["items"]] == [(pot, 1)]
    assert parent_no in {e["order_no"] for e in child["timeline"]}
    assert child_no in system.orders("show", parent_no).stdout


def test_send_with_given_ids(system: System, events: EventListener) -> None:
    sku = unique("sku")
    message_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"sku": sku, "name": "Tea", "unit_price": 100, "merchant_id": "M1", "warehouse_id": "W1"}
    out = system.orders(
        "send", "sku.upsert", json.dumps(body), "--message-id", message_id, "--correlation-id", correlation_id
    ).stdout.strip()
    assert out == message_id
    upserted = events.wait_for("sku.upserted", sku=sku)[0]
    assert upserted.properties.correlation_id == correlation_id


def test_stock_json_counts(system: System, events: EventListener) -> None:
    # Given 10 units of a SKU, 3 of them locked by an order
    sku = given_sku(system, events, price=500, stock=10, warehouse="W7")
    user = unique("user")
    send_order(system, user, sku, 3)
    events.wait_for("stock.locked", where=lambda b: any(i["sku"] == sku for i in b["items"]))
    # Then available excludes the locked units, in total and per warehouse
    stock = orders_json(system, "stock", sku)
    assert (stock["sku"], stock["available"], stock["locked"], stock["sold"]) == (sku, 7, 3, 0)
    assert stock["restocked_total"] == 10 and stock["sales_count"] == 0
    assert stock["warehouses"] == [
        {"warehouse_id": "W7", "available": 7, "locked": 3, "sold": 0, "restocked_total": 10}
    ]
    assert sku in system.orders("stock", sku).stdout


def test_unknown_order_and_sku_exit_1(system: System) -> None:
    shown = system.orders("show", "O-NO-SUCH-ORDER", check=False)
    assert shown.returncode == 1
    assert "no order O-NO-SUCH-ORDER" in shown.stderr
    assert system.orders("show", "O-NO-SUCH-ORDER", "--json", check=False).returncode == 1
    assert system.orders("stock", unique("nosuch"), check=False).returncode == 1


def test_send_invalid_json_exit_2(system: System) -> None:
    result = system.orders("send", "order.place", "{not json", check=False)
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr


# ---------------------------------------------------------------------------------------------
# The parking lot


def test_parking_lot_list_shows_a_parked_invalid_message(system: System, events: EventListener) -> None:
    # Given an order.place without its required fields, sent through the CLI
    message_id = system.orders("send", "order.place", json.dumps({"user_id": "u"})).stdout.strip()
    events.one("command.rejected", message_id=message_id)
    system.wait_parked(message_id)
    # When the operator lists the parking lot
    parked = {p["message_id"]: p for p in orders_json(system, "parking-lot", "list")}
    # Then the message is there with its routing key, code and readable reason, and still parked
    entry = parked[message_id]
    assert entry["routing_key"] == "order.place"
    assert entry["code"] == "SCHEMA_INVALID"
    assert "request_id" in entry["reason"]
    assert entry["queue"] == "order.placement"
    assert entry["attempts"] >= 1 and entry["age_seconds"] is not None
    table = system.orders("parking-lot", "list").stdout
    assert message_id in table and "SCHEMA_INVALID" in table
    assert message_id in {props.message_id for props, _ in system.parked()}


def test_replay_of_restock_for_a_sku_upserted_later(system: System, events: EventListener) -> None:
    # Given a restock of a SKU nobody upserted yet: parked as UNKNOWN_SKU
    sku = unique("sku")
    restock = system.send("stock.restock", {"sku": sku, "warehouse_id": "W1", "quantity": 4})
    assert events.one("command.rejected", message_id=restock)["code"] == "UNKNOWN_SKU"
    system.wait_parked(restock)
    # And an unrelated message parked beside it
    other = system.orders("send", "order.place", json.dumps({"user_id": "u"})).stdout.strip()
    system.wait_parked(other)
    # When the SKU is upserted and the restock replayed by its message id
    system.send(
        "sku.upsert",
        {"sku": sku, "name": "Late", "unit_price": 100, "merchant_id": "M1", "warehouse_id": "W1"},
    )
    events.one("sku.upserted", sku=sku)
    replayed = system.orders("parking-lot", "replay", restock)
    assert restock in replayed.stdout
    # Then it is applied under its own message id, and gone from the parking lot
    restocked = events.wait_for("stock.restocked", sku=sku)[0]
    assert restocked.properties.correlation_id == restock
    assert orders_json(system, "stock", sku)["available"] == 4
    parked_ids = {props.message_id for props, _ in system.parked()}
    assert restock not in parked_ids
    # And the other message was put back untouched
    assert other in parked_ids


def test_replay_unknown_message_id_and_bad_usage(system: System) -> None:
    missing = system.orders("parking-lot", "replay", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and "not in the parking lot" in missing.stderr
    assert system.orders("parking-lot", "replay", check=False).returncode == 2


def test_replay_all(spare_system: System) -> None:
    # Given two restocks parked for SKUs that exist only later
    spare_system.start("order.catalog")
    listener = EventListener(spare_system.amqp_url).start()
    try:
        skus = [unique("sku"), unique("sku")]
        ids = [
            spare_system.send("stock.restock", {"sku": s, "warehouse_id": "W1", "quantity": 2}) for s in skus
        ]
        for message_id in ids:
            spare_system.wait_parked(message_id)
        for sku in skus:
            spare_system.send(
                "sku.upsert",
                {"sku": sku, "name": sku, "unit_price": 1, "merchant_id": "M1", "warehouse_id": "W1"},
            )
            listener.one("sku.upserted", sku=sku)
        # When every parked message is replayed
        result = json.loads(spare_system.orders("parking-lot", "replay", "--all", "--json").stdout)
        # Then both went back to order.commands with their routing key and were applied
        assert {(r["message_id"], r["exchange"], r["routing_key"], r["replayed"]) for r in result} == {
            (i, "order.commands", "stock.restock", True) for i in ids
        }
        for sku in skus:
            listener.one("stock.restocked", sku=sku)
        assert spare_system.parked() == []
    finally:
        listener.stop()


def test_replayed_message_has_no_parking_headers(spare_system: System) -> None:
    # Given a parked message with the parking and retry headers the loop writes
    message_id = str(uuid.uuid4())
    headers = {
        "x-schema-version": 1,
        "x-parking-reason": "r",
        "x-parking-code": "C",
        "x-attempts": 3,
        "x-last-error": "boom",
        "x-original-routing-key": "stock.restock",
        "x-original-exchange": "order.commands",
        "x-original-queue": "order.catalog",
        "x-parked-at": "2025-01-01T00:00:00+00:00",
        "x-trace": "kept",
    }
    props = pika.BasicProperties(
        message_id=message_id,
        correlation_id="corr-1",
        type="stock.restock",
        content_type="application/json",
        delivery_mode=2,
        headers=headers,
    )
    spare_system.publish_raw("order.parking-lot", b'{"sku": "s"}', props, exchange="")
    # And a queue that sees what reaches order.commands (no consumers run here)
    conn = pika.BlockingConnection(pika.URLParameters(spare_system.amqp_url))
    try:
        channel = conn.channel()
        tap = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(tap, "order.commands", "stock.restock")
        # When it is replayed
        spare_system.orders("parking-lot", "replay", message_id)
        # Then the copy has the same id, correlation id and body, and only the headers of its own
        method, got, body = None, None, b""
        for _ in range(50):
            method, got, body = channel.basic_get(tap, auto_ack=True)
            if method is not None:
                break
            conn.sleep(0.1)
        assert method is not None and got is not None
        assert (got.message_id, got.correlation_id, body) == (message_id, "corr-1", b'{"sku": "s"}')
        assert got.headers == {"x-schema-version": 1, "x-trace": "kept"}
        assert method.routing_key == "stock.restock"
    finally:
        conn.close()
    assert spare_system.parked() == []


# ---------------------------------------------------------------------------------------------
# Invariants, refunds, health, report


def test_check_passes_on_a_healthy_system(system: System, events: EventListener) -> None:
    sku = given_sku(system, events, price=100, stock=5)
    user = unique("user")
    send_order(system, user, sku, 1)
    events.one("order.created", user_id=user)
    result = system.orders("check", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["ok"] is True
    assert {c["invariant"] for c in report["checks"]} == {"I2", "I3", "I4", "I5"}
    assert "PASS" in system.orders("check").stdout


def test_check_fails_on_corrupted_stock(spare_system: System) -> None:
    # Given a consistent SKU with stock (written as the catalogue consumer would)
    db = spare_system.db
    db.query(
        "INSERT INTO skus (sku, name, unit_price, merchant_id, warehouse_id) "
        "VALUES ('sku-ok', 'Fine', 100, 'M1', 'W1'), ('sku-bad', 'Broken', 100, 'M1', 'W1')"
    )
    db.query(
        "INSERT INTO stock (sku, warehouse_id, available, restocked_total) "
        "VALUES ('sku-ok', 'W1', 10, 10), ('sku-bad', 'W1', 10, 10)"
    )
    assert spare_system.orders("check", check=False).returncode == 0
    # When one stock row is corrupted: units appear from nowhere and a lock without a ledger line
    db.query("UPDATE stock SET available = 13, locked = 2 WHERE sku = 'sku-bad'")
    # Then the check fails and names the row under I2 and I3
    result = spare_system.orders("check", "--json", check=False)
    assert result.returncode == 1
    failed = {c["name"]: c for c in json.loads(result.stdout)["checks"] if not c["ok"]}
    assert set(failed) == {"ledger-matches-stock", "stock-conserved"}
    assert failed["stock-conserved"]["offending"] == [
        {
            "sku": "sku-bad",
            "warehouse_id": "W1",
            "available": 13,
            "locked": 2,
            "sold": 0,
            "restocked_total": 10,
            "difference": 5,
        }
    ]
    assert [r["sku"] for r in failed["ledger-matches-stock"]["offending"]] == ["sku-bad"]
    table = spare_system.orders("check", check=False)
    assert table.returncode == 1 and "FAIL" in table.stdout and "sku-bad" in table.stdout


def test_refunds_list_and_retry(spare_system: System) -> None:
    # Given a failed refund of a cancelled order's late payment
    db = spare_system.db
    db.query(
        "INSERT INTO orders (order_no, user_id, order_type, status, goods_total, freight, discount_total, "
        "payable) VALUES ('O1', 'u1', 'physical', 'CANCELLED', 100, 0, 0, 100)"
    )
    db.query(
        "INSERT INTO payments (payment_no, order_no, method, amount, refundable, paid_at, outcome, raw) "
        "VALUES ('P1', 'O1', 'card', 100, 100, now(), 'LATE_REFUNDED', '{}')"
    )
    db.query(
        "INSERT INTO refunds (refund_no, order_no, source, source_ref, payment_no, amount, status) "
        "VALUES ('R1', 'O1', 'LATE_PAYMENT', 'P1', 'P1', 100, 'FAILED')"
    )
    failed = json.loads(spare_system.orders("refunds", "--failed", "--json").stdout)
    assert [(r["refund_no"], r["status"]) for r in failed] == [("R1", "FAILED")]
    # When the operator retries it
    spare_system.orders("refund-retry", "R1")
    # Then it is requested again, with refund.requested in the outbox and a timeline line
    assert db.scalar("SELECT status FROM refunds WHERE refund_no = 'R1'") == "REQUESTED"
    outbox = db.one("SELECT body, correlation_id FROM outbox WHERE routing_key = 'refund.requested'")
    assert outbox["body"]["refund_no"] == "R1" and outbox["correlation_id"]
    assert db.scalar("SELECT action FROM order_timeline WHERE order_no = 'O1'") == "REFUND_RETRIED"
    assert json.loads(spare_system.orders("refunds", "--failed", "--json").stdout) == []
    # and claims its amount from the payment again (the failure had given it back)
    assert db.scalar("SELECT refundable FROM payments WHERE payment_no = 'P1'") == 0
    # And a refund that is not failed (or does not exist) is refused
    again = spare_system.orders("refund-retry", "R1", check=False)
    assert again.returncode == 1 and "REQUESTED" in again.stderr
    assert spare_system.orders("refund-retry", "R-none", check=False).returncode == 1


def test_health_passes_on_a_running_system(system: System) -> None:
    result = system.orders("health", "--json", check=False)
    health = json.loads(result.stdout)
    assert result.returncode == 0, health
    names = {c["name"] for c in health["components"]}
    assert {"database", "broker", "outbox", "parking-lot", "queue order.placement"} <= names
    placement = next(c for c in health["components"] if c["name"] == "queue order.placement")
    assert placement["consumers"] >= 1
    assert "UNHEALTHY" not in system.orders("health").stdout


def test_health_fails_when_a_queue_has_no_consumer(spare_system: System) -> None:
    result = spare_system.orders("health", "--json", check=False)
    assert result.returncode == 1
    bad = {c["name"] for c in json.loads(result.stdout)["components"] if not c["ok"]}
    assert "queue order.catalog" in bad and "database" not in bad and "broker" not in bad


def test_health_fails_when_the_database_is_down(spare_system: System) -> None:
    result = spare_system.run(
        "-m",
        "cli.main",
        "health",
        "--json",
        check=False,
        env={"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/none"},
    )
    assert result.returncode == 1
    database = next(c for c in json.loads(result.stdout)["components"] if c["name"] == "database")
    assert database["ok"] is False and "unreachable" in database["detail"]


def test_report_runs(system: System, events: EventListener) -> None:
    sku = given_sku(system, events, price=100, stock=5)
    user = unique("user")
    send_order(system, user, sku, 1)
    events.one("order.created", user_id=user)
    data = orders_json(system, "report", "--since", "2000-01-01")
    by_status = {r["status"]: r["orders"] for r in data["orders"]["parents"]}
    # The order is unpaid, or already cancelled by its 2 s payment timeout on a slow machine
    assert by_status.get("PENDING_PAYMENT", 0) + by_status.get("CANCELLED", 0) >= 1
    rows = list(csv.reader(io.StringIO(system.orders("report", "--since", "2000-01-01", "--csv").stdout)))
    assert rows[0] == ["section", "key", "metric", "value"]
    # The CSV holds the same parents (a timeout between the two reports only moves one between statuses)
    csv_orders = [int(r[3]) for r in rows if r[0] == "orders.parents" and r[2] == "orders"]
    assert sum(csv_orders) == sum(by_status.values())
    assert "Reconciliation" in system.orders("report", "--since", "2000-01-01").stdout
    assert system.orders("report", "--since", "yesterday", check=False).returncode == 2
