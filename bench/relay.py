"""Scenario 7: the outbox relay's publish rate with confirms, against the raw publish floor."""

from __future__ import annotations

import time
from typing import Any

from bench import common as c
from testing.broker import queue_counts
from testing.system import fresh_system


def relay(ctx: c.Context) -> dict[str, Any]:
    count = ctx.n(50_000, 10_000)
    with fresh_system(**ctx.extra_env) as system:
        # Someone subscribes to the events, as in production: the relay's messages are routed and stored.
        c.declare_sink(system, "bench.events.sink")
        system.start("order.catalog")  # any consumer process runs a relay
        pid = system.processes["order.catalog"].pid
        time.sleep(1.0)  # the relay has connected and listens
        cpu0 = c.cpu_seconds(pid)
        with c.pg(system, autocommit=False) as conn, conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO outbox (message_id, exchange, routing_key, correlation_id, body, headers)
                SELECT gen_random_uuid()::text, 'order.events', 'order.created', 'bench-' || g,
                       jsonb_build_object(
                           'order_no', 'O' || lpad(g::text, 18, '0'), 'status', 'PENDING_PAYMENT',
                           'request_id', 'r' || g, 'user_id', 'u' || g, 'payable', 12345,
                           'items', jsonb_build_array(jsonb_build_object('sku', 'S1', 'quantity', 2))),
                       '{"x-schema-version": 1}'
                FROM generate_series(1, %s) g""",
                (count,),
            )
            conn.commit()
            t0 = time.monotonic()
        end = c.wait_with_bar(
            f"relay: {count:,} outbox rows -> broker (confirms)",
            count,
            lambda: count - int(c.scalar(system, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")),
            3600,
            interval=0.1,
            started=t0,
        )
        cpu = c.cpu_seconds(pid) - cpu0
        routed = queue_counts(system.amqp_url, "bench.events.sink")[0]
    elapsed = end - t0
    per_s = count / elapsed
    floor = ctx.floor
    result: dict[str, Any] = {
        "rows": count,
        "seconds": elapsed,
        "per_s": per_s,
        "routed": routed,
        "relay_process_cpu_ms_per_row": 1000 * cpu / count,
        "ratio_vs_sync_confirm_floor": c.ratio(per_s, floor["publish_sync"]["per_s"]),
        "ratio_vs_async_confirm_floor": c.ratio(per_s, floor["publish_async"]["per_s"]),
        "load_average": c.machine_busy(),
    }
    rows = [
        ("outbox rows published and marked sent", count, ""),
        ("relay rate", per_s, "rows/s"),
        ("pika publish, confirm per message (floor)", floor["publish_sync"]["per_s"], "msg/s"),
        ("pika publish, confirms outstanding (floor)", floor["publish_async"]["per_s"], "msg/s"),
        ("ratio vs confirm-per-message floor", result["ratio_vs_sync_confirm_floor"], "x"),
        ("ratio vs confirms-outstanding floor", result["ratio_vs_async_confirm_floor"], "x"),
        ("relay process CPU per row", result["relay_process_cpu_ms_per_row"], "ms"),
    ]
    c.table(f"7. Outbox relay ({c.noise_note()})", ["measure", "value", "unit"], rows)
    c.plot_bars(
        "relay",
        "Outbox relay against the publish floor (msg/s)",
        {
            "relay (rows/s)": per_s,
            "pika, confirm per message": floor["publish_sync"]["per_s"],
            "pika, confirms outstanding": floor["publish_async"]["per_s"],
        },
        "messages per second",
    )
    result["table"] = rows
    c.write_json("relay", result)
    return result
