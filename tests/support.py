"""Test harness: a fresh vhost and database, the real consumer processes, and an event listener.

Nothing here mocks the broker or the database: the service runs as `run_consumer.py`
processes against a vhost and a database made for the test session and deleted afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg2
import psycopg2.extras

from domain.names import EVENTS_EXCHANGE, TIMERS_FIRED_EXCHANGE, Timer
from domain.signing import sign
from publishers.commands import CommandPublisher

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_BASE = os.environ.get("TEST_PG_URL_BASE", "postgresql+psycopg2://postgres@127.0.0.1:5432")
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
RABBIT_API = os.environ.get("TEST_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_USER = os.environ.get("TEST_RABBIT_USER", "guest")
RABBIT_PASSWORD = os.environ.get("TEST_RABBIT_PASSWORD", "guest")
SECRET = "test-webhook-secret"


# --------------------------------------------------------------------------------------------
# Broker administration (management HTTP API, or rabbitmqctl when the plugin is off)


def rabbit_api(method: str, path: str, body: Any = None) -> Any:
    """Call the RabbitMQ management API; returns the decoded JSON (or None)."""
    req = urllib.request.Request(
        f"{RABBIT_API}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
    )
    token = base64.b64encode(f"{RABBIT_USER}:{RABBIT_PASSWORD}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = resp.read()
    return json.loads(data) if data else None


def create_vhost(name: str) -> None:
    quoted = urllib.parse.quote(name, safe="")
    rabbit_api("PUT", f"/vhosts/{quoted}", {})
    rabbit_api(
        "PUT", f"/permissions/{quoted}/{RABBIT_USER}", {"configure": ".*", "write": ".*", "read": ".*"}
    )


def delete_vhost(name: str) -> None:
    try:
        rabbit_api("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}")
    except urllib.error.HTTPError:
        pass


def queue_info(vhost: str, queue: str) -> dict[str, Any]:
    return rabbit_api(
        "GET", f"/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    )


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, read over AMQP (exact, unlike the API's sampling)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    finally:
        conn.close()


def purge_queue(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return conn.channel().queue_purge(queue).method.message_count
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Database


def admin_execute(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(name: str) -> str:
    """Create an empty database and migrate it with `alembic upgrade head`; returns its URL."""
    admin_execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_URL_BASE}/{name}"
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        capture_output=True,
    )
    return url


def drop_database(name: str) -> None:
    admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    admin_execute(f'DROP DATABASE IF EXISTS "{name}"')


class Db:
    """Plain SQL against the test database, for Given steps and Then checks."""

    def __init__(self, url: str) -> None:
        self.dsn = url.replace("postgresql+psycopg2://", "postgresql://")

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(sql, params or None)
                rows = [dict(r) for r in cur.fetchall()] if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def one(self, sql: str, *params: Any) -> dict[str, Any]:
        rows = self.query(sql, *params)
        assert len(rows) == 1, f"expected one row, got {len(rows)}: {sql}"
        return rows[0]

    def scalar(self, sql: str, *params: Any) -> Any:
        return next(iter(self.one(sql, *params).values()))


# --------------------------------------------------------------------------------------------
# Events


@dataclass
class Event:
    routing_key: str
    body: dict[str, Any]
    properties: pika.BasicProperties


@dataclass
class EventListener:
    """Collects every event published to order.events in the vhost, on a background thread."""

    url: str
    events: list[Event] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> EventListener:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "event listener did not start"
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.url))
                ch = conn.channel()
                ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
                queue = f"test.events.{uuid.uuid4().hex[:8]}"
                ch.queue_declare(queue, durable=True, arguments={"x-expires": 600_000})
                ch.queue_bind(queue, EVENTS_EXCHANGE, "#")

                def on_message(_ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
                    with self._cond:
                        self.events.append(Event(method.routing_key, json.loads(body), props))
                        self._cond.notify_all()

                ch.basic_consume(queue, on_message, auto_ack=True)
                self._ready.set()
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.2)
                # Stopped: a durable queue left bound to every event would keep taking (and
                # writing to disk) all the events that follow, with nobody reading them.
                ch.queue_delete(queue)
                conn.close()
            except pika.exceptions.AMQPError:
                time.sleep(0.5)  # the broker restarts in fault tests: listen again

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def matching(self, routing_key: str, **fields: Any) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.routing_key == routing_key and all(e.body.get(k) == v for k, v in fields.items())
            ]

    def wait_for(
        self,
        routing_key: str,
        timeout: float = 15,
        count: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> list[Event]:
        """Wait until `count` events of this key (with these field values) have arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.matching(routing_key, **fields) if where is None or where(e.body)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"waited {timeout}s for {count} {routing_key} {fields}; got {len(found)}. "
                        f"Last events: {[(e.routing_key, e.body) for e in self.events[-8:]]}"
                    )
                self._cond.wait(remaining)

    def one(self, routing_key: str, timeout: float = 15, **fields: Any) -> dict[str, Any]:
        return self.wait_for(routing_key, timeout, **fields)[0].body

    def for_correlation(self, correlation_id: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.properties.correlation_id == correlation_id]


# --------------------------------------------------------------------------------------------
# The service under test


