"""Shared pieces of the benchmarks: output (bars, tables, JSON, plots), workload, publishers, probes.

Everything runs against a `testing.system.fresh_system` (its own vhost and database); nothing
here is imported by the test suite.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pika
import psycopg2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testing.broker import EventListener, rabbit_api
from testing.system import ROOT, System

OUT = Path(__file__).resolve().parent / "out"
console = Console()

RECEIVER = {"name": "Bench User", "phone": "13800000000", "address": "1 Bench Road, Hangzhou"}
SCHEMA_HEADERS = {"x-schema-version": 1}


# --------------------------------------------------------------------------------------------
# Run context: the floor measured in this run, and the results so far


@dataclass
class Context:
    quick: bool
    pending: int
    extra_env: dict[str, str]
    profile: bool
    placement_procs: int = 2
    floor: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# --------------------------------------------------------------------------------------------
# Output


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process while a run is timed.

    The harness keeps every event it receives, so its heap grows through a run, and a full
    collection stops every thread, the listener's included, for longer each time (tens of ms
    after 30 s at 200 orders/s). The events that arrive meanwhile would be timestamped late
    and counted as the service's latency. As `timeit` does, collection waits until the run
    is over; the service's own processes are not affected.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def wait_with_bar(
    description: str,
    total: int,
    count: Callable[[], int],
    timeout: float,
    interval: float = 0.2,
    started: float | None = None,
) -> float:
    """Poll `count()` until it reaches `total`, showing a bar; returns the time the total was reached."""
    started = time.monotonic() if started is None else started
    with progress() as bar:
        task = bar.add_task(description, total=total, rate="")
        while True:
            done = count()
            elapsed = time.monotonic() - started
            bar.update(
                task, completed=min(done, total), rate=f"{done / elapsed:,.0f}/s" if elapsed > 0 else ""
            )
            if done >= total:
                return time.monotonic()
            if elapsed > timeout:
                raise TimeoutError(f"{description}: {done}/{total} after {timeout:.0f}s")
            time.sleep(interval)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    console.print(t)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:,.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max in milliseconds of values given in seconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
    }


def plot_latency(
    name: str, title: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], ylabel: str
) -> Path:
    """Scatter latency (ms) against time since start (s), one colour per series."""
    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, (xs, ys) in series.items():
        ax.scatter(xs, [y * 1000 for y in ys], s=3, alpha=0.5, label=label)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if len(series) > 1:
        ax.legend(markerscale=4)
    path = OUT / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(
    name: str,
    title: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    secondary: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    ylabel2: str = "",
) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        ax2 = ax.twinx()
        for label, (xs, ys) in secondary.items():
            ax2.plot(xs, ys, linestyle="--", label=label, color="tab:red")
        ax2.set_ylabel(ylabel2)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left")
    path = OUT / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(name: str, title: str, values: dict[str, float], ylabel: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh(list(values), list(values.values()))
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    path = OUT / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Workload


def sku_names(count: int) -> list[str]:
    return [f"BENCH-SKU-{i:04d}" for i in range(count)]


def order_body(
    rng: random.Random,
    skus: Sequence[str],
    user: str | None = None,
    lines: int | None = None,
    quantity: int | None = None,
) -> dict[str, Any]:
    """An order.place body of 1 to 3 lines of distinct SKUs."""
    chosen = rng.sample(list(skus), lines or rng.randint(1, min(3, len(skus))))
    return {
        "request_id": uuid.uuid4().hex,
        "user_id": user or f"u{rng.randrange(100_000)}",
        "order_type": "physical",
        "items": [{"sku": sku, "quantity": quantity or rng.randint(1, 3)} for sku in chosen],
        "receiver": RECEIVER,
    }


def command_properties(routing_key: str, message_id: str) -> pika.BasicProperties:
    """The contract's properties for a command."""
    return pika.BasicProperties(
        message_id=message_id,
        correlation_id=message_id,
        type=routing_key,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        timestamp=int(time.time()),
        headers=dict(SCHEMA_HEADERS),
        app_id="bench",
    )


@dataclass
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties


