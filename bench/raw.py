"""Scenario 1, the raw floor: what pika and psycopg2 alone reach on this machine, in this run.

Every later scenario prints its ratio against these numbers, so they are measured in the same
run (when scenario 1 is not chosen, a quick version of it runs first).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import psycopg2
import psycopg2.extras

from bench import common as c
from testing.system import System, fresh_system

FLOOR_QUEUE = "bench.floor"
SKUS = c.sku_names(200)
PRICES = {s: 1000 + 37 * i for i, s in enumerate(SKUS)}
WAREHOUSES = {s: f"W{i % 5}" for i, s in enumerate(SKUS)}
MERCHANTS = {s: f"M{i % 5}" for i, s in enumerate(SKUS)}
PAY_TIMEOUT = timedelta(minutes=15)


# --------------------------------------------------------------------------------------------
# The order-placing SQL, with psycopg2 alone


def place_sql(cur: Any, consumer: str, message_id: str, body: dict[str, Any]) -> bool:
    """Dedup insert, conditional stock update per line, order + items insert, outbox insert.

    Runs inside the caller's transaction; False when the message was a duplicate or out of stock.
    """
    cur.execute(
        "INSERT INTO processed_messages (consumer, message_id, routing_key) VALUES (%s, %s, 'order.place') "
        "ON CONFLICT DO NOTHING",
        (consumer, message_id),
    )
    if cur.rowcount != 1:
        return False
    lines = sorted(body["items"], key=lambda i: i["sku"])
    for line in lines:
        cur.execute(
            "UPDATE stock SET available = available - %s, locked = locked + %s "
            "WHERE sku = %s AND warehouse_id = %s AND available >= %s",
            (line["quantity"], line["quantity"], line["sku"], WAREHOUSES[line["sku"]], line["quantity"]),
        )
        if cur.rowcount != 1:
            return False
    now = datetime.now(UTC)
    order_no = "R" + uuid.uuid4().hex[:20]
    items = [
        (
            order_no,
            n,
            i["sku"],
            f"Item {i['sku']}",
            MERCHANTS[i["sku"]],
            WAREHOUSES[i["sku"]],
            PRICES[i["sku"]],
            i["quantity"],
            PRICES[i["sku"]] * i["quantity"],
        )
        for n, i in enumerate(body["items"], start=1)
    ]
    goods = sum(i[-1] for i in items)
    cur.execute(
        "INSERT INTO orders (order_no, user_id, request_id, order_type, status, goods_total, freight, "
        "discount_total, payable, receiver, pay_deadline, placed_at, updated_at) "
        "VALUES (%s,%s,%s,%s,'PENDING_PAYMENT',%s,0,0,%s,%s,%s,%s,%s)",
        (
            order_no,
            body["user_id"],
            body["request_id"],
            body["order_type"],
            goods,
            goods,
            json.dumps(body["receiver"]),
            now + PAY_TIMEOUT,
            now,
            now,
        ),
    )
    psycopg2.extras.execute_values(
        cur,
        "INSERT INTO order_items (order_no, line_no, sku, name, merchant_id, warehouse_id, unit_price, "
        "quantity, line_total) VALUES %s",
        items,
    )
    created = {
        "order_no": order_no,
        "request_id": body["request_id"],
        "user_id": body["user_id"],
        "payable": goods,
        "pay_deadline": (now + PAY_TIMEOUT).isoformat(),
        "items": body["items"],
    }
    outbox = [
        (str(uuid.uuid4()), "order.events", "order.created", message_id, json.dumps(created)),
        (str(uuid.uuid4()), "order.events", "stock.locked", message_id, json.dumps({"order_no": order_no})),
        (
            str(uuid.uuid4()),
            "order.timers",
            "payment-timeout.15m",
            message_id,
            json.dumps({"kind": "payment-timeout", "ref": order_no}),
        ),
    ]
    psycopg2.extras.execute_values(
        cur,
        "INSERT INTO outbox (message_id, exchange, routing_key, correlation_id, body, headers) VALUES %s",
        [(*row, '{"x-schema-version": 1}') for row in outbox],
    )
    return True


def _sql_worker(dsn: str, bodies: list[dict[str, Any]], start: Any, out: Any) -> None:
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.commit()
    start.wait()
    t0 = time.monotonic()
    with conn.cursor() as cur:
        for body in bodies:
            place_sql(cur, "bench.sql", str(uuid.uuid4()), body)
            conn.commit()
    out.put((t0, time.monotonic(), len(bodies)))
    conn.close()


def sql_floor(system: System, bodies: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    """One transaction per order in `connections` processes; orders per second."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    share = [bodies[i::connections] for i in range(connections)]
    procs = [ctx.Process(target=_sql_worker, args=(system.db.dsn, s, start, out)) for s in share]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every process connect
    before = c.scalar(system, "SELECT count(*) FROM orders")
    start.set()
    c.wait_with_bar(
        f"SQL alone, {connections} connection(s)",
        len(bodies),
        lambda: int(c.scalar(system, "SELECT count(*) FROM orders")) - before,
        600,
        interval=0.5,
    )
    spans = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(s[1] for s in spans) - min(s[0] for s in spans)
    return {"orders": len(bodies), "seconds": elapsed, "per_s": len(bodies) / elapsed}


