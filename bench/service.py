"""Scenarios 2, 3 and 6: the real service placing orders (catalog + two placement processes)."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common as c
from testing.broker import queue_counts
from testing.system import System, fresh_system

SKUS = c.sku_names(200)
PYSPY = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"


@dataclass
class Service:
    system: System
    placement_pids: list[int]
    extras: list[Any]


@contextmanager
def placing_service(
    ctx: c.Context,
    skus: list[str],
    stock: int,
    profile_tag: str | None = None,
    also: tuple[str, ...] = (),
    **env: str,
) -> Iterator[Service]:
    """A fresh system with order.catalog and two order.placement processes, the catalogue seeded."""
    with fresh_system(**{**env, **ctx.extra_env}) as system:
        system.start("order.catalog", "order.placement", *also)
        # System.processes is keyed by queue: the second placement process is ours to stop.
        profile_to = c.OUT / f"{profile_tag}.prof" if profile_tag and ctx.profile else None
        if profile_to:
            c.OUT.mkdir(parents=True, exist_ok=True)
        extras = [
            c.start_consumer(
                system,
                "order.placement",
                profile_to=profile_to if i == 0 else None,
                tag=(profile_tag or "extra") + f"-{i}",
            )
            for i in range(ctx.placement_procs - 1)
        ]
        try:
            deadline = time.monotonic() + 30
            while queue_counts(system.amqp_url, "order.placement")[1] < ctx.placement_procs:
                if any(p.poll() is not None for p in extras) or time.monotonic() > deadline:
                    raise RuntimeError(f"extra order.placement consumers did not start; see {system.log_dir}")
                time.sleep(0.1)
            c.seed_catalog(system, skus, stock)
            yield Service(system, [system.processes["order.placement"].pid, *(p.pid for p in extras)], extras)
        finally:
            for extra in extras:
                c.stop_process(extra)


@contextmanager
def pyspy(ctx: c.Context, pid: int, name: str) -> Iterator[None]:
    """Sample one process with py-spy (all threads, idle included) while the block runs."""
    if not ctx.profile or not Path(PYSPY).exists():
        yield
        return
    out = c.OUT / f"{name}.pyspy.txt"
    proc = subprocess.Popen(
        [
            PYSPY,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--idle",
            "--threads",
            "--rate",
            "200",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if out.exists():
            summarize_pyspy(out, c.OUT / f"{name}.pyspy-summary.txt")


def summarize_pyspy(raw: Path, dest: Path, top: int = 25) -> None:
    """Per thread: the share of samples by leaf function, and by a few inclusive frames of interest."""
    by_thread: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0]
        n = int(count)
        totals[thread] += n
        by_thread.setdefault(thread, Counter())[frames[-1]] += n
        seen = set()
        for f in frames[1:]:
            fn = f.split(" (")[0]
            if fn not in seen:
                seen.add(fn)
                inclusive.setdefault(thread, Counter())[fn] += n
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"== {thread}: {total} samples")
        lines.append("  -- leaf frames (self time, idle included)")
        for frame, n in by_thread[thread].most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {frame}")
        lines.append("  -- inclusive (function anywhere on the stack)")
        for frame, n in inclusive[thread].most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    dest.write_text("\n".join(lines) + "\n")


def cprofile_summary(prof: Path, dest: Path) -> None:
    import io
    import pstats

    if not prof.exists():
        return
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(30)
    dest.write_text(buf.getvalue())


def place_and_wait(
    service: Service,
    bodies: list[dict[str, Any]],
    description: str,
    rate: float | None = None,
    done_keys: tuple[str, ...] = ("order.created",),
    timeout: float = 1800,
) -> dict[str, Any]:
    """Publish the orders (confirms outstanding), wait for their outcome events; timings and latencies."""
    system = service.system
    listener, events = c.start_listener(system)
    try:
        msgs = c.commands("order.place", bodies)
        box: dict[str, Any] = {}
        cpu0 = {pid: c.cpu_seconds(pid) for pid in service.placement_pids}
        pg0 = c.postgres_cpu_seconds()
        thread = threading.Thread(
            target=lambda: box.__setitem__("pub", c.publish_async(system.amqp_url, msgs, rate=rate)),
            daemon=True,
        )
        t0 = time.monotonic()
        with c.gc_paused(), c.Sampler(lambda: db_waits(system), 0.2) as waits:
            thread.start()
            end = c.wait_with_bar(
                description,
                len(msgs),
                lambda: sum(events.by_key.get(k, 0) for k in done_keys),
                timeout,
                interval=0.1,
                started=t0,
            )
            thread.join()
        wait_totals: Counter[str] = Counter()
        for _, sample in waits.samples:
            wait_totals.update(sample)
        cpu = sum(c.cpu_seconds(pid) - cpu0[pid] for pid in service.placement_pids)
        pg_cpu = c.postgres_cpu_seconds() - pg0
        pub: c.PublishResult = box["pub"]
        elapsed = end - pub.started
        points = []
        for key in done_keys:
            for e, m, _ in c.receipts(events, key):
                sent = pub.sent_at.get(e.properties.correlation_id)
                if sent is not None:
                    points.append((sent - pub.started, m - sent, key))
        return {
            "orders": len(msgs),
            "seconds": elapsed,
            "per_s": len(msgs) / elapsed,
            "publish_per_s": pub.rate,
            "events": dict(events.by_key),
            "service_cpu_s": cpu,
            "cpu_ms_per_order": 1000 * cpu / len(msgs),
            "postgres_cpu_ms_per_order": 1000 * pg_cpu / len(msgs),
            "latency": c.summary_ms([p[1] for p in points]),
            # What the service's database sessions were doing, sampled every 0.2 s (share of samples).
            "db_session_states": {
                k: round(v / max(1, len(waits.samples)), 2) for k, v in wait_totals.most_common()
            },
            "log_warnings": log_counts(system),
            "_points": points,
            "_events": events,
        }
    finally:
        listener.stop()


def log_counts(system: System) -> dict[str, int]:
    """Warnings in this system's consumer logs that explain lost time (deadlocks, relay timeouts)."""
    counts: Counter[str] = Counter()
    for path in system.log_dir.glob(f"{system.vhost}-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "deadlock detected" in line:
                counts["deadlocks (window retried)"] += 1
            if "publisher confirms did not arrive" in line:
                counts["relay confirm timeouts (reconnect)"] += 1
            if "window failed after retries" in line:
                counts["windows split message by message"] += 1
            if "relay lost a connection" in line:
                counts["relay reconnects"] += 1
    return dict(counts)


def db_waits(system: System) -> Counter[str]:
    """The service's database sessions by state: running, or waiting on what (pg_stat_activity)."""
    with c.pg(system) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT state, wait_event_type, wait_event, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE 'order-centre%%'"
        )
        out: Counter[str] = Counter()
        for state, wtype, wevent, _app in cur.fetchall():
            if state == "active":
                out[f"active: {wtype}:{wevent}" if wtype else "active: running"] += 1
            else:
                out[state or "unknown"] += 1
        return out


