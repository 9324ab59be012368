"""Scenarios 4 and 5: payment timers, their accuracy at a burst and their cost when a million wait."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from datetime import datetime
from typing import Any

import pika

from bench import common as c
from bench.service import SKUS, placing_service
from testing.broker import queue_counts, timer_refs
from testing.system import System, fresh_system

FIRED_SINK = "bench.timers.fired"


class FiredTimers:
    """A queue of ours on order.timers.fired: when each timer left its delay queue (by ref)."""

    def __init__(self, system: System) -> None:
        c.declare_sink(system, FIRED_SINK, "order.timers.fired", "timer.#")
        self.at: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(system.amqp_url,), daemon=True)
        self._thread.start()
        self._ready.wait(15)

    def _run(self, url: str) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()

        def on_message(_ch: Any, _m: Any, _p: Any, body: bytes) -> None:
            now = time.time()
            for ref in timer_refs(body):
                self.at[ref] = now

        ch.basic_consume(FIRED_SINK, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# 4. Timer accuracy


def timer_accuracy(ctx: c.Context) -> dict[str, Any]:
    count = ctx.n(5000, 500)
    timeout_s = 5
    rng = random.Random(4)
    bodies = [c.order_body(rng, SKUS) for _ in range(count)]
    env = {"ORDER_PAYMENT_TIMEOUT": f"{timeout_s}s", "SWEEPER_GRACE": "10m", "SWEEPER_INTERVAL": "60s"}
    with placing_service(ctx, SKUS, 1_000_000, also=("order.timeouts",), **env) as service:
        system = service.system
        fired = FiredTimers(system)
        listener, events = c.start_listener(system)
        try:
            msgs = c.commands("order.place", bodies)
            t0 = time.monotonic()
            with c.gc_paused():
                pub = c.publish_with_bar(system.amqp_url, f"{count:,} unpaid orders (burst)", msgs)
                c.wait_with_bar(
                    f"order.cancelled after {timeout_s}s unpaid",
                    count,
                    lambda: events.by_key.get("order.cancelled", 0),
                    timeout_s + ctx.n(600, 120),
                    started=t0,
                )
        finally:
            listener.stop()
            fired.stop()
    created = {e.body["order_no"]: e.body for e, _, _ in c.receipts(events, "order.created")}
    created_walls = [w for _, _, w in c.receipts(events, "order.created")]
    start_wall = min(created_walls)
    placed_s = max(created_walls) - start_wall
    late, fire_late, handle, points = [], [], [], []
    reasons: dict[str, int] = {}
    for e, _, wall in c.receipts(events, "order.cancelled"):
        order_no = e.body["order_no"]
        reasons[e.body.get("reason")] = reasons.get(e.body.get("reason"), 0) + 1
        deadline = datetime.fromisoformat(created[order_no]["pay_deadline"]).timestamp()
        late.append(wall - deadline)
        points.append((deadline - start_wall, wall - deadline))
        if order_no in fired.at:
            fire_late.append(fired.at[order_no] - deadline)
            handle.append(wall - fired.at[order_no])
    result: dict[str, Any] = {
        "orders": count,
        "timeout_s": timeout_s,
        "publish_per_s": pub.rate,
        "cancel_reasons": reasons,
        "lateness": c.summary_ms(late),
        "timer_fired_lateness": c.summary_ms(fire_late),
        "fired_to_cancelled": c.summary_ms(handle),
        "early": sum(1 for v in late if v < 0),
        # When placing the burst takes longer than the timeout, the first timers fire while the
        # rest is still being placed, and both share the machine.
        "burst_placed_s": placed_s,
        "placing_overlaps_deadlines": placed_s > timeout_s,
    }
    floor = ctx.floor["ttl"]
    lat = result["lateness"]
    result["goal_p99_under_100ms"] = (lat["p99_ms"] or 1e9) < 100
    result["ratio_p99_vs_ttl_floor"] = c.ratio(lat["p99_ms"], floor["p99_ms"])
    result["load_average"] = c.machine_busy()
    rows = [
        ("cancelled (reason)", count, ", ".join(f"{k}={v}" for k, v in reasons.items()), "", ""),
        (
            "deadline -> order.cancelled received",
            lat["p50_ms"],
            lat["p99_ms"],
            lat["max_ms"],
            result["ratio_p99_vs_ttl_floor"],
        ),
        (
            "  deadline -> timer left its delay queue (< 0: early by TIMER_LEAD_MS)",
            result["timer_fired_lateness"]["p50_ms"],
            result["timer_fired_lateness"]["p99_ms"],
            result["timer_fired_lateness"]["max_ms"],
            "",
        ),
        (
            "  timer left queue -> order.cancelled",
            result["fired_to_cancelled"]["p50_ms"],
            result["fired_to_cancelled"]["p99_ms"],
            result["fired_to_cancelled"]["max_ms"],
            "",
        ),
        ("raw floor: TTL expiry lateness (quorum)", floor["p50_ms"], floor["p99_ms"], floor["max_ms"], 1.0),
        (
            "burst placed in (first -> last order.created, s)",
            round(placed_s, 2),
            "still placing when timers fire" if placed_s > timeout_s else "placed before the first deadline",
            "",
            "",
        ),
    ]
    c.table(
        f"4. Timer accuracy, {count:,} orders, {timeout_s}s unpaid, ms (goal p99 < 100; {c.noise_note()})",
        ["", "p50", "p99", "max", "p99 ratio vs floor"],
        rows,
    )
    c.plot_latency(
        "timers",
        f"Lateness of order.cancelled against pay_deadline ({count:,} orders, burst)",
        {"order.cancelled": ([p[0] for p in points], [max(p[1], 1e-4) for p in points])},
        "lateness (ms)",
    )
    result["table"] = rows
    c.write_json("timers", result)
    return result


# --------------------------------------------------------------------------------------------
# 5. Scale of pending timers


def _bulk_insert(system: System, first: int, last: int, timeout_s: int) -> None:
    """Orders in the placement handler's shape: order, one item, its stock lock, timeline, timer row."""
    params = {"a": first, "b": last, "t": f"{timeout_s} seconds", "rk": f"payment-timeout.{timeout_s}s"}
    with c.pg(system, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute(
            """
            CREATE TEMP TABLE batch ON COMMIT DROP AS
            SELECT 'P' || lpad(g::text, 12, '0') AS order_no, g,
                   'BENCH-SKU-' || lpad((g %% 200)::text, 4, '0') AS sku,
                   'W' || ((g %% 200) %% 5) AS wh, 'M' || ((g %% 200) %% 5) AS merchant,
                   1000 + 37 * (g %% 200) AS price, gen_random_uuid()::text AS msg,
                   now() + %(t)s::interval AS deadline
            FROM generate_series(%(a)s, %(b)s) g
            """,
            params,
        )
        cur.execute(
            """
            INSERT INTO orders (order_no, user_id, request_id, order_type, status, goods_total, freight,
                                discount_total, payable, receiver, pay_deadline, placed_at, updated_at)
            SELECT order_no, 'u' || (g % 100000), 'r' || g, 'physical', 'PENDING_PAYMENT', price, 800, 0,
                   price + 800, '{"name": "Bench User", "phone": "13800000000", "address": "1 Bench Road"}',
                   deadline, now(), now()
            FROM batch"""
        )
        cur.execute(
            """
            INSERT INTO order_items (order_no, line_no, sku, name, merchant_id, warehouse_id, unit_price,
                                     quantity, line_total)
            SELECT order_no, 1, sku, 'Item ' || sku, merchant, wh, price, 1, price FROM batch"""
        )
        cur.execute(
            """
            INSERT INTO stock_locks (order_no, line_no, sku, warehouse_id, quantity, state)
            SELECT order_no, 1, sku, wh, 1, 'LOCKED' FROM batch"""
        )
        cur.execute(
            """
            INSERT INTO order_timeline
                (order_no, actor, action, from_status, to_status, detail, message_id, at)
            SELECT order_no, 'user:u' || (g % 100000), 'PLACE', NULL, 'PENDING_PAYMENT',
                   jsonb_build_object('payable', price + 800, 'request_id', 'r' || g), msg, now()
            FROM batch"""
        )
        cur.execute(
            """
            UPDATE stock s SET available = s.available - b.n, locked = s.locked + b.n
            FROM (SELECT sku, wh, count(*) AS n FROM batch GROUP BY sku, wh) b
            WHERE s.sku = b.sku AND s.warehouse_id = b.wh"""
        )
        cur.execute(
            """
            INSERT INTO outbox (message_id, exchange, routing_key, correlation_id, body, headers)
            SELECT gen_random_uuid()::text, 'order.timers', %(rk)s, msg,
                   jsonb_build_object('kind', 'payment-timeout', 'ref', order_no, 'due_at', deadline),
                   '{"x-schema-version": 1}'
            FROM batch""",
            params,
        )
        conn.commit()


class _PendingProgress:
    """What `pending` samples and polls while its timers wait and fire: the consumer's memory,
    the queues and the cancellations so far."""

    def __init__(self, system: System, pid: int, count: int, delay_queue: str) -> None:
        self.system = system
        self.pid = pid
        self.count = count
        self.delay_queue = delay_queue
        self.timer_rows_end: int | None = None  # the last outbox id once every timer row is written
        self.first_cancel: float | None = None  # when the first cancellation was seen

    def consumer(self) -> dict[str, Any]:
        return {"rss_kib": c.rss_kib(self.pid), "cpu_s": c.cpu_seconds(self.pid)}

    # Progress is read from the outbox's last id, which costs nothing: each cancellation
    # writes two events (order.cancelled, stock.released) after the timer rows. Counting
    # unpaid orders instead read the whole orders table (263 MB at 1,000,000) at every
    # sample, evicting from shared_buffers the pages the cancellations update; the exact
    # count is taken once, at the end.
    def last_outbox_id(self) -> int:
        return int(c.scalar(self.system, "SELECT coalesce(max(id), 0) FROM outbox"))

    def cancelled_so_far(self) -> int:
        if self.timer_rows_end is None:
            return 0  # still inserting: the timeout is longer than that
        return max(0, self.last_outbox_id() - self.timer_rows_end) // 2

    def broker(self) -> dict[str, Any]:
        ready_timeouts = queue_counts(self.system.amqp_url, "order.timeouts")[0]
        delay = queue_counts(self.system.amqp_url, self.delay_queue)[0]
        unsent = c.scalar(self.system, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        return {
            "delay_queue": delay,
            "timeouts_ready": ready_timeouts,
            "pending": self.count - self.cancelled_so_far(),
            "unsent": unsent,
            "broker_mem": c.broker_memory()["mem_used"],
        }

    def cancelled(self) -> int:
        """`cancelled_so_far`, noting when the first cancellation is seen."""
        done = self.cancelled_so_far()
        if done and self.first_cancel is None:
            self.first_cancel = time.monotonic()
        return done


def pending(ctx: c.Context) -> dict[str, Any]:
    count = ctx.pending
    chunk = 50_000
    # Every timer must still be waiting when the last is published: the delay covers inserting
    # and relaying them all (the relay is assumed no faster than half the synchronous-confirm floor).
    relay_guess = max(200.0, 0.5 * ctx.floor["publish_sync"]["per_s"])
    timeout_s = int(30 + count / 20_000 + count / relay_guess)
    env = {
        "ORDER_PAYMENT_TIMEOUT": f"{timeout_s}s",
        "SWEEPER_GRACE": "1h",
        "SWEEPER_INTERVAL": "60s",
        **ctx.extra_env,
    }
    delay_queue = f"order.timer.payment-timeout.{timeout_s}s"
    c.console.print(
        f"{count:,} pending orders; payment timeout {timeout_s}s (all must be published before "
        "the first expires)"
    )
    with fresh_system(**env) as system:
        c.seed_catalog_sql(system, SKUS, 1_000_000_000)
        system.start("order.timeouts")
        pid = system.processes["order.timeouts"].pid
        base_mem = c.broker_memory()
        base_rss = c.rss_kib(pid)
        base_db = c.scalar(system, "SELECT pg_database_size(current_database())")
        progress = _PendingProgress(system, pid, count, delay_queue)

        t0 = time.monotonic()
        with c.Sampler(progress.consumer, 1.0) as rss, c.Sampler(progress.broker, 2.0) as brk:
            rss.t0 = brk.t0 = t0
            with c.progress() as bar:
                task = bar.add_task("bulk insert orders + outbox timer rows", total=count, rate="")
                for first in range(1, count + 1, chunk):
                    last = min(count, first + chunk - 1)
                    _bulk_insert(system, first, last, timeout_s)
                    bar.update(task, completed=last, rate=f"{last / (time.monotonic() - t0):,.0f}/s")
            # A bulk load is followed by ANALYZE, as autovacuum does by itself after so many rows
            # (this machine's PostgreSQL runs with autovacuum off). Without statistics the
            # planner takes these tables for empty ones: it seq-scanned all of stock_locks for
            # each window of cancellations (96 ms for 100 orders; 740 cancellations a second).
            with c.pg(system) as conn, conn.cursor() as cur:
                cur.execute("ANALYZE orders, order_items, stock_locks, order_timeline, outbox, stock")
            inserted = time.monotonic()
            progress.timer_rows_end = progress.last_outbox_id()
            c.wait_with_bar(
                "relay: timer rows published",
                count,
                lambda: count - int(c.scalar(system, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")),
                timeout_s + 3600,
                interval=1.0,
                started=t0,
            )
            relayed = time.monotonic()
            cancelled_early = progress.cancelled_so_far()
            time.sleep(3)  # let the queue's counters settle
            at_peak = {
                "broker": c.broker_memory(),
                "delay_queue": c.queue_stats(system, delay_queue),
                "consumer_rss_kib": c.rss_kib(pid),
                "db_bytes": c.scalar(system, "SELECT pg_database_size(current_database())"),
                "cancelled_before_all_published": cancelled_early,
            }
            c.console.print(f"all {count:,} timers pending: {json.dumps(at_peak)}")
            end = c.wait_with_bar(
                "timers expire: orders cancelled",
                count,
                progress.cancelled,
                timeout_s + 7200,
                interval=1.0,
                started=t0,
            )
            end_unsent = c.wait_with_bar(
                "relay: cancellation events published",
                1,
                lambda: int(c.scalar(system, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")) == 0,
                3600,
                interval=1.0,
            )
            del end_unsent
        final = {
            "broker": c.broker_memory(),
            "consumer_rss_kib": c.rss_kib(pid),
            "db_bytes": c.scalar(system, "SELECT pg_database_size(current_database())"),
            # Checked once at the end, exactly: every order cancelled, none left unpaid.
            "still_unpaid": c.scalar(system, "SELECT count(*) FROM orders WHERE status = 'PENDING_PAYMENT'"),
            "reasons": c.scalar(
                system,
                "SELECT json_object_agg(r, n) FROM (SELECT timeline.detail->>'reason' r, "
                "count(*) n FROM order_timeline timeline WHERE action = 'PAYMENT_TIMEOUT' GROUP BY 1) x",
            ),
        }
    cancel_s = end - progress.first_cancel if progress.first_cancel is not None else math.nan
    rss_series = [(t, s["rss_kib"]) for t, s in rss.samples if s["rss_kib"]]
    rss_values = [v for _, v in rss_series]
    # The consumer's RSS once it started cancelling against its RSS while timers were pending.
    result: dict[str, Any] = {
        "pending": count,
        "timeout_s": timeout_s,
        "insert_seconds": inserted - t0,
        "insert_per_s": count / (inserted - t0),
        "relay_seconds": relayed - t0,
        "relay_per_s": count / (relayed - t0),
        "baseline": {
            "broker_mem_used": base_mem["mem_used"],
            "consumer_rss_kib": base_rss,
            "db_bytes": base_db,
        },
        "at_peak": at_peak,
        "final": final,
        "cancel_seconds": cancel_s,
        "cancel_per_s": count / cancel_s if cancel_s else None,
        "rss_min_kib": min(rss_values) if rss_values else None,
        "rss_max_kib": max(rss_values) if rss_values else None,
        "rss_samples": rss_series,
        "broker_samples": brk.samples,
        "load_average": c.machine_busy(),
    }
    result["broker_mem_delta_mib"] = (at_peak["broker"]["mem_used"] - base_mem["mem_used"]) / 2**20
    result["ratio_cancel_vs_raw_pipeline"] = c.ratio(result["cancel_per_s"], ctx.floor["pipeline"]["per_s"])
    result["ratio_relay_vs_sync_publish"] = c.ratio(result["relay_per_s"], ctx.floor["publish_sync"]["per_s"])
    result["table"] = _report_pending(result)
    c.write_json("pending", result)
    return result


def _report_pending(result: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Print and plot `pending`'s result; its table's rows."""
    count = result["pending"]
    at_peak, final = result["at_peak"], result["final"]
    base_rss, base_db = result["baseline"]["consumer_rss_kib"], result["baseline"]["db_bytes"]
    rss_series, broker_samples = result["rss_samples"], result["broker_samples"]
    dq = at_peak["delay_queue"]
    rows = [
        ("pending unpaid orders (all at once)", count, ""),
        ("bulk insert (orders + item + lock + timeline + timer row)", result["insert_per_s"], "orders/s"),
        ("relay: timer rows published (from insert start)", result["relay_per_s"], "msg/s"),
        ("  ratio vs pika confirm-per-message floor", result["ratio_relay_vs_sync_publish"], "x"),
        (
            "broker memory, node (shared box: noisy)",
            at_peak["broker"]["mem_used"] / 2**20,
            f"MiB ({result['broker_mem_delta_mib']:+,.0f} MiB vs before)",
        ),
        (
            "delay queue: messages / memory",
            f"{dq.get('messages')} / {c.fmt((dq.get('memory') or 0) / 2**20)}",
            f"MiB ({dq.get('type')})",
        ),
        (
            "consumer RSS at start / pending / end",
            f"{(base_rss or 0) // 1024} / {at_peak['consumer_rss_kib'] // 1024} / "
            f"{final['consumer_rss_kib'] // 1024}",
            "MiB",
        ),
        (
            "consumer RSS min / max over the run",
            f"{(result['rss_min_kib'] or 0) // 1024} / {(result['rss_max_kib'] or 0) // 1024}",
            "MiB",
        ),
        (
            "database size before / pending / end",
            f"{base_db // 2**20} / {at_peak['db_bytes'] // 2**20} / {final['db_bytes'] // 2**20}",
            "MiB",
        ),
        ("orders still unpaid at the end (exact count)", final["still_unpaid"], ""),
        ("cancel throughput (first to last cancel)", result["cancel_per_s"], "orders/s"),
        ("  ratio vs raw pipeline (no event)", result["ratio_cancel_vs_raw_pipeline"], "x"),
    ]
    c.table(f"5. {count:,} pending timers ({c.noise_note()})", ["measure", "value", "unit"], rows)
    xs = [t for t, _ in rss_series]
    bt = [t for t, _ in broker_samples]
    c.plot_lines(
        "pending",
        f"{count:,} pending payment timers: consumer RSS (MiB), pending orders, queue depths",
        {"consumer RSS (MiB)": (xs, [v / 1024 for _, v in rss_series])},
        "RSS (MiB)",
        secondary={
            "pending orders": (bt, [s["pending"] for _, s in broker_samples]),
            "delay queue": (bt, [s["delay_queue"] for _, s in broker_samples]),
        },
        ylabel2="count",
    )
    return rows