# --------------------------------------------------------------------------------------------
# Broker alone


def publish_sync(url: str, messages: Sequence[c.Outgoing]) -> dict[str, Any]:
    """BlockingConnection in confirm mode: each basic_publish waits for its confirm."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    with c.progress() as bar:
        task = bar.add_task("pika publish, confirm per message", total=len(messages), rate="")
        t0 = time.monotonic()
        for i, m in enumerate(messages, start=1):
            ch.basic_publish(m.exchange, m.routing_key, m.body, m.properties)
            if i % 200 == 0 or i == len(messages):
                bar.update(task, completed=i, rate=f"{i / (time.monotonic() - t0):,.0f}/s")
        elapsed = time.monotonic() - t0
    conn.close()
    return {"messages": len(messages), "seconds": elapsed, "per_s": len(messages) / elapsed}


def consume_ack(url: str, queue: str, count: int, prefetch: int = 200) -> dict[str, Any]:
    """Consume `count` messages with one basic_ack per message."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    done = [0]

    def on_message(chan: Any, method: Any, _props: Any, _body: bytes) -> None:
        chan.basic_ack(method.delivery_tag)
        done[0] += 1

    with c.progress() as bar:
        task = bar.add_task("pika consume, ack per message", total=count, rate="")
        t0 = time.monotonic()
        ch.basic_consume(queue, on_message)
        while done[0] < count:
            conn.process_data_events(time_limit=0.1)
            bar.update(task, completed=done[0], rate=f"{done[0] / (time.monotonic() - t0):,.0f}/s")
        elapsed = time.monotonic() - t0
    conn.close()
    return {"messages": count, "seconds": elapsed, "per_s": count / elapsed}


def ttl_floor(system: System, count: int, ttl_ms: int) -> dict[str, Any]:
    """Lateness of expiry from a quorum delay queue (the topology's kind) dead-lettered to a consumer."""
    conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    ch = conn.channel()
    ch.exchange_declare("bench.fired", "fanout", durable=True)
    ch.queue_declare("bench.fired", durable=True)
    ch.queue_bind("bench.fired", "bench.fired")
    ch.queue_declare(
        "bench.delay",
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-message-ttl": ttl_ms,
            "x-dead-letter-exchange": "bench.fired",
        },
    )
    conn.close()
    received: dict[str, float] = {}

    def consume() -> None:
        cn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
        chn = cn.channel()
        chn.basic_consume(
            "bench.fired",
            lambda _c, _m, p, _b: received.__setitem__(p.message_id, time.monotonic()),
            auto_ack=True,
        )
        deadline = time.monotonic() + ttl_ms / 1000 + 120
        while len(received) < count and time.monotonic() < deadline:
            cn.process_data_events(time_limit=0.1)
        cn.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    msgs = [
        c.Outgoing("", "bench.delay", b"{}", c.command_properties("bench.timer", str(uuid.uuid4())))
        for _ in range(count)
    ]
    pub = c.publish_async(system.amqp_url, msgs, window=200, rate=count / 2.0)
    c.wait_with_bar(
        "TTL expiry through a quorum delay queue", count, lambda: len(received), ttl_ms / 1000 + 120
    )
    thread.join(timeout=5)
    late = [received[m] - (pub.sent_at[m] + ttl_ms / 1000) for m in received]
    return {"messages": count, "ttl_ms": ttl_ms, **c.summary_ms(late)}


# --------------------------------------------------------------------------------------------
# A raw pipeline: 2 processes doing consume, that SQL, commit, (event), ack, one message at a time


@dataclass(frozen=True)
class _PipelineJob:
    """What a raw pipeline worker consumes, and what it writes to (picklable: spawned workers)."""

    amqp_url: str
    dsn: str
    queue: str
    publish_event: bool