def lock_waits(result: dict[str, Any]) -> float:
    return sum(v for k, v in result["db_session_states"].items() if k.startswith("active: Lock"))


def _plot(name: str, title: str, points: list[tuple[float, float, str]]) -> None:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for x, y, key in points:
        xs, ys = series.setdefault(key, ([], []))
        xs.append(x)
        ys.append(y)
    c.plot_latency(name, title, series, "publish -> event (ms)")


def _clean(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# 2. Throughput


def throughput(ctx: c.Context) -> dict[str, Any]:
    count = ctx.n(20_000, 2_000)
    rng = random.Random(2)
    bodies = [c.order_body(rng, SKUS) for _ in range(count)]
    with (
        placing_service(ctx, SKUS, 1_000_000, profile_tag="profile-placement") as service,
        pyspy(ctx, service.placement_pids[0], "placement"),
    ):
        result = place_and_wait(service, bodies, f"service: {count:,} orders -> order.created")
    if ctx.profile:
        cprofile_summary(c.OUT / "profile-placement.prof", c.OUT / "placement.cprofile.txt")
    floor = ctx.floor
    result["ratio_vs_raw_pipeline_naive_event"] = c.ratio(result["per_s"], floor["pipeline_event"]["per_s"])
    result["ratio_vs_raw_pipeline_no_event"] = c.ratio(result["per_s"], floor["pipeline"]["per_s"])
    result["goal_ratio_1_5"] = (result["ratio_vs_raw_pipeline_naive_event"] or 0) >= 1.5
    result["load_average"] = c.machine_busy()
    rows = [
        ("orders", result["orders"], ""),
        ("orders/s (publish -> last order.created)", result["per_s"], ""),
        ("publisher rate (confirms outstanding)", result["publish_per_s"], "msg/s"),
        ("raw pipeline + naive event (same run)", floor["pipeline_event"]["per_s"], "orders/s"),
        ("raw pipeline, no event (same run)", floor["pipeline"]["per_s"], "orders/s"),
        (
            "ratio vs raw pipeline + naive event (goal >= 1.5)",
            result["ratio_vs_raw_pipeline_naive_event"],
            "x",
        ),
        ("ratio vs raw pipeline, no event", result["ratio_vs_raw_pipeline_no_event"], "x"),
        (f"service CPU per order ({ctx.placement_procs} placement procs)", result["cpu_ms_per_order"], "ms"),
        ("raw pipeline CPU per order (naive event)", floor["pipeline_event"]["cpu_ms_per_order"], "ms"),
        ("postgres CPU per order (all backends: noisy)", result["postgres_cpu_ms_per_order"], "ms"),
        ("placement DB sessions waiting on a lock (mean)", lock_waits(result), "of 2"),
        *[(f"log: {k}", v, "") for k, v in result["log_warnings"].items()],
        ("latency under saturation p50", result["latency"]["p50_ms"], "ms"),
        ("latency under saturation p99", result["latency"]["p99_ms"], "ms"),
    ]
    c.table(f"2. Place-order throughput ({c.noise_note()})", ["measure", "value", "unit"], rows)
    _plot(
        "throughput",
        f"Place-order at saturation ({count:,} orders): publish -> order.created",
        result["_points"],
    )
    out = _clean(result)
    out["table"] = rows
    c.write_json("throughput", out)
    return out


# --------------------------------------------------------------------------------------------
# 3. Latency at a steady 200 orders/s


def latency(ctx: c.Context) -> dict[str, Any]:
    seconds = ctx.n(60, 10)
    rate = 200
    rng = random.Random(3)
    bodies = [c.order_body(rng, SKUS) for _ in range(rate * seconds)]
    with (
        placing_service(ctx, SKUS, 1_000_000) as service,
        pyspy(ctx, service.placement_pids[0], "placement-200"),
    ):
        result = place_and_wait(service, bodies, f"service at {rate}/s for {seconds}s", rate=rate)
    floor = ctx.floor["pipeline_latency_200"]["latency"]
    lat = result["latency"]
    result["goal_p99_under_50ms"] = (lat["p99_ms"] or 1e9) < 50
    result["ratio_p99_vs_raw"] = c.ratio(lat["p99_ms"], floor["p99_ms"])
    result["ratio_p50_vs_raw"] = c.ratio(lat["p50_ms"], floor["p50_ms"])
    result["achieved_rate"] = result["publish_per_s"]
    result["load_average"] = c.machine_busy()
    rows = [
        ("p50", lat["p50_ms"], floor["p50_ms"], result["ratio_p50_vs_raw"]),
        ("p99 (goal < 50 ms)", lat["p99_ms"], floor["p99_ms"], result["ratio_p99_vs_raw"]),
        ("max", lat["max_ms"], floor["max_ms"], c.ratio(lat["max_ms"], floor["max_ms"])),
        ("DB sessions waiting on a lock (mean)", lock_waits(result), "", ""),
        *[(f"log: {k}", v, "", "") for k, v in result["log_warnings"].items()],
    ]
    c.table(
        f"3. Latency at {rate}/s for {seconds}s, publish -> order.created, ms ({c.noise_note()})",
        ["", "service", "raw pipeline (naive event)", "ratio"],
        rows,
    )
    _plot("latency", f"Service at {rate} orders/s: publish -> order.created", result["_points"])
    out = _clean(result)
    out["table"] = rows
    c.write_json("latency", out)
    return out


# --------------------------------------------------------------------------------------------
# 6. Hot SKU


def hot_sku(ctx: c.Context) -> dict[str, Any]:
    count, stock = 2000, 1000
    rng = random.Random(6)
    sku = ["BENCH-HOT"]
    bodies = [c.order_body(rng, sku, lines=1, quantity=1) for _ in range(count)]
    with placing_service(ctx, sku, stock) as service:
        result = place_and_wait(
            service,
            bodies,
            f"{count:,} orders on one SKU with {stock:,} in stock",
            done_keys=("order.created", "order.rejected"),
        )
        events = result["_events"]
        db = service.system.db
        stock_row = db.one("SELECT available, locked, sold FROM stock WHERE sku = %s", sku[0])
        orders = db.scalar("SELECT count(*) FROM orders WHERE parent_no IS NULL")
    created = events.by_key.get("order.created", 0)
    rejected = [e.body.get("reason") for e in list(events) if e.routing_key == "order.rejected"]
    result.update(
        {
            "created": created,
            "rejected": len(rejected),
            "rejected_reasons": dict(Counter(rejected)),
            "stock_after": stock_row,
            "orders_in_db": orders,
        }
    )
    exact = (
        created == stock and orders == stock and stock_row["available"] == 0 and stock_row["locked"] == stock
    )
    result["exactly_1000"] = exact
    base = ctx.results.get("throughput", {}).get("per_s")
    result["ratio_vs_throughput_scenario"] = c.ratio(result["per_s"], base)
    result["ratio_vs_raw_pipeline_naive_event"] = c.ratio(
        result["per_s"], ctx.floor["pipeline_event"]["per_s"]
    )
    result["load_average"] = c.machine_busy()
    rows = [
        ("orders created (must be 1,000)", created, ""),
        ("orders rejected", len(rejected), ", ".join(f"{k}={v}" for k, v in Counter(rejected).items())),
        ("stock after: available / locked", f"{stock_row['available']} / {stock_row['locked']}", ""),
        ("orders/s (publish -> last created|rejected)", result["per_s"], ""),
        (
            "ratio vs scenario 2 (same run)",
            result["ratio_vs_throughput_scenario"],
            "x" if base else "scenario 2 not run",
        ),
        ("ratio vs raw pipeline + naive event", result["ratio_vs_raw_pipeline_naive_event"], "x"),
        (
            "latency p50 / p99",
            f"{c.fmt(result['latency']['p50_ms'])} / {c.fmt(result['latency']['p99_ms'])}",
            "ms",
        ),
        ("DB sessions waiting on a lock (mean)", lock_waits(result), "of 2"),
        *[(f"log: {k}", v, "") for k, v in result["log_warnings"].items()],
    ]
    c.table(f"6. Hot SKU ({c.noise_note()})", ["measure", "value", "note"], rows)
    _plot("hot_sku", "Hot SKU: publish -> order.created / order.rejected", result["_points"])
    out = _clean(result)
    out["table"] = rows
    c.write_json("hot_sku", out)
    if not exact:
        raise AssertionError(
            f"hot SKU: expected exactly {stock} orders, got {created} created, "
            f"{orders} in the database, stock {stock_row}"
        )
    return out
