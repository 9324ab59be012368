"""Graceful shutdown: SIGTERM finishes the messages in hand, flushes the outbox and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from consumers.registry import consumer_specs
from settings import Settings
from testing.broker import EventListener
from testing.invariants import assert_invariants
from testing.streams import order_bodies, seed_catalog, wait_settled
from testing.system import ROOT, fresh_system


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


def test_run_consumer_all_supervises_every_queue_and_stops_them_all() -> None:
    with fresh_system() as system:
        # Given `run_consumer.py --all` (what `make run` starts): one child per queue
        supervisor = subprocess.Popen(
            [sys.executable, "run_consumer.py", "--all"],
            cwd=ROOT,
            env={**os.environ, **system.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            system.wait_consuming(*consumer_specs(Settings()), timeout=60)
            # When it is told to stop
            started = time.monotonic()
            supervisor.send_signal(signal.SIGTERM)
            # Then every child stops and the supervisor exits 0, promptly
            assert supervisor.wait(timeout=60) == 0
            assert time.monotonic() - started < 30
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
