"""Failures that are not the message's fault: retried with backoff, then parked; never looping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from testing.broker import EventListener
from testing.builders import given_sku
from testing.system import System, fresh_system, unique

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

-- A failure outside any handler: writing the dedup row of chosen message ids.
CREATE OR REPLACE FUNCTION fail_for_test_ids() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.message_id LIKE 'poison-claim-%' THEN
        RAISE EXCEPTION 'simulated failure claiming %', NEW.message_id;
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS fail_for_test_ids ON processed_messages;
CREATE TRIGGER fail_for_test_ids BEFORE INSERT ON processed_messages
    FOR EACH ROW EXECUTE FUNCTION fail_for_test_ids();
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
    # A bug is INTERNAL_ERROR (with where it was raised); a failure that stayed transient, RETRIES_EXHAUSTED
    code = {"poison": "INTERNAL_ERROR", "flaky": "RETRIES_EXHAUSTED"}[prefix]
    assert rejected["code"] == code
    assert time.monotonic() - started >= 3  # it waited in the 1 s and 2 s retry queues
    parked = system.wait_parked(message_id)
    headers = parked.headers
    assert headers["x-parking-code"] == code
    assert headers["x-attempts"] == 3
    assert "simulated" in headers["x-parking-reason"]
    assert {d["queue"] for d in headers["x-death"]} == {"order.retry.1s", "order.retry.2s"}
    assert parked.message_id == message_id
    # And nothing of it was applied
    assert system.db.scalar("SELECT available FROM stock WHERE sku = %s", sku) == 0
    # And it does not come back: the queues are empty after it was parked
    time.sleep(3)
    assert len(events.matching("command.rejected", message_id=message_id)) == 1


def test_failure_outside_the_handler_isolates_the_message(retry_system: tuple[System, EventListener]) -> None:
    system, events = retry_system
    # Given a window of SKU upserts in which one message's dedup row cannot be written
    skus = [unique("sku") for _ in range(6)]
    poison = unique("poison-claim")
    with system.publisher() as pub:
        for index, sku in enumerate(skus):
            body = {"sku": sku, "name": "x", "unit_price": 1, "merchant_id": "M", "warehouse_id": "W1"}
            pub.send("sku.upsert", body, message_id=poison if index == 2 else None)

    # Then the others are applied at once
    for index, sku in enumerate(skus):
        if index != 2:
            events.one("sku.upserted", sku=sku, timeout=10)
    # And the failing one goes through the retry queues and is parked INTERNAL_ERROR, saying where
    rejected = events.one("command.rejected", message_id=poison, timeout=40)
    assert rejected["code"] == "INTERNAL_ERROR"
    headers = system.wait_parked(poison).headers
    assert headers["x-parking-code"] == "INTERNAL_ERROR"
    assert headers["x-attempts"] == 3
    assert "simulated failure claiming" in headers["x-parking-reason"]
    assert " in " in headers["x-parking-reason"]  # the traceback summary: file:line in function
    assert system.db.scalar("SELECT count(*) FROM skus WHERE sku = %s", skus[2]) == 0
