"""Streams of orders for the fault and shutdown tests: a seeded catalog, order bodies, settling."""

from __future__ import annotations

import random
import time

from testing.broker import EventListener
from testing.system import System, unique

RECEIVER = {"name": "Han Meimei", "phone": "13900000000", "address": "9 River Street"}


def seed_catalog(system: System, events: EventListener, skus: int = 20, units: int = 10) -> list[str]:
    """`skus` new SKUs of merchant M1 with `units` each in W1, sent in one go; returns them."""
    names = [unique("fsku") for _ in range(skus)]
    with system.publisher() as pub:
        for sku in names:
            pub.send(
                "sku.upsert",
                {"sku": sku, "name": sku, "unit_price": 990, "merchant_id": "M1", "warehouse_id": "W1"},
            )
            pub.send("stock.restock", {"sku": sku, "warehouse_id": "W1", "quantity": units})
    events.wait_for("stock.restocked", count=skus, where=lambda b: b["sku"] in names, timeout=30)
    return names


def order_bodies(skus: list[str], count: int) -> list[dict]:
    """`count` order.place bodies of one or two of these SKUs (the same ones on every run)."""
    rng = random.Random(7)
    return [
        {
            "request_id": unique("freq"),
            "user_id": f"fuser-{i % 50}",
            "order_type": "physical",
            "items": [{"sku": sku, "quantity": 1} for sku in rng.sample(skus, rng.randint(1, 2))],
            "receiver": RECEIVER,
        }
        for i in range(count)
    ]


def wait_settled(system: System, ids: list[str], timeout: float = 180) -> None:
    """Wait until order.placement has applied every one of these message ids (or `timeout`)."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while time.monotonic() < deadline:
        done = {
            r["message_id"]
            for r in system.db.query(
                "SELECT message_id FROM processed_messages WHERE consumer = 'order.placement'"
            )
        }
        if wanted <= done:
            return
        time.sleep(0.5)
    # Not all applied: the rest must be parked (checked by assert_invariants)
