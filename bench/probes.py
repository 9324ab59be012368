"""Lean probes: end-to-end latency and timer lateness without the bench harness's own load.

    python -m bench.probes latency [SECONDS]    # 200 orders/s, publish -> order.created
    python -m bench.probes timers [ORDERS]      # a burst left unpaid (5 s), deadline -> order.cancelled
    python -m bench.probes timers-fast [ORDERS] # the same burst published with confirms outstanding
    python -m bench.probes timers-stages [ORDERS]        # the burst's lateness split by stage
    python -m bench.probes timers-fast-stages [ORDERS]   # the same, published at full speed

One publisher thread (kombu, a confirm per command) and one pika consumer thread that only
timestamps the event it waits for; the service runs as catalog + 2 placement processes
(+ timeouts), like the bench scenarios.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import pika

from testing.broker import EventListener, timer_refs
from testing.system import System, clean_up_on_sigterm, fresh_system

SKUS = [f"probe-{i}" for i in range(200)]


@contextmanager
def service(*queues: str, **env: str) -> Iterator[System]:
    with fresh_system(LOG_LEVEL="WARNING", **env) as system:
        system.start("order.catalog", "order.placement", *queues)
        second = system.start_another("order.placement")
        try:
            events = EventListener(system.amqp_url).start()
            with system.publisher() as pub:
                for i, sku in enumerate(SKUS):
                    pub.send(
                        "sku.upsert",
                        {
                            "sku": sku,
                            "name": sku,
                            "unit_price": 100 + i,
                            "merchant_id": f"M{i % 5}",
                            "warehouse_id": f"W{i % 5}",
                        },
                    )
                    pub.send(
                        "stock.restock", {"sku": sku, "warehouse_id": f"W{i % 5}", "quantity": 1_000_000}
                    )
            events.wait_for("stock.restocked", count=len(SKUS), timeout=60)
            events.stop()
            yield system
        finally:
            second.terminate()
            second.wait(timeout=30)


@contextmanager
def receipts(
    system: System,
    key: str,
    idents: Callable[[pika.BasicProperties, bytes], list[str]],
    exchange: str = "order.events",
) -> Iterator[dict]:
    """Receipt times of one message kind, by each of its `idents`, taken in a thread that does
    nothing else."""
    got: dict[str, datetime] = {}
    ready, stop = threading.Event(), threading.Event()

    def listen() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(queue, exchange, key)

        def on_message(_c: object, _m: object, props: pika.BasicProperties, body: bytes) -> None:
            now = datetime.now(UTC)
            for ident in idents(props, body):
                got[ident] = now

        ch.basic_consume(queue, on_message, auto_ack=True)
        ready.set()
        while not stop.is_set():
            conn.process_data_events(0.1)
        conn.close()

    threading.Thread(target=listen, daemon=True).start()
    ready.wait(15)
    try:
        yield got
    finally:
        stop.set()


def summary(values_ms: list[float]) -> dict[str, Any]:
    values = sorted(values_ms)
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(values[int(len(values) * 0.99)], 1),
        "max_ms": round(values[-1], 1),
    }


def order(rng: random.Random, request_id: str) -> dict[str, Any]:
    items = [{"sku": rng.choice(SKUS), "quantity": rng.randint(1, 3)} for _ in range(rng.randint(1, 3))]
    return {
        "request_id": request_id,
        "user_id": f"u{rng.randrange(1000)}",
        "order_type": "physical",
        "items": items,
        "receiver": {"name": "Probe", "phone": "1", "address": "1 Probe Road"},
    }


def latency(seconds: int = 20, rate: int = 200) -> dict[str, Any]:
    rng = random.Random(1)
    sent: dict[str, datetime] = {}
    with (
        service(ORDER_PAYMENT_TIMEOUT="15m") as system,
        receipts(system, "order.created", lambda props, _body: str(props.correlation_id)) as got,
        system.publisher() as pub,
    ):
        next_at = time.monotonic()
        for _ in range(seconds * rate):
            message_id = str(uuid.uuid4())
            sent[message_id] = datetime.now(UTC)
            pub.send("order.place", order(rng, message_id), message_id=message_id)
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
        result = summary([(got[m] - t).total_seconds() * 1000 for m, t in sent.items() if m in got])
        # p50 / p99 of each 10 s of publishing: a drift over the run shows here.
        start = min(sent.values())
        buckets: dict[int, list[float]] = {}
        for m, t in sent.items():
            if m in got:
                buckets.setdefault(int((t - start).total_seconds() // 10), []).append(
                    (got[m] - t).total_seconds() * 1000
                )
        result["by_10s_p50_p99_ms"] = [
            [s["p50_ms"], s["p99_ms"]] for s in (summary(values) for _, values in sorted(buckets.items()))
        ]
        return result


def timers(count: int = 5000, fast: bool = False, stages: bool = False) -> dict[str, Any]:
    """Unpaid orders' lateness; `fast` publishes the burst with 1,000 confirms outstanding (as the
    bench harness does), so their deadlines fall as fast as the service can place them.

    `stages` also splits each order's lateness where the service leaves a timestamp:
      fired:  deadline -> the timer dead-lettered (a listener bound to the fired-timers
              exchange); negative when it left TIMER_LEAD_MS early to wait in the consumer
      queued: fired -> the timeouts consumer's window starts (orders.cancelled_at)
      start:  deadline -> the window starts: the consumer's own lateness (the sum of the two)
      window: window start -> the relay's claim of the event (outbox.sent_at, the claim's now())
      relay:  the claim -> order.cancelled received (publish, confirm, delivery)
    The whole lateness is start + window + relay.
    """
    rng = random.Random(2)
    with (
        service("order.timeouts", ORDER_PAYMENT_TIMEOUT="5s", SWEEPER_GRACE="60s") as system,
        receipts(system, "order.cancelled", lambda _props, body: [json.loads(body)["order_no"]]) as got,
        (
            receipts(system, "timer.#", lambda _p, body: timer_refs(body), "order.timers.fired")
            if stages
            else nullcontext({})
        ) as fired,
    ):
        if fast:
            from bench.common import commands, publish_async

            publish_async(
                system.amqp_url,
                commands("order.place", [order(rng, str(uuid.uuid4())) for _ in range(count)]),
            )
        else:
            with system.publisher() as pub:
                for _ in range(count):
                    pub.send("order.place", order(rng, str(uuid.uuid4())))
        deadline = time.monotonic() + 120
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        rows = [
            r
            for r in system.db.query(
                "SELECT o.order_no, o.placed_at, o.pay_deadline, o.cancelled_at, x.sent_at AS event_sent_at "
                "FROM orders o LEFT JOIN outbox x ON x.routing_key = 'order.cancelled' "
                "AND x.body->>'order_no' = o.order_no WHERE o.parent_no IS NULL"
            )
            if r["order_no"] in got
        ]
        result = summary([(got[r["order_no"]] - r["pay_deadline"]).total_seconds() * 1000 for r in rows])
        result["placed_in_s"] = round(
            (max(r["placed_at"] for r in rows) - min(r["placed_at"] for r in rows)).total_seconds(), 2
        )
        if stages:
            split = [r for r in rows if r["order_no"] in fired and r["event_sent_at"] is not None]
            marks = [
                ("fired", lambda r: r["pay_deadline"], lambda r: fired[r["order_no"]]),
                ("queued", lambda r: fired[r["order_no"]], lambda r: r["cancelled_at"]),
                ("start", lambda r: r["pay_deadline"], lambda r: r["cancelled_at"]),
                ("window", lambda r: r["cancelled_at"], lambda r: r["event_sent_at"]),
                ("relay", lambda r: r["event_sent_at"], lambda r: got[r["order_no"]]),
            ]
            result["stages"] = {
                name: summary([(end(r) - start(r)).total_seconds() * 1000 for r in split])
                for name, start, end in marks
            }
        return result


if __name__ == "__main__":
    clean_up_on_sigterm()
    which = sys.argv[1] if len(sys.argv) > 1 else "latency"
    arg = [int(sys.argv[2])] if len(sys.argv) > 2 else []
    probes: dict[str, Callable[..., dict[str, Any]]] = {
        "latency": latency,
        "timers": timers,
        "timers-fast": lambda *a: timers(*a, fast=True),
        "timers-stages": lambda *a: timers(*a, stages=True),
        "timers-fast-stages": lambda *a: timers(*a, fast=True, stages=True),
    }
    print(json.dumps({which: probes[which](*arg)}))
