"""Fault tests: a stream of orders while the service, the broker or the database fails.

After each fault, I1-I4 hold (testing/invariants.py). These tests restart the local
RabbitMQ and PostgreSQL, so they are meant to run alone: `make test-faults`.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kombu.exceptions
import pytest

from publishers.commands import CommandPublisher
from testing.broker import AMQP_BASE, EventListener
from testing.invariants import assert_invariants
from testing.streams import order_bodies, seed_catalog, wait_settled
from testing.system import System, fresh_system, unique
from testing.tcp_proxy import TcpProxy

pytestmark = pytest.mark.faults

QUEUES = ("order.catalog", "order.placement", "order.unrouted")
FAULT_ENV = {
    "HEARTBEAT": "2",
    "TRANSIENT_RETRY_SECONDS": "60",
    "PREFETCH": "20",
    "ORDER_PAYMENT_TIMEOUT": "10m",
}


def stream(system: System, bodies: list[dict], per_second: float, duplicate: bool = False) -> list[str]:
    """Publish the orders at a steady pace with confirms; returns their message ids."""
    ids = []
    with system.publisher() as pub:
        for body in bodies:
            message_id = str(uuid.uuid4())
            for _ in range(2 if duplicate else 1):
                send_until_confirmed(pub, body, message_id)
            ids.append(message_id)
            time.sleep(1 / per_second)
    return ids


def send_until_confirmed(pub: CommandPublisher, body: dict, message_id: str, patience: float = 90) -> None:
    """A producer that keeps its message id and tries again until the broker confirms it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            pub.send("order.place", body, message_id=message_id)
            return
        except kombu.exceptions.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_outbox_drained(system: System, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0:
            return
        time.sleep(0.3)
    raise AssertionError("outbox never drained")


@pytest.fixture
def faulty() -> Iterator[tuple[System, EventListener]]:
    with fresh_system(**FAULT_ENV) as system:
        system.start(*QUEUES)
        listener = EventListener(system.amqp_url).start()
        yield system, listener
        listener.stop()


def run_with_fault(
    system: System,
    events: EventListener,
    fault: Callable[[], None],
    count: int = 300,
    per_second: float = 100,
    duplicate: bool = False,
) -> list[str]:
    """Stream orders, inject the fault a third of the way in, then check I1-I4."""
    skus = seed_catalog(system, events)
    bodies = order_bodies(skus, count)
    ids: list[str] = []
    publisher = threading.Thread(target=lambda: ids.extend(stream(system, bodies, per_second, duplicate)))
    publisher.start()
    time.sleep(count / per_second / 3)
    fault()
    publisher.join(timeout=120)
    assert len(ids) == count, "the publisher did not get every confirm"
    wait_settled(system, ids)
    wait_outbox_drained(system)
    assert_invariants(system, ids)
    created = system.db.scalar("SELECT count(*) FROM orders WHERE user_id LIKE 'fuser-%'")
    assert 0 < created <= count
    result = system.orders("check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return ids


def test_kill_9_consumer_mid_stream(faulty: tuple[System, EventListener]) -> None:
    system, events = faulty

    def kill_and_restart() -> None:
        system.kill("order.placement")
        time.sleep(0.5)
        system.start("order.placement")

    run_with_fault(system, events, kill_and_restart)


def test_every_delivery_duplicated(faulty: tuple[System, EventListener]) -> None:
    system, events = faulty
    ids = run_with_fault(system, events, lambda: None, count=150, duplicate=True)
    assert system.db.scalar("SELECT count(*) FROM processed_messages WHERE message_id = ANY(%s)", ids) == len(
        ids
    )


def test_kill_relay_between_publish_and_marking_sent(faulty: tuple[System, EventListener]) -> None:
    system, events = faulty
    # Given many events waiting in the outbox and no relay running
    system.stop(*QUEUES)
    ids = [str(uuid.uuid4()) for _ in range(3000)]
    system.db.query(
        "INSERT INTO outbox (message_id, exchange, routing_key, correlation_id, body, headers) "
        "SELECT id, 'order.events', 'test.ping', id, json_build_object('n', id), '{\"x-schema-version\": 1}' "
        "FROM unnest(%s::text[]) AS id",
        ids,
    )
    # When a relay starts and is killed -9 in the middle of publishing (small batches, so that it
    # is still publishing when the first batch is seen marked, however fast the machine)
    system.start("order.unrouted", env={"RELAY_BATCH": "50"})
    deadline = time.monotonic() + 30
    while system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    system.kill("order.unrouted")
    partly = system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    # Then a new relay publishes the rest, and every event arrives at least once, same message id
    system.start("order.unrouted")
    wait_outbox_drained(system)
    events.wait_for("test.ping", count=len(ids), timeout=60)
    received = {e.properties.message_id for e in events.matching("test.ping")}
    assert received >= set(ids)
    assert partly > 0
    assert system.orders("check", check=False).returncode == 0


def _rabbit_restart() -> None:
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    time.sleep(2)
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)


def test_rabbitmq_restart_mid_stream(faulty: tuple[System, EventListener]) -> None:
    system, events = faulty
    run_with_fault(system, events, _rabbit_restart)


def _postgres_restart() -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_postgres_restart_mid_stream(faulty: tuple[System, EventListener]) -> None:
    system, events = faulty
    run_with_fault(system, events, _postgres_restart)


@pytest.mark.parametrize("target", ["broker", "database"])
def test_connections_cut_and_restored(target: str) -> None:
    port = 5672 if target == "broker" else 5432
    with TcpProxy("127.0.0.1", port) as proxy, fresh_system(**FAULT_ENV) as system:
        # Given the consumers reach the broker (or the database) through a proxy we control
        if target == "broker":
            proxied = {
                "AMQP_URL": f"{AMQP_BASE.replace(':5672', f':{proxy.port}')}/"
                f"{urllib.parse.quote(system.vhost, safe='')}"
            }
        else:
            proxied = {"DATABASE_URL": system.env["DATABASE_URL"].replace(":5432", f":{proxy.port}")}
        system.start(*QUEUES, env=proxied)
        events = EventListener(system.amqp_url).start()

        def cut() -> None:
            # When every connection is cut for two seconds
            proxy.cut()
            time.sleep(2)
            proxy.restore()

        try:
            # Then the service reconnects by itself and I1-I4 hold
            run_with_fault(system, events, cut)
        finally:
            events.stop()


def test_commands_for_an_order_that_does_not_exist_yet() -> None:
    with fresh_system(**FAULT_ENV) as system:
        queues = ("order.payment", "order.fulfillment", "order.aftersale", "order.unrouted")
        system.start(*queues)
        events = EventListener(system.amqp_url).start()
        try:
            # Given no order O-future yet
            ghost = unique("O-future")
            commands = {
                "payment.notify": system.signed(
                    {
                        "order_no": ghost,
                        "payment_no": unique("p"),
                        "method": "card",
                        "amount": 100,
                        "paid_at": "2026-11-26T10:00:00Z",
                    }
                ),
                "order.cancel": {"order_no": ghost, "user_id": "u", "reason": "changed my mind"},
                "order.update-address": {
                    "order_no": ghost,
                    "user_id": "u",
                    "receiver": {"name": "n", "phone": "1", "address": "a"},
                },
                "order.ship": {"order_no": ghost, "carrier": "SF", "tracking_no": "T1"},
                "logistics.update": {
                    "order_no": ghost,
                    "tracking_no": "T1",
                    "status": "IN_TRANSIT",
                    "at": "2026-11-26T10:00:00Z",
                    "detail": "hub",
                },
                "order.confirm-receipt": {"order_no": ghost, "user_id": "u"},
                "aftersale.request": {
                    "order_no": ghost,
                    "user_id": "u",
                    "kind": "REFUND_ONLY",
                    "amount": 1,
                    "reason": "broken",
                },
                "merchant.cancel": {"order_no": ghost, "merchant_id": "M", "reason": "no stock"},
            }
            # When commands about it arrive (out of order, before the order exists)
            ids = {key: system.send(key, body) for key, body in commands.items()}
            # Then each is answered with a business refusal, none is parked, nothing is lost
            for key, message_id in ids.items():
                deadline = time.monotonic() + 15
                while not events.for_correlation(message_id):
                    assert time.monotonic() < deadline, f"{key} got no answer"
                    time.sleep(0.1)
                answer = events.for_correlation(message_id)[0]
                assert answer.routing_key in {"payment.rejected", "order.rejected"}, (key, answer.routing_key)
                assert answer.body["reason"] == "UNKNOWN_ORDER", (key, answer.body)
            assert_invariants(system, ids.values())
            assert not [p for p, _ in system.parked() if p.message_id in ids.values()]
            assert all(proc.poll() is None for proc in system.processes.values())
            assert system.orders("check").returncode == 0
        finally:
            events.stop()