@dataclass
class System:
    """One isolated deployment: a vhost, a database, consumer processes, a publisher, a listener."""

    vhost: str
    db_name: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("TEST_LOG_DIR", "/tmp/order-tests")))

    @property
    def amqp_url(self) -> str:
        return self.env["AMQP_URL"]

    @property
    def db(self) -> Db:
        return Db(self.env["DATABASE_URL"])

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a repository script (topology.py, run_consumer.py --list, the CLI) against this system."""
        return subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, **self.env, **(env or {})},
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def orders(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "cli.main", *args, check=check)

    def start(self, *queues: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """Start one consumer process per queue and wait until each is consuming."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for queue in queues:
            log = open(self.log_dir / f"{self.vhost}-{queue}.log", "ab")  # noqa: SIM115
            self.processes[queue] = subprocess.Popen(
                [sys.executable, "run_consumer.py", queue],
                cwd=ROOT,
                env={**os.environ, **self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_consuming(*queues)

    def start_another(self, queue: str) -> subprocess.Popen[bytes]:
        """One more consumer process for an already started queue (competing consumers); caller stops it."""
        return subprocess.Popen(
            [sys.executable, "run_consumer.py", queue],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_consuming(self, *queues: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for queue in queues:
            while True:
                proc = self.processes.get(queue)
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(
                        f"consumer {queue} exited with {proc.returncode}; see {self.log_dir}"
                    )
                try:
                    if queue_counts(self.amqp_url, queue)[1] > 0:
                        break
                except pika.exceptions.AMQPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"consumer {queue} did not start; see {self.log_dir}")
                time.sleep(0.1)

    def stop(self, *queues: str, sig: int = signal.SIGTERM, timeout: float = 30) -> dict[str, int]:
        """Signal consumers (all by default) and wait for them; returns their exit codes."""
        codes = {}
        for queue in queues or list(self.processes):
            proc = self.processes.pop(queue, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                codes[queue] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[queue] = proc.wait()
        return codes

    def kill(self, queue: str) -> None:
        """kill -9 one consumer process."""
        self.stop(queue, sig=signal.SIGKILL)

    def publisher(self) -> CommandPublisher:
        return CommandPublisher(self.amqp_url, app_id="tests")

    def send(self, routing_key: str, body: dict[str, Any], message_id: str | None = None) -> str:
        with self.publisher() as pub:
            return pub.send(routing_key, body, message_id=message_id)

    def publish_raw(
        self,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        exchange: str = "order.commands",
    ) -> None:
        """Publish exactly these bytes and properties (for malformed input) with a confirm."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(exchange, routing_key, body, properties)
        finally:
            conn.close()

    def fire_timer(self, kind: str, body: dict[str, Any]) -> None:
        """A timer message as its delay queue dead-letters it, straight to the timeouts queue."""
        props = pika.BasicProperties(
            message_id=str(uuid.uuid4()), content_type="application/json", delivery_mode=2
        )
        self.publish_raw(
            Timer.fired_key(kind), json.dumps({"kind": kind, **body}).encode(), props, TIMERS_FIRED_EXCHANGE
        )

    def signed(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "signature": sign(body, self.env["PAYMENT_WEBHOOK_SECRET"])}

    def parked(self) -> list[tuple[pika.BasicProperties, bytes]]:
        """Every message in the parking lot (left in place)."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            ch = conn.channel()
            out = []
            while True:
                method, props, body = ch.basic_get("order.parking-lot", auto_ack=False)
                if method is None:
                    break
                out.append((props, body))
            return out
        finally:
            conn.close()  # unacked messages go back to the queue

    def wait_parked(self, message_id: str, timeout: float = 15) -> pika.BasicProperties:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for props, _ in self.parked():
                if props.message_id == message_id:
                    return props
            time.sleep(0.2)
        raise AssertionError(f"{message_id} never reached the parking lot")


DEFAULT_ENV = {
    "PAYMENT_WEBHOOK_SECRET": SECRET,
    "ORDER_PAYMENT_TIMEOUT": "2s",
    "AUTO_CONFIRM_RECEIPT_AFTER": "4s",
    "AFTERSALE_REVIEW_TIMEOUT": "4s",
    "SWEEPER_INTERVAL": "1s",
    "SWEEPER_GRACE": "3s",
    "RETRY_DELAYS": "1s,2s",
    "TRANSIENT_RETRY_SECONDS": "20",
    "HEARTBEAT": "5",
    "LOG_FORMAT": "json",
}


def timer_refs(body: bytes) -> list[str]:
    """The refs a fired timer message carries: one `ref`, or the `refs` of a window's timers."""
    data = json.loads(body)
    return list(data["refs"]) if "refs" in data else [data["ref"]]


def clean_up_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that a killed run still stops its consumers and
    deletes its vhost and database (a default SIGTERM skips every `finally`: an interrupted
    benchmark once left a vhost with a million messages in a quorum queue behind)."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def fresh_system(**env: str) -> Iterator[System]:
    """A new vhost and database with the topology declared; both are deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    vhost, db_name = f"test-{tag}", f"orders_test_{tag}"
    create_vhost(vhost)
    try:
        url = create_database(db_name)
        system = System(
            vhost,
            db_name,
            {
                **DEFAULT_ENV,
                **env,
                "AMQP_URL": f"{AMQP_BASE}/{urllib.parse.quote(vhost, safe='')}",
                "DATABASE_URL": url,
            },
        )
        system.run("topology.py")
        try:
            yield system
        finally:
            system.stop()
    finally:
        delete_vhost(vhost)
        drop_database(db_name)


def unique(prefix: str) -> str:
    """A name no other test uses (tests share a session's system)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def given_sku(
    system: System, events: EventListener, price: int, stock: int, merchant: str = "M1", warehouse: str = "W1"
) -> str:
    """A new SKU of `merchant` with `stock` units in `warehouse` (none when stock is 0)."""
    sku = unique("sku")
    system.send(
        "sku.upsert",
        {
            "sku": sku,
            "name": f"Item {sku}",
            "unit_price": price,
            "merchant_id": merchant,
            "warehouse_id": warehouse,
        },
    )
    events.one("sku.upserted", sku=sku)
    if stock:
        system.send("stock.restock", {"sku": sku, "warehouse_id": warehouse, "quantity": stock})
        events.one("stock.restocked", sku=sku)
    return sku
