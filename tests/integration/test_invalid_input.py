"""Invalid commands end in the parking lot with command.rejected; the consumer keeps serving."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from testing.broker import EventListener
from testing.builders import given_sku, place, props
from testing.system import System, unique

RESTOCK = {"sku": "x", "warehouse_id": "W1", "quantity": 1}
# case -> (expected code, routing key, body, property overrides)
CASES = {
    "not-json": ("INVALID_JSON", "stock.restock", b"{not json", {}),
    "json-array": ("INVALID_JSON", "stock.restock", b"[1, 2]", {}),
    "unknown-key": ("UNKNOWN_ROUTING_KEY", "stock.teleport", json.dumps(RESTOCK).encode(), {}),
    "zero-quantity": ("SCHEMA_INVALID", "stock.restock", json.dumps({**RESTOCK, "quantity": 0}).encode(), {}),
    "string-quantity": (
        "SCHEMA_INVALID",
        "order.place",
        json.dumps(
            {
                "request_id": "r",
                "user_id": "u",
                "order_type": "physical",
                "items": [{"sku": "a", "quantity": "2"}],
            }
        ).encode(),
        {},
    ),
    "missing-field": ("SCHEMA_INVALID", "sku.upsert", json.dumps({"sku": "a"}).encode(), {}),
    "too-large": ("BODY_TOO_LARGE", "stock.restock", b'{"pad": "' + b"x" * (1024 * 1024) + b'"}', {}),
    "schema-v2": (
        "UNSUPPORTED_SCHEMA_VERSION",
        "stock.restock",
        json.dumps(RESTOCK).encode(),
        {"headers": {"x-schema-version": 2}},
    ),
    "text-plain": (
        "UNSUPPORTED_CONTENT_TYPE",
        "stock.restock",
        json.dumps(RESTOCK).encode(),
        {"content_type": "text/plain"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_command_is_parked_with_reason(system: System, events: EventListener, case: str) -> None:
    # Given a malformed command
    expected_code, routing_key, body, overrides = CASES[case]
    message_id = str(uuid.uuid4())
    # When it is published
    system.publish_raw(routing_key, body, props(message_id, routing_key, **overrides))
    # Then command.rejected says why, with the code of the case
    rejected = events.one("command.rejected", message_id=message_id)
    assert rejected["code"] == expected_code
    assert rejected["routing_key"] == routing_key
    assert rejected["reason"]
    # And the original message sits in the parking lot with the reason in its headers
    parked = system.wait_parked(message_id)
    assert parked.headers["x-parking-code"] == expected_code
    assert parked.headers["x-parking-reason"] == rejected["reason"]
    # And the consumers go on serving valid commands
    user = unique("user")
    sku = given_sku(system, events, price=100, stock=1)
    place(system, user, [{"sku": sku, "quantity": 1}])
    events.one("order.created", user_id=user)


def test_command_without_message_id_is_parked(system: System, events: EventListener) -> None:
    # Given a command with no message_id
    marker = unique("sku")
    body = json.dumps({**RESTOCK, "sku": marker}).encode()
    system.publish_raw("stock.restock", body, props(None, "stock.restock"))
    # Then command.rejected with message_id null and the parked original
    found = events.wait_for(
        "command.rejected", code="MISSING_MESSAGE_ID", where=lambda b: b["message_id"] is None
    )
    assert found
    parked = [p for p, b in system.parked() if marker.encode() in b]
    assert parked and parked[0].headers["x-parking-code"] == "MISSING_MESSAGE_ID"


def test_restock_of_unknown_sku_is_parked_for_replay(system: System, events: EventListener) -> None:
    sku = unique("later")
    message_id = system.send("stock.restock", {"sku": sku, "warehouse_id": "W1", "quantity": 3})
    rejected = events.one("command.rejected", message_id=message_id)
    assert rejected["code"] == "UNKNOWN_SKU"
    assert system.wait_parked(message_id).headers["x-parking-code"] == "UNKNOWN_SKU"


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {rng.choice(FIELDS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    simple: list[object] = [
        None,
        rng.randint(-(10**18), 10**18),
        rng.random() * 1e6,
        "",
        "x" * rng.randint(1, 80),
        rng.choice([True, False]),
    ]
    return simple[kind] if kind < 6 else "2026-13-45T99:99:99Z"


FIELDS = [
    "sku",
    "quantity",
    "items",
    "order_no",
    "user_id",
    "amount",
    "receiver",
    "request_id",
    "order_type",
    "warehouse_id",
    "unit_price",
    "name",
    "merchant_id",
    "code",
    "expires_at",
    "min_spend",
    "signature",
]
KEYS = [
    "sku.upsert",
    "stock.restock",
    "coupon.grant",
    "order.place",
    "order.cancel",
    "payment.notify",
    "order.ship",
    "aftersale.request",
    "refund.result",
    "merchant.cancel",
    "x.y",
]


def test_random_bodies_never_crash_a_consumer(system: System, events: EventListener) -> None:
    # Given 150 commands with random bodies on every routing key
    rng = random.Random(20261126)
    ids = []
    for _ in range(150):
        key = rng.choice(KEYS)
        body = {rng.choice(FIELDS): random_value(rng) for _ in range(rng.randint(0, 8))}
        message_id = str(uuid.uuid4())
        system.publish_raw(key, json.dumps(body).encode(), props(message_id, key))
        ids.append(message_id)
    # When a valid order follows them
    user = unique("user")
    sku = given_sku(system, events, price=100, stock=1)
    place(system, user, [{"sku": sku, "quantity": 1}])
    events.one("order.created", user_id=user, timeout=30)
    # Then every consumer is still running and each random command was handled or parked
    for queue, proc in system.processes.items():
        assert proc.poll() is None, f"{queue} died"
    done = {
        r["message_id"]
        for r in system.db.query("SELECT message_id FROM processed_messages WHERE message_id = ANY(%s)", ids)
    }
    rejected = {e.body["message_id"] for e in events.matching("command.rejected")}
    assert set(ids) <= done | rejected