def _pipeline_worker(job: _PipelineJob, ready: Any, stop: Any, done: Any, cpu_out: Any) -> None:
    db = psycopg2.connect(job.dsn)
    conn = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=200)
    events = conn.channel()
    events.confirm_delivery()

    def on_message(chan: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        order = json.loads(body)
        with db.cursor() as cur:
            place_sql(cur, "bench.pipeline", props.message_id, order)
        db.commit()
        if job.publish_event:  # the naive relay: one event, its confirm awaited
            events.basic_publish(
                "order.events",
                "order.created",
                json.dumps({"request_id": order["request_id"], "user_id": order["user_id"]}).encode(),
                pika.BasicProperties(
                    message_id=str(uuid.uuid4()),
                    correlation_id=props.message_id,
                    type="order.created",
                    content_type="application/json",
                    delivery_mode=2,
                    headers={"x-schema-version": 1},
                ),
            )
        chan.basic_ack(method.delivery_tag)
        with done.get_lock():
            done.value += 1

    ch.basic_consume(job.queue, on_message)
    ready.set()
    while not stop.is_set():
        conn.process_data_events(time_limit=0.2)
    conn.close()
    db.close()
    import os

    cpu_out.put(c.cpu_seconds(os.getpid()))


class RawPipeline:
    """Two worker processes consuming `queue` (order.placement, with no service consumer on it)."""

    def __init__(self, system: System, queue: str, publish_event: bool, workers: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.stop, self.done, self.cpu = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
        readies = [ctx.Event() for _ in range(workers)]
        job = _PipelineJob(system.amqp_url, system.db.dsn, queue, publish_event)
        self.procs = [
            ctx.Process(target=_pipeline_worker, args=(job, r, self.stop, self.done, self.cpu))
            for r in readies
        ]
        for p in self.procs:
            p.start()
        for r in readies:
            if not r.wait(30):
                raise RuntimeError("raw pipeline worker did not start")

    def close(self) -> float:
        """Stop the workers; returns their CPU seconds."""
        self.stop.set()
        cpu = sum(self.cpu.get(timeout=30) for _ in self.procs)
        for p in self.procs:
            p.join(timeout=10)
        return cpu


def run_pipeline(
    system: System,
    bodies: list[dict[str, Any]],
    publish_event: bool,
    rate: float | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Publish the orders (confirms outstanding) into the raw pipeline; time to the last commit
    (or the last order.created received when the workers publish events)."""
    listener, events = c.start_listener(system) if publish_event else (None, None)
    pipeline = RawPipeline(system, "order.placement", publish_event)
    result: dict[str, Any] = {}
    try:
        msgs = c.commands("order.place", bodies)
        box: dict[str, Any] = {}
        pub_thread = threading.Thread(
            target=lambda: box.__setitem__("pub", c.publish_async(system.amqp_url, msgs, rate=rate)),
            daemon=True,
        )
        t0 = time.monotonic()
        with c.gc_paused():
            pub_thread.start()
            if publish_event:
                assert events is not None
                end = c.wait_with_bar(
                    label or "raw pipeline + naive event",
                    len(msgs),
                    lambda: events.by_key.get("order.created", 0),
                    900,
                    interval=0.1,
                    started=t0,
                )
            else:
                end = c.wait_with_bar(
                    label or "raw pipeline",
                    len(msgs),
                    lambda: pipeline.done.value,
                    900,
                    interval=0.05,
                    started=t0,
                )
            pub_thread.join()
        pub: c.PublishResult = box["pub"]
        elapsed = end - pub.started
        result.update(
            {"orders": len(msgs), "seconds": elapsed, "per_s": len(msgs) / elapsed, "publish_per_s": pub.rate}
        )
        if publish_event and events is not None:
            lat = [
                (
                    pub.sent_at[e.properties.correlation_id] - pub.started,
                    m - pub.sent_at[e.properties.correlation_id],
                )
                for e, m, _ in c.receipts(events, "order.created")
            ]
            result["latency"] = c.summary_ms([v for _, v in lat])
            result["_points"] = lat
    finally:
        result["worker_cpu_s"] = pipeline.close()
        result["cpu_ms_per_order"] = 1000 * result["worker_cpu_s"] / len(bodies)
        if listener is not None:
            listener.stop()
    return result


# --------------------------------------------------------------------------------------------
# The scenario


def run(ctx: c.Context, full: bool = True) -> dict[str, Any]:
    """Measure the floor; `full=False` is the quick version other scenarios run first."""
    quick = ctx.quick or not full
    n = lambda f, q: q if quick else f  # noqa: E731
    rng = random.Random(1)
    floor: dict[str, Any] = {"quick": quick}
    with fresh_system() as system:
        c.seed_catalog_sql(system, SKUS, 10_000_000)
        conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
        conn.channel().queue_declare(FLOOR_QUEUE, durable=True)
        conn.close()
        body = json.dumps(c.order_body(rng, SKUS)).encode()

        def floor_msgs(count: int) -> list[c.Outgoing]:
            return [
                c.Outgoing("", FLOOR_QUEUE, body, c.command_properties("order.place", str(uuid.uuid4())))
                for _ in range(count)
            ]

        floor["publish_sync"] = publish_sync(system.amqp_url, floor_msgs(n(5000, 1000)))
        pub = c.publish_with_bar(
            system.amqp_url, "pika publish, 1000 confirms outstanding", floor_msgs(n(20000, 5000))
        )
        floor["publish_async"] = {
            "messages": len(pub.sent_at),
            "seconds": pub.finished - pub.started,
            "per_s": pub.rate,
        }
        queued = n(5000, 1000) + n(20000, 5000)
        floor["consume_ack"] = consume_ack(system.amqp_url, FLOOR_QUEUE, queued)

        for k in (1, 2, 4):
            floor[f"sql_{k}"] = sql_floor(system, [c.order_body(rng, SKUS) for _ in range(n(4000, 1500))], k)

        orders = n(20000, 2000)
        floor["pipeline"] = run_pipeline(
            system,
            [c.order_body(rng, SKUS) for _ in range(orders)],
            False,
            label="raw pipeline: consume, SQL, commit, ack",
        )
        floor["pipeline_event"] = run_pipeline(
            system,
            [c.order_body(rng, SKUS) for _ in range(orders)],
            True,
            label="raw pipeline + order.created, confirm per event",
        )
        seconds = n(20, 5)
        floor["pipeline_latency_200"] = run_pipeline(
            system,
            [c.order_body(rng, SKUS) for _ in range(200 * seconds)],
            True,
            rate=200,
            label="raw pipeline at 200/s (latency)",
        )
        floor["ttl"] = ttl_floor(system, n(2000, 500), 2000)
    floor["load_average"] = c.machine_busy()
    ctx.floor = floor

    rows = [
        ("pika publish, confirm awaited per message", floor["publish_sync"]["per_s"], "msg/s"),
        ("pika publish, 1000 confirms outstanding", floor["publish_async"]["per_s"], "msg/s"),
        ("pika consume, ack per message", floor["consume_ack"]["per_s"], "msg/s"),
        *[
            (f"placing SQL alone, {k} connection(s)", floor[f"sql_{k}"]["per_s"], "orders/s")
            for k in (1, 2, 4)
        ],
        ("raw pipeline x2: consume, SQL, commit, ack", floor["pipeline"]["per_s"], "orders/s"),
        ("  + order.created, confirm per event (naive)", floor["pipeline_event"]["per_s"], "orders/s"),
        ("raw pipeline CPU per order (no event)", floor["pipeline"]["cpu_ms_per_order"], "ms"),
        ("raw pipeline CPU per order (naive event)", floor["pipeline_event"]["cpu_ms_per_order"], "ms"),
        ("raw pipeline @200/s p50", floor["pipeline_latency_200"]["latency"]["p50_ms"], "ms"),
        ("raw pipeline @200/s p99", floor["pipeline_latency_200"]["latency"]["p99_ms"], "ms"),
        ("TTL expiry lateness p50 (quorum, 2 s)", floor["ttl"]["p50_ms"], "ms"),
        ("TTL expiry lateness p99 (quorum, 2 s)", floor["ttl"]["p99_ms"], "ms"),
    ]
    c.table(
        f"1. Raw floor ({'quick' if quick else 'full'}; {c.noise_note()})", ["measure", "value", "unit"], rows
    )
    floor["table"] = rows
    points = floor["pipeline_latency_200"].pop("_points", [])
    floor["pipeline_event"].pop("_points", None)
    c.plot_latency(
        "raw",
        "Raw pipeline at 200/s: publish -> order.created (ms)",
        {"raw pipeline": ([p[0] for p in points], [p[1] for p in points])},
        "latency (ms)",
    )
    c.write_json("raw", floor)
    return floor
