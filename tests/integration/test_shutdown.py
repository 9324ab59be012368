"""Graceful shutdown: SIGTERM finishes the messages in hand, flushes the outbox and exits 0."""

from __future__ import annotations

import signal
import time

import pytest

from testing.broker import EventListener
from testing.invariants import assert_invariants
from testing.streams import order_bodies, seed_catalog, wait_settled
from testing.system import fresh_system


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_stream_exits_zero_and_loses_nothing(sig: int) -> None:
    with fresh_system(PREFETCH="50") as system:
        system.start("order.catalog", "order.placement")
        events = EventListener(system.amqp_url).start()
        try:
            skus = seed_catalog(system, events)
            # Given a stream of orders being consumed
            with system.publisher() as pub:
                ids = [pub.send("order.place", body) for body in order_bodies(skus, 400)]
            time.sleep(0.2)
            # When the placement consumer is told to stop in the middle of it
            started = time.monotonic()
            codes = system.stop("order.placement", "order.catalog", sig=sig)
            # Then both exit 0 within a bounded time, their relays having flushed the outbox
            assert codes == {"order.placement": 0, "order.catalog": 0}
            assert time.monotonic() - started < 20
            assert system.db.scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
            system.start("order.catalog")
            # And once restarted, every order is applied exactly once and every event sent
            system.start("order.placement")
            wait_settled(system, ids)
            assert_invariants(system, ids)
        finally:
            events.stop()
