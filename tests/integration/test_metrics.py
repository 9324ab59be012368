"""A consumer with METRICS_PORT serves Prometheus counters that move with its messages, and /healthz."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.builders import props
from testing.database import admin_execute
from testing.system import System, fresh_system, unique

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
QUEUE = "order.catalog"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> Samples:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], Any], timeout: float = 20) -> Any:
    """The check's result once it stops raising AssertionError (or its last failure)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="module")
def metered(infrastructure: None) -> Iterator[tuple[System, int]]:
    """A catalog consumer of its own (fresh vhost and database) with METRICS_PORT set."""
    port = free_port()
    with fresh_system() as system:
        system.start(QUEUE, env={"METRICS_PORT": str(port)})
        yield system, port


def test_counters_move_by_outcome_with_queue_and_routing_key(metered: tuple[System, int]) -> None:
    system, port = metered
    sku = unique("SKU")
    upsert = {"sku": sku, "name": "tea", "unit_price": 100, "merchant_id": "M1", "warehouse_id": "W1"}
    # Given a valid command, the same command again (same message_id) and an invalid one
    message_id = str(uuid.uuid4())
    system.send("sku.upsert", upsert, message_id=message_id)
    system.send("sku.upsert", upsert, message_id=message_id)
    bad = str(uuid.uuid4())
    bad_body = json.dumps({"sku": sku, "warehouse_id": "W1", "quantity": 0}).encode()
    system.publish_raw("stock.restock", bad_body, props(bad, "stock.restock"))
    system.wait_parked(bad)

    # Then the counters say: two consumed, one applied, one duplicate, one parked with its code
    def counted() -> Samples:
        s = scrape(port)
        upserts = {"queue": QUEUE, "routing_key": "sku.upsert"}
        assert value(s, "order_messages_consumed_total", **upserts) == 2
        assert value(s, "order_messages_applied_total", **upserts) == 1
        assert value(s, "order_messages_duplicate_total", **upserts) == 1
        restock = {"queue": QUEUE, "routing_key": "stock.restock"}
        assert value(s, "order_messages_parked_total", **restock, code="SCHEMA_INVALID") == 1
        assert value(s, "order_handler_seconds_count", **upserts) >= 2
        # And the relay published what the commands caused (the parked one's command.rejected too)
        events = {"exchange": "order.events"}
        assert value(s, "order_relay_published_total", **events, routing_key="sku.upserted") == 1
        assert value(s, "order_relay_published_total", **events, routing_key="command.rejected") == 1
        return s

    samples = eventually(counted)
    assert value(samples, "order_window_seconds_count", queue=QUEUE) >= 1
    assert value(samples, "order_consumer_connected", queue=QUEUE) == 1
    assert ("process_resident_memory_bytes", frozenset()) in samples


def test_database_gauges_are_sampled(metered: tuple[System, int]) -> None:
    _, port = metered

    # The sampler runs every 5 s: every kind and status has a series, the outbox drains to zero
    def sampled() -> None:
        s = scrape(port)
        assert value(s, "order_last_sample_timestamp_seconds") > 0
        for kind in ("payment-timeout", "auto-confirm", "aftersale-review"):
            assert ("order_timers_pending", frozenset({("kind", kind)})) in s
        assert ("order_orders", frozenset({("status", "PENDING_PAYMENT"), ("level", "parent")})) in s
        assert value(s, "order_outbox_backlog") == 0

    eventually(sampled, timeout=30)


def test_healthz_follows_the_database(metered: tuple[System, int]) -> None:
    system, port = metered
    url = f"http://127.0.0.1:{port}/healthz"
    # Given a consuming process with its database up, /healthz is 200 with JSON
    status, body = get(url)
    assert status == 200, body
    health = json.loads(body)
    assert health["status"] == "ok" and health["consumer"] == "connected" and health["database"] == "ok"
    # When the database refuses connections
    admin_execute(f'ALTER DATABASE "{system.db_name}" ALLOW_CONNECTIONS false')
    try:
        admin_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{system.db_name}' AND pid <> pg_backend_pid()"
        )
        # Then /healthz is 503 and says why
        status, body = eventually(lambda: _expect_status(url, 503))
        assert json.loads(body)["database"] != "ok"
        # And the relay's lost database connection is counted as a reconnect
        eventually(lambda: _expect_reconnect(port))
    finally:
        admin_execute(f'ALTER DATABASE "{system.db_name}" ALLOW_CONNECTIONS true')
    # And it is healthy again once the database is back
    eventually(lambda: _expect_status(url, 200))


def _expect_status(url: str, expected: int) -> tuple[int, bytes]:
    status, body = get(url)
    assert status == expected, body
    return status, body


def _expect_reconnect(port: int) -> None:
    s = scrape(port)
    assert value(s, "order_reconnects_total", component="relay", peer="database") >= 1