def commands(routing_key: str, bodies: Iterable[dict[str, Any]]) -> list[Outgoing]:
    out = []
    for body in bodies:
        mid = str(uuid.uuid4())
        out.append(
            Outgoing(
                "order.commands", routing_key, json.dumps(body).encode(), command_properties(routing_key, mid)
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Publishing with many confirms outstanding (pika SelectConnection)


@dataclass
class PublishResult:
    sent_at: dict[str, float]  # message_id -> time.monotonic() when handed to the socket
    started: float
    finished: float  # when the last confirm arrived
    nacked: int

    @property
    def rate(self) -> float:
        return len(self.sent_at) / (self.finished - self.started)


class _ConfirmedPublisher:
    """One `publish_async` run: the SelectConnection callbacks and what they count."""

    def __init__(
        self,
        messages: Sequence[Outgoing],
        window: int,
        rate: float | None,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.messages = messages
        self.total = len(messages)
        self.window = window
        self.rate = rate
        self.on_progress = on_progress
        self.sent_at: dict[str, float] = {}
        self.next_index = 0  # the next message to publish
        self.seq = 0  # messages published: the last delivery tag
        self.confirmed = 0
        self.nacked = 0
        self.started = 0.0
        self.finished = 0.0
        # At most one paced wake-up pending ("waking"): every confirm calls pump, and scheduling a
        # new timer from each would leave one more timer chain per message, all firing at every due
        # time (the publisher thread's work, and so the listener's GIL waits, grew through the run).
        self.waking = False
        self.channel: Any = None
        self.conn: Any = None

    def run(self, url: str) -> PublishResult:
        self.conn = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self.on_open,
            on_open_error_callback=lambda c, e: c.ioloop.stop(),
            on_close_callback=lambda c, r: c.ioloop.stop(),
        )
        if self.total == 0:
            return PublishResult({}, time.monotonic(), time.monotonic(), 0)
        self.conn.ioloop.start()
        if self.confirmed < self.total:
            raise RuntimeError(f"publisher stopped after {self.confirmed}/{self.total} confirms")
        return PublishResult(self.sent_at, self.started, self.finished, self.nacked)

    def outstanding(self) -> int:
        return self.seq - self.confirmed

    def wake(self) -> None:
        self.waking = False
        self.pump()

    def pump(self) -> None:
        now = time.monotonic()
        while self.next_index < self.total and self.outstanding() < self.window:
            if self.must_wait(now):
                return
            msg = self.messages[self.next_index]
            self.sent_at[msg.properties.message_id] = time.monotonic()
            self.channel.basic_publish(msg.exchange, msg.routing_key, msg.body, msg.properties)
            self.next_index += 1
            self.seq += 1
            now = time.monotonic()

    def must_wait(self, now: float) -> bool:
        """Whether pacing holds the next message back (a wake-up is then pending for it)."""
        if self.rate is None:
            return False
        due = self.started + self.next_index / self.rate
        if due <= now:
            return False
        if not self.waking:
            self.waking = True
            self.conn.ioloop.call_later(max(0.0, due - now), self.wake)
        return True

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = self.confirmed
        count = method.delivery_tag - acked if method.multiple else 1
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += count
        self.confirmed = method.delivery_tag if method.multiple else acked + 1
        if self.on_progress:
            self.on_progress(self.confirmed)
        if self.confirmed >= self.total:
            self.finished = time.monotonic()
            self.conn.close()
        else:
            self.pump()

    def on_channel(self, ch: Any) -> None:
        self.channel = ch
        ch.confirm_delivery(self.on_confirm)
        self.started = time.monotonic()
        self.pump()

    def on_open(self, c: Any) -> None:
        c.channel(on_open_callback=self.on_channel)


def publish_async(
    url: str,
    messages: Sequence[Outgoing],
    window: int = 1000,
    rate: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PublishResult:
    """Publish with publisher confirms, keeping up to `window` unconfirmed; optionally paced at `rate`/s."""
    return _ConfirmedPublisher(messages, window, rate, on_progress).run(url)


def publish_with_bar(
    url: str, description: str, messages: Sequence[Outgoing], **kwargs: Any
) -> PublishResult:
    with progress() as bar:
        task = bar.add_task(description, total=len(messages), rate="")
        started = time.monotonic()
        last = [0.0]

        def update(done: int) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1 or done == len(messages):
                last[0] = now
                bar.update(task, completed=done, rate=f"{done / max(now - started, 1e-9):,.0f}/s")

        return publish_async(url, messages, on_progress=update, **kwargs)


# --------------------------------------------------------------------------------------------
# Receiving events with a receipt time (reusing testing.broker.EventListener)


class TimedEvents(list):  # type: ignore[type-arg]
    """The listener's event list, noting when each event arrived (time.monotonic and time.time)."""

    def __init__(self) -> None:
        super().__init__()
        self.mono: list[float] = []
        self.wall: list[float] = []
        self.by_key: dict[str, int] = {}

    def append(self, event: Any) -> None:  # called under the listener's lock
        self.mono.append(time.monotonic())
        self.wall.append(time.time())
        self.by_key[event.routing_key] = self.by_key.get(event.routing_key, 0) + 1
        super().append(event)


def start_listener(system: System) -> tuple[EventListener, TimedEvents]:
    events = TimedEvents()
    listener = EventListener(system.amqp_url, events=events).start()
    return listener, events


def receipts(events: TimedEvents, routing_key: str) -> list[tuple[Any, float, float]]:
    """(event, monotonic receipt, wall receipt) of every event of this key."""
    return [
        (e, m, w)
        for e, m, w in zip(list(events), events.mono, events.wall, strict=False)
        if e.routing_key == routing_key
    ]


# --------------------------------------------------------------------------------------------
# Processes: consumers beyond System.start's one per queue, RSS and CPU


def start_consumer(
    system: System,
    queue: str,
    env: dict[str, str] | None = None,
    profile_to: Path | None = None,
    tag: str = "extra",
) -> subprocess.Popen[bytes]:
    """One more `run_consumer.py QUEUE` process (System.processes holds one per queue).

    With `profile_to`, the process runs under cProfile (main thread only) and writes its stats
    there when SIGTERM ends it.
    """
    system.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(system.log_dir / f"{system.vhost}-{queue}-{tag}.log", "ab")  # noqa: SIM115
    profile = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
    return subprocess.Popen(
        [sys.executable, *profile, "run_consumer.py", queue],
        cwd=ROOT,
        env={**os.environ, **system.env, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:
        return 0.0


def postgres_cpu_seconds() -> float:
    """CPU of every postgres process on the machine (other engineers' tests included: noisy)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(entry.name))
            except OSError:
                pass
    return total


def machine_busy() -> float:
    """1-minute load average (other engineers run tests on this box: a high value means noise)."""
    return os.getloadavg()[0]


class Sampler:
    """Samples a function every `interval` seconds on a thread: [(t since start, value)]."""

    def __init__(self, fn: Callable[[], Any], interval: float = 1.0) -> None:
        self.fn, self.interval = fn, interval
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self.t0 = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(Exception):  # a probe failing now and then (API busy) must not end the run
                self.samples.append((time.monotonic() - self.t0, self.fn()))
            self._stop.wait(self.interval)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# Database and broker helpers


@contextmanager
def pg(system: System, autocommit: bool = True) -> Iterator[Any]:
    conn = psycopg2.connect(system.db.dsn)
    conn.autocommit = autocommit
    try:
        yield conn
    finally:
        conn.close()


def scalar(system: System, sql: str, *params: Any) -> Any:
    with pg(system) as conn, conn.cursor() as cur:
        cur.execute(sql, params or None)
        return cur.fetchone()[0]


def seed_catalog(system: System, skus: Sequence[str], stock: int) -> None:
    """SKUs and stock through the real catalog consumer (sku.upsert + stock.restock)."""
    upserts = commands(
        "sku.upsert",
        (
            {
                "sku": s,
                "name": f"Item {s}",
                "unit_price": 1000 + 37 * i,
                "merchant_id": f"M{i % 5}",
                "warehouse_id": f"W{i % 5}",
            }
            for i, s in enumerate(skus)
        ),
    )
    publish_async(system.amqp_url, upserts)
    wait_with_bar(
        "catalog: sku.upsert", len(skus), lambda: int(scalar(system, "SELECT count(*) FROM skus")), 120
    )
    restocks = commands(
        "stock.restock",
        ({"sku": s, "warehouse_id": f"W{i % 5}", "quantity": stock} for i, s in enumerate(skus)),
    )
    publish_async(system.amqp_url, restocks)
    wait_with_bar(
        "catalog: stock.restock",
        len(skus),
        lambda: int(scalar(system, "SELECT count(*) FROM stock WHERE available > 0")),
        120,
    )


def seed_catalog_sql(system: System, skus: Sequence[str], stock: int) -> None:
    """SKUs and stock straight into the tables (for the raw floor, which runs no consumer)."""
    with pg(system) as conn, conn.cursor() as cur:
        for i, s in enumerate(skus):
            cur.execute(
                "INSERT INTO skus (sku, name, unit_price, merchant_id, warehouse_id) VALUES (%s,%s,%s,%s,%s)",
                (s, f"Item {s}", 1000 + 37 * i, f"M{i % 5}", f"W{i % 5}"),
            )
            cur.execute(
                "INSERT INTO stock (sku, warehouse_id, available, restocked_total) VALUES (%s,%s,%s,%s)",
                (s, f"W{i % 5}", stock, stock),
            )


def vhost_of(system: System) -> str:
    return urllib.parse.quote(system.vhost, safe="")


def broker_memory() -> dict[str, Any]:
    """Memory of the broker node (bytes) from the management API."""
    nodes = rabbit_api("GET", "/nodes")
    node = nodes[0]
    return {"node": node["name"], "mem_used": node.get("mem_used"), "mem_limit": node.get("mem_limit")}


def queue_stats(system: System, queue: str) -> dict[str, Any]:
    q = rabbit_api("GET", f"/queues/{vhost_of(system)}/{urllib.parse.quote(queue, safe='')}")
    return {k: q.get(k) for k in ("messages", "messages_ready", "memory", "message_bytes", "type")}


def declare_sink(system: System, queue: str, exchange: str = "order.events", key: str = "#") -> None:
    conn = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, exchange, key)
    finally:
        conn.close()


def noise_note() -> str:
    return f"load average {machine_busy():.2f} on {os.cpu_count()} cores"
