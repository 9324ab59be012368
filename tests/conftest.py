"""Fixtures: one isolated system (vhost + database + all consumers) per test session."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from consumers.amqp import allow_deep_headers
from testing.broker import EventListener
from testing.system import System, fresh_system

# Property tests judge the code, not the machine: a slow or busy CI box must not fail them
# on generation speed or per-example time.
settings.register_profile("order-centre", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("order-centre")

# The fuzz tests park messages with deeply nested headers; a test reading the parking lot
# later in the same session decodes them as the CLI does.
allow_deep_headers()

ALL_QUEUES = (
    "order.catalog",
    "order.placement",
    "order.payment",
    "order.fulfillment",
    "order.aftersale",
    "order.timeouts",
    "order.unrouted",
)


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def infrastructure() -> None:
    missing = [
        name
        for name, port in (("PostgreSQL", 5432), ("RabbitMQ", 5672), ("RabbitMQ management", 15672))
        if not _reachable(port)
    ]
    if missing:
        pytest.exit(
            f"{', '.join(missing)} not reachable on 127.0.0.1; run `make services` first", returncode=3
        )


@pytest.fixture(scope="session")
def system(infrastructure: None) -> Iterator[System]:
    """The service running every consumer in a fresh vhost and database, shared by a session."""
    with fresh_system() as sys_:
        sys_.start(*ALL_QUEUES)
        yield sys_


@pytest.fixture(scope="session")
def events(system: System) -> Iterator[EventListener]:
    listener = EventListener(system.amqp_url).start()
    yield listener
    listener.stop()
    assert listener.off_contract == [], "events published off their typed models"
