"""`orders health`: the database, the broker, the consumer queues, the parking lot and the outbox."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from sqlalchemy import Engine, text

from cli.format import describe_error
from cli.views import unsent_outbox
from consumers.amqp import connection_parameters
from domain.names import PARKING_LOT_QUEUE
from settings import Settings


@dataclass(frozen=True)
class Thresholds:
    """When a measured value makes the service unhealthy (None: reported, never fails)."""

    max_outbox_age_s: float = 60.0
    max_queue_depth: int | None = None
    max_parked: int | None = None


@dataclass
class Component:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, **self.data}


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def database_components(engine: Engine, thresholds: Thresholds) -> list[Component]:
    """The database answers, and the outbox relay keeps up."""
    started = time.monotonic()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            latency = _elapsed_ms(started)
            unsent, oldest = unsent_outbox(conn)
    except Exception as exc:  # any failure to reach it is the finding, not a crash
        return [Component("database", False, f"unreachable: {describe_error(exc)}".splitlines()[0])]
    lagging = oldest is not None and oldest > thresholds.max_outbox_age_s
    return [
        Component("database", True, f"SELECT 1 in {latency} ms", {"latency_ms": latency}),
        Component(
            "outbox",
            not lagging,
            f"{unsent} unsent"
            + (
                f", oldest {oldest:.0f}s (limit {thresholds.max_outbox_age_s:.0f}s)"
                if oldest is not None
                else ""
            ),
            {"unsent": unsent, "oldest_unsent_s": round(oldest, 1) if oldest is not None else None},
        ),
    ]


def broker_components(settings: Settings, queues: Iterable[str], thresholds: Thresholds) -> list[Component]:
    """The broker accepts a connection; every consumer queue exists, has a consumer and is not backed up."""
    started = time.monotonic()
    try:
        connection = pika.BlockingConnection(connection_parameters(settings, "orders-cli health"))
    except (pika.exceptions.AMQPError, OSError) as exc:
        return [Component("broker", False, f"unreachable: {describe_error(exc)}")]
    out = [Component("broker", True, f"connected in {_elapsed_ms(started)} ms")]
    try:
        channel = connection.channel()
        for queue in [*queues, PARKING_LOT_QUEUE]:
            try:
                ok = channel.queue_declare(queue, passive=True).method
            except pika.exceptions.ChannelClosedByBroker as exc:
                out.append(Component(f"queue {queue}", False, f"missing: {exc.reply_text}"))
                channel = connection.channel()  # a failed passive declare closes the channel
                continue
            depth, consumers = ok.message_count, ok.consumer_count
            data = {"queue": queue, "messages": depth, "consumers": consumers}
            if queue == PARKING_LOT_QUEUE:
                too_many = thresholds.max_parked is not None and depth > thresholds.max_parked
                out.append(Component("parking-lot", not too_many, f"{depth} parked", data))
                continue
            problems = []
            if consumers == 0:
                problems.append("no consumer")
            if thresholds.max_queue_depth is not None and depth > thresholds.max_queue_depth:
                problems.append(f"depth over {thresholds.max_queue_depth}")
            detail = f"{depth} ready, {consumers} consumer(s)" + (
                f": {', '.join(problems)}" if problems else ""
            )
            out.append(Component(f"queue {queue}", not problems, detail, data))
    finally:
        if connection.is_open:
            connection.close()
    return out
