"""The outbox relay: confirms awaited per batch, events with every contract property, broken routes kept."""

from __future__ import annotations

import time
import uuid

from tests.support import EventListener, fresh_system


def insert_outbox(system, ids: list[str], exchange: str, routing_key: str) -> None:  # type: ignore[no-untyped-def]
    system.db.query(
        "INSERT INTO outbox (message_id, exchange, routing_key, correlation_id, body, headers) "
        "SELECT id, %s, %s, 'corr-' || id, json_build_object('n', id), '{\"x-schema-version\": 1}' "
        "FROM unnest(%s::text[]) AS id",
        exchange,
        routing_key,
        ids,
    )


def test_relay_publishes_with_properties_and_keeps_unroutable_internal_rows() -> None:
    with fresh_system() as system:
        events = EventListener(system.amqp_url).start()
        try:
            # Given 2,000 events and one timer whose delay queue does not exist
            ids = [str(uuid.uuid4()) for _ in range(2000)]
            insert_outbox(system, ids, "order.events", "test.ping")
            broken = str(uuid.uuid4())
            insert_outbox(system, [broken], "order.timers", "no-such-timer.1s")
            # When a consumer process (and so a relay) runs
            started = time.monotonic()
            system.start("order.unrouted")
            received = events.wait_for("test.ping", count=len(ids), timeout=60)
            elapsed = time.monotonic() - started
            # Then every event arrives with the contract's properties
            first = received[0]
            assert first.properties.type == "test.ping"
            assert first.properties.content_type == "application/json"
            assert first.properties.delivery_mode == 2
            assert first.properties.timestamp
            assert first.properties.headers == {"x-schema-version": 1}
            assert first.properties.correlation_id == f"corr-{first.properties.message_id}"
            assert {e.properties.message_id for e in received} >= set(ids)
            # And the row with no route stays unsent, with the reason
            deadline = time.monotonic() + 10
            while system.db.scalar("SELECT attempts FROM outbox WHERE message_id = %s", broken) == 0:
                assert time.monotonic() < deadline, "the relay never tried the unroutable row"
                time.sleep(0.1)
            row = system.db.one(
                "SELECT sent_at, last_error, attempts FROM outbox WHERE message_id = %s", broken
            )
            assert row["sent_at"] is None and "unroutable" in row["last_error"] and row["attempts"] >= 1
            assert system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 1
            print(f"relayed {len(ids)} events in {elapsed:.2f}s")
        finally:
            events.stop()
