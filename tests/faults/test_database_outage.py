"""Fault test: PostgreSQL stopped for minutes while payments flow (issue 15, point 6).

A database outage is not the messages' fault: each consumer holds its window unacked and waits
the outage out with jittered backoff, without spending the retry budget meant for poison
messages. Afterwards every payment is applied and nothing is parked. Stops this machine's
PostgreSQL on purpose, so run it alone (`make test-faults`). PG_OUTAGE_SECONDS sets the
outage (240 s by default, longer than every retry step and the in-process transient budget
together).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import kombu.exceptions
import pytest

from testing.broker import EventListener
from testing.invariants import assert_invariants
from testing.streams import RECEIVER, seed_catalog
from testing.system import fresh_system, unique

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = float(os.environ.get("PG_OUTAGE_SECONDS", "240"))
ORDERS = 60


def _pg_ctl(action: str) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    fast = ["-m", "fast"] if action == "stop" else []
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *fast],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_payments_flowing_through_a_database_outage_are_all_applied() -> None:
    # Given a service whose transient budget and retry steps are far shorter than the outage
    with fresh_system(
        TRANSIENT_RETRY_SECONDS="5",
        RETRY_DELAYS="1s,2s",
        ORDER_PAYMENT_TIMEOUT="30m",
        HEARTBEAT="5",
    ) as system:
        system.start("order.catalog", "order.placement", "order.payment", "order.unrouted")
        events = EventListener(system.amqp_url).start()
        try:
            skus = seed_catalog(system, events, skus=10, units=20)
            orders = []
            with system.publisher() as pub:
                for i in range(ORDERS):
                    request_id = unique("oreq")
                    body = {
                        "request_id": request_id,
                        "user_id": f"ouser-{i % 7}",
                        "order_type": "physical",
                        "items": [{"sku": skus[i % len(skus)], "quantity": 1}],
                        "receiver": RECEIVER,
                    }
                    pub.send("order.place", body)
                    orders.append(request_id)
            created = [events.one("order.created", request_id=r, timeout=30) for r in orders]

            # When payments flow at a steady pace and PostgreSQL is stopped a few seconds in
            payment_ids: list[str] = []

            def pay_all() -> None:
                with system.publisher() as pub:
                    for order in created:
                        body = system.signed(
                            {
                                "order_no": order["order_no"],
                                "payment_no": unique("opay"),
                                "method": "card",
                                "amount": order["payable"],
                                "paid_at": datetime.now(UTC).isoformat(),
                            }
                        )
                        message_id = str(uuid.uuid4())
                        while True:
                            try:
                                pub.send("payment.notify", body, message_id=message_id)
                                break
                            except kombu.exceptions.OperationalError:
                                time.sleep(0.5)
                        payment_ids.append(message_id)
                        time.sleep(OUTAGE_SECONDS / 2 / ORDERS)

            payer = threading.Thread(target=pay_all)
            payer.start()
            time.sleep(3)
            _pg_ctl("stop")
            try:
                time.sleep(OUTAGE_SECONDS)
            finally:
                _pg_ctl("start")
            payer.join(timeout=120)
            assert len(payment_ids) == ORDERS

            # Then every payment is applied once the database is back, and nothing was parked
            paid = events.wait_for(
                "order.paid",
                count=ORDERS,
                where=lambda b: b["order_no"] in {o["order_no"] for o in created},
                timeout=240,
            )
            assert len({e.body["order_no"] for e in paid}) == ORDERS
            assert system.parked() == []
            assert not events.matching("command.rejected")
            assert_invariants(system, payment_ids)
            assert system.orders("check", check=False).returncode == 0
        finally:
            events.stop()


def test_a_consumer_stopped_during_an_outage_exits_and_leaves_its_window_to_the_next() -> None:
    # Given a payment consumer holding payments while PostgreSQL is down
    with fresh_system(TRANSIENT_RETRY_SECONDS="1", ORDER_PAYMENT_TIMEOUT="30m") as system:
        system.start("order.catalog", "order.placement", "order.payment", "order.unrouted")
        events = EventListener(system.amqp_url).start()
        try:
            skus = seed_catalog(system, events, skus=2, units=10)
            created = []
            for i in range(5):
                request_id = unique("sreq")
                body = {
                    "request_id": request_id,
                    "user_id": "suser",
                    "order_type": "physical",
                    "items": [{"sku": skus[i % 2], "quantity": 1}],
                    "receiver": RECEIVER,
                }
                system.send("order.place", body)
                created.append(events.one("order.created", request_id=request_id, timeout=30))
            _pg_ctl("stop")
            try:
                with system.publisher() as pub:
                    for order in created:
                        body = {
                            "order_no": order["order_no"],
                            "payment_no": unique("spay"),
                            "method": "card",
                            "amount": order["payable"],
                            "paid_at": datetime.now(UTC).isoformat(),
                        }
                        pub.send("payment.notify", system.signed(body))
                time.sleep(5)  # past the transient budget: the consumer is waiting the outage out

                # When it is asked to stop
                started = time.monotonic()
                codes = system.stop("order.payment", timeout=60)

                # Then it exits cleanly and promptly, without acking what it could not apply
                assert codes == {"order.payment": 0}
                assert time.monotonic() - started < 30
            finally:
                _pg_ctl("start")

            # And the next consumer applies every payment once the database is back, none parked
            system.start("order.payment")
            paid = events.wait_for(
                "order.paid",
                count=len(created),
                where=lambda b: b["order_no"] in {o["order_no"] for o in created},
                timeout=120,
            )
            assert len({e.body["order_no"] for e in paid}) == len(created)
            assert system.parked() == []
        finally:
            events.stop()
