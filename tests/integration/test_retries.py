"""Failures that are not the message's fault: retried with backoff, then parked; never looping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration.test_placement import given_sku
from tests.support import EventListener, System, fresh_system, unique

# A real database failure for chosen SKUs: a trigger that raises (no mocks).
FAILING_TRIGGER = """
CREATE OR REPLACE FUNCTION fail_for_test_skus() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.sku LIKE 'poison-%' THEN
        RAISE EXCEPTION 'simulated bug for %', NEW.sku;
    END IF;
    IF NEW.sku LIKE 'flaky-%' THEN
        RAISE EXCEPTION 'simulated serialization failure' USING ERRCODE = '40001';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS fail_for_test_skus ON stock;
CREATE TRIGGER fail_for_test_skus BEFORE UPDATE ON stock FOR EACH ROW EXECUTE FUNCTION fail_for_test_skus();
"""


@pytest.fixture(scope="module")
def retry_system() -> Iterator[tuple[System, EventListener]]:
    with fresh_system(TRANSIENT_RETRY_SECONDS="1", RETRY_DELAYS="1s,2s") as system:
        system.db.query(FAILING_TRIGGER)
        system.start("order.catalog", "order.unrouted")
        listener = EventListener(system.amqp_url).start()
        yield system, listener
        listener.stop()


@pytest.mark.parametrize("prefix", ["poison", "flaky"])
def test_failing_message_goes_through_retry_queues_then_parks(
    retry_system: tuple[System, EventListener], prefix: str
) -> None:
    system, events = retry_system
    # Given a SKU whose stock row fails to update (a bug, or a serialization failure that persists)
    sku = unique(prefix)
    system.send(
        "sku.upsert", {"sku": sku, "name": "x", "unit_price": 1, "merchant_id": "M", "warehouse_id": "W1"}
    )
    events.one("sku.upserted", sku=sku)
    # When it is restocked, followed by a healthy command
    started = time.monotonic()
    message_id = system.send("stock.restock", {"sku": sku, "warehouse_id": "W1", "quantity": 1})
    healthy = given_sku(system, events, price=1, stock=2)
    # Then the healthy command is not held up behind it
    assert events.one("stock.restocked", sku=healthy, timeout=10)
    # And the failing one is parked after the retry steps, with its history and the same id
    rejected = events.one("command.rejected", message_id=message_id, timeout=40)
    assert rejected["code"] == "RETRIES_EXHAUSTED"
    assert time.monotonic() - started >= 3  # it waited in the 1 s and 2 s retry queues
    parked = system.wait_parked(message_id)
    headers = parked.headers
    assert headers["x-parking-code"] == "RETRIES_EXHAUSTED"
    assert headers["x-attempts"] == 3
    assert "simulated" in headers["x-parking-reason"]
    assert {d["queue"] for d in headers["x-death"]} == {"order.retry.1s", "order.retry.2s"}
    assert parked.message_id == message_id
    # And nothing of it was applied
    assert system.db.scalar("SELECT available FROM stock WHERE sku = %s", sku) == 0
    # And it does not come back: the queues are empty after it was parked
    time.sleep(3)
    assert len(events.matching("command.rejected", message_id=message_id)) == 1
