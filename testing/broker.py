"""RabbitMQ for tests and benchmarks: the management API, vhosts, queue counts, an event listener."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
from pydantic import ValidationError

from consumers.events import EVENTS
from domain.names import EVENTS_EXCHANGE

AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
RABBIT_API = os.environ.get("TEST_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_USER = os.environ.get("TEST_RABBIT_USER", "guest")
RABBIT_PASSWORD = os.environ.get("TEST_RABBIT_PASSWORD", "guest")


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
    with contextlib.suppress(urllib.error.HTTPError):
        rabbit_api("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}")


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


def timer_refs(body: bytes) -> list[str]:
    """The refs a fired timer message carries: one `ref`, or the `refs` of a window's timers."""
    data = json.loads(body)
    return list(data["refs"]) if "refs" in data else [data["ref"]]


# --------------------------------------------------------------------------------------------
# Events


@dataclass
class Event:
    routing_key: str
    body: dict[str, Any]
    properties: pika.BasicProperties


def off_contract(event: Event) -> str | None:
    """Why an event on order.events does not match its typed model (None when it does)."""
    model = EVENTS.get(event.routing_key)
    if model is None:
        return f"{event.routing_key}: no event of that name in consumers/events.py"
    try:
        model.model_validate(event.body)
    except ValidationError as exc:
        return f"{event.routing_key}: {exc.errors(include_url=False)} in {event.body}"
    return None


@dataclass
class EventListener:
    """Collects every event published to order.events in the vhost, on a background thread."""

    url: str
    events: list[Event] = field(default_factory=list)
    # Events that do not match their model in consumers/events.py (name: why): the contract's
    # typed events are the only shapes the service may publish.
    off_contract: list[str] = field(default_factory=list)
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
                    event = Event(method.routing_key, json.loads(body), props)
                    problem = off_contract(event)
                    with self._cond:
                        self.events.append(event)
                        if problem:
                            self.off_contract.append(problem)
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
