"""The outbox relay: confirms awaited per batch, events with every contract property, broken routes kept."""

from __future__ import annotations

import itertools
import json
import time
import uuid

import psycopg2
import psycopg2.extensions

from testing.broker import EventListener
from testing.system import fresh_system


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


def test_timers_reach_their_delay_queue_in_due_order_with_several_relays() -> None:
    """A delay queue expires messages only at its head: several relays must not interleave timers."""
    from datetime import UTC, datetime, timedelta

    import pika

    from store.uow import timer_routing_key
    from topology import delay_queue_name

    timeout = timedelta(minutes=15)
    count = 3000
    with fresh_system(RELAY_BATCH="100", ORDER_PAYMENT_TIMEOUT="15m") as system:
        # Given 3,000 unsent payment timers whose due times rise with their outbox ids
        base = datetime.now(UTC) + timedelta(minutes=10)
        system.db.query(
            "INSERT INTO outbox (message_id, exchange, routing_key, body) "
            "SELECT 't-' || i, 'order.timers', %s, json_build_object('kind', 'payment-timeout', "
            "'ref', 'O' || i, 'due_at', to_char((%s::timestamptz + i * interval '1 millisecond') "
            "AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')) "
            "FROM generate_series(1, %s) AS i ORDER BY i",
            timer_routing_key("payment-timeout", timeout),
            base,
            count,
        )
        # When three processes, each with its relay, start together
        system.start("order.unrouted", wait=False)
        others = [system.start_another("order.unrouted") for _ in range(2)]
        try:
            deadline = time.monotonic() + 60
            while system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL") > 0:
                assert time.monotonic() < deadline, "the relays did not publish the timers"
                time.sleep(0.2)
        finally:
            for proc in others:
                proc.terminate()
                proc.wait(timeout=30)
        # Then the delay queue holds them in due order
        conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
        try:
            channel = conn.channel()
            queue = delay_queue_name("payment-timeout", timeout)
            dues = []
            while True:
                method, _props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                dues.append(datetime.fromisoformat(json.loads(body)["due_at"]))
        finally:
            conn.close()
        assert len(dues) == count
        out_of_order = sum(1 for a, b in itertools.pairwise(dues) if b < a)
        assert out_of_order == 0, f"{out_of_order} timers queued behind a later one"


def test_the_outbox_notify_names_its_writer_and_row_count(system) -> None:  # type: ignore[no-untyped-def]
    # Given a session listening on the outbox channel, and a writer named as a relayed process
    from publishers.relay import relayed_writer, wakes

    listener = psycopg2.connect(system.db.dsn)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    writer_name = relayed_writer(424242)
    writer = psycopg2.connect(system.db.dsn, application_name=writer_name)
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN outbox")
        # When it inserts three rows in one statement (marked sent, so no relay publishes them)
        with writer, writer.cursor() as cur:
            cur.execute(
                "INSERT INTO outbox (message_id, exchange, routing_key, body, sent_at) "
                "SELECT gen_random_uuid()::text, 'order.events', 'test.notify', '{}', now() "
                "FROM generate_series(1, 3)"
            )
        # Then the payload names it and the count, as the relays read it
        deadline = time.monotonic() + 10
        payloads: list[str] = []
        while writer_name + " 3" not in payloads and time.monotonic() < deadline:
            listener.poll()
            payloads += [n.payload for n in listener.notifies]
            listener.notifies.clear()
            time.sleep(0.05)
        assert writer_name + " 3" in payloads
        assert wakes(writer_name + " 3", writer_name)
        assert not wakes(writer_name + " 3", relayed_writer(1))
    finally:
        writer.close()
        listener.close()
