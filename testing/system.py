"""The service under test: a fresh vhost and database, the real consumer processes, clean-up.

`fresh_system` makes a vhost and a database (migrated with `alembic upgrade head`, topology
declared), runs the service as `run_consumer.py` processes against them, and deletes both
afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from domain.names import TIMERS_FIRED_EXCHANGE, Timer
from domain.signing import sign
from publishers.commands import CommandPublisher
from testing.broker import AMQP_BASE, EventListener, create_vhost, delete_vhost, queue_counts
from testing.database import Db, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-webhook-secret"

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


def _migrate(url: str) -> None:
    """`alembic upgrade head` on an empty database."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        capture_output=True,
    )


@contextmanager
def fresh_system(**env: str) -> Iterator[System]:
    """A new vhost and database with the topology declared; both are deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    vhost, db_name = f"test-{tag}", f"orders_test_{tag}"
    create_vhost(vhost)
    try:
        url = create_database(db_name)
        _migrate(url)
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


@contextmanager
def own_system(*queues: str, **env: str) -> Iterator[tuple[System, EventListener]]:
    """A fresh system of the test's own (it changes timers or stops consumers), running
    `queues`, with a listener for its events."""
    with fresh_system(**env) as system:
        system.start(*queues)
        events = EventListener(system.amqp_url).start()
        try:
            yield system, events
        finally:
            events.stop()


def wait_until(condition: object, timeout: float, what: str) -> None:
    """Poll `condition` (a callable) every 0.1s until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout}s for {what}")


def unique(prefix: str) -> str:
    """A name no other test uses (tests share a session's system)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def clean_up_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that a killed run still stops its consumers and
    deletes its vhost and database (a default SIGTERM skips every `finally`: an interrupted
    benchmark once left a vhost with a million messages in a quorum queue behind)."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
