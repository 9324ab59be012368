"""Prometheus metrics and the `/healthz` endpoint of one consumer process (on `METRICS_PORT`).

The consumer reports to `MetricsObserver` (its consumers.observer.Observer); the outbox relay,
the sweeper and the reconnect paths call the small recording functions below. Database gauges
(outbox backlog and lag, pending timers, orders by status) are sampled by a background job
every few seconds with cheap counts. Everything lives in one registry per process, served
with the process and GC collectors by a WSGI server on a daemon thread.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
import psycopg2
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from consumers.delivery import Delivery
from consumers.outcomes import Applied, Duplicate, Outcome, Park, Retry, WindowFailed
from consumers.routes import ConsumerSpec
from domain.names import Timer
from domain.status import AfterSaleStatus, OrderStatus
from logs import redact_text
from settings import Settings

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger("metrics")

# `_created` series double every counter's output and nobody on call reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

UNKNOWN_ROUTING_KEY = "(unknown)"  # one label value for every routing key no route knows
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_MESSAGE = ("queue", "routing_key")

CONSUMED = Counter("order_messages_consumed", "Messages taken from the queue", _MESSAGE, registry=REGISTRY)
APPLIED = Counter(
    "order_messages_applied",
    "Messages applied and acked (business refusals included: they are answered, not parked)",
    _MESSAGE,
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "order_messages_duplicate", "Messages whose message_id was already processed", _MESSAGE, registry=REGISTRY
)
PARKED = Counter(
    "order_messages_parked",
    "Messages rejected (command.rejected) and moved to the parking lot, by reason code",
    (*_MESSAGE, "code"),
    registry=REGISTRY,
)
RETRIED = Counter(
    "order_messages_retried", "Messages sent to a retry delay queue", _MESSAGE, registry=REGISTRY
)
REFUSED = Counter(
    "order_commands_refused",
    "Valid commands the business refused (OUT_OF_STOCK, BAD_SIGNATURE, ...); a retried window counts again",
    (*_MESSAGE, "reason"),
    registry=REGISTRY,
)
TRANSIENT_RETRIES = Counter(
    "order_transient_retries",
    "Window transactions that failed for a transient database reason and were retried in process",
    ("queue",),
    registry=REGISTRY,
)
WINDOW_SECONDS = Histogram(
    "order_window_seconds",
    "Time to handle one window: validate, apply in one transaction, republish, ack",
    ("queue",),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
WINDOW_SIZE = Histogram(
    "order_window_messages",
    "Messages per window (bounded by PREFETCH)",
    ("queue",),
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)
HANDLER_SECONDS = Histogram(
    "order_handler_seconds",
    "Time to apply one message inside its window's transaction (each attempt)",
    _MESSAGE,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CONSUMER_CONNECTED = Gauge(
    "order_consumer_connected",
    "1 while the consumer is subscribed to its queue",
    ("queue",),
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "order_reconnects",
    "Connections lost and re-opened, by component (consumer, relay) and peer (broker, database)",
    ("component", "peer"),
    registry=REGISTRY,
)
RELAY_PUBLISHED = Counter(
    "order_relay_published",
    "Outbox rows published with a confirm and marked sent (events and timers)",
    ("exchange", "routing_key"),
    registry=REGISTRY,
)
RELAY_FAILED = Counter(
    "order_relay_failed",
    "Outbox rows the broker nacked or could not route; left unsent for the next batch",
    ("exchange", "routing_key"),
    registry=REGISTRY,
)
SWEEPER_FAILED = Counter(
    "order_sweeper_failed",
    "Overdue timers the backstop sweeper failed to apply (rolled back, tried again next pass), by kind",
    ("kind",),
    registry=REGISTRY,
)
OUTBOX_BACKLOG = Gauge("order_outbox_backlog", "Outbox rows not yet published", registry=REGISTRY)
OUTBOX_LAG = Gauge(
    "order_outbox_lag_seconds", "Age of the oldest unpublished outbox row (0 when none)", registry=REGISTRY
)
TIMERS_PENDING = Gauge(
    "order_timers_pending", "Things waiting on a timer, by timer kind", ("kind",), registry=REGISTRY
)
TIMERS_OVERDUE = Gauge(
    "order_timers_overdue",
    "Pending timers whose deadline has passed (the timer or the sweeper should fire them soon)",
    ("kind",),
    registry=REGISTRY,
)
ORDERS = Gauge(
    "order_orders", "Orders by status and level (parent or child)", ("status", "level"), registry=REGISTRY
)
SAMPLE_ERRORS = Counter(
    "order_sample_errors",
    "Database samples that failed (the gauges keep their last value)",
    registry=REGISTRY,
)
LAST_SAMPLE = Gauge(
    "order_last_sample_timestamp_seconds", "When the database gauges were last sampled", registry=REGISTRY
)


# ---------------------------------------------------------------------------------------------
# Recording: the consumer's observer, and the relay's, the sweeper's and the reconnects' counts


def _routing_key(spec: ConsumerSpec, routing_key: str) -> str:
    # An unknown key comes from producers: as a label value it would grow without bound.
    return routing_key if routing_key in spec.routes else UNKNOWN_ROUTING_KEY


class MetricsObserver:
    """What the consumer reports (consumers.observer.Observer), recorded in this process's registry."""

    def window_received(self, spec: ConsumerSpec, window: Sequence[Delivery]) -> float:
        """Count a window's messages as consumed; returns the start time for `window_acked`."""
        WINDOW_SIZE.labels(spec.queue).observe(len(window))
        for delivery in window:
            CONSUMED.labels(spec.queue, _routing_key(spec, delivery.routing_key)).inc()
        return time.perf_counter()

    def window_acked(
        self, spec: ConsumerSpec, window: Sequence[Delivery], outcomes: Sequence[Outcome], started: float
    ) -> None:
        """Count each message of an acked window by its outcome, and the window's duration."""
        WINDOW_SECONDS.labels(spec.queue).observe(time.perf_counter() - started)
        for delivery, outcome in zip(window, outcomes, strict=True):
            labels = (spec.queue, _routing_key(spec, delivery.routing_key))
            if isinstance(outcome, Applied):
                APPLIED.labels(*labels).inc()
            elif isinstance(outcome, Duplicate):
                DUPLICATES.labels(*labels).inc()
            elif isinstance(outcome, Park):
                PARKED.labels(*labels, outcome.code).inc()
            elif isinstance(outcome, Retry):
                RETRIED.labels(*labels).inc()

    def time_handler(self, spec: ConsumerSpec, routing_key: str) -> Callable[[], None]:
        """Start timing one message; call the result when it is done."""
        started = time.perf_counter()
        histogram = HANDLER_SECONDS.labels(spec.queue, _routing_key(spec, routing_key))
        return lambda: histogram.observe(time.perf_counter() - started)

    def command_refused(self, spec: ConsumerSpec, routing_key: str, reason: str) -> None:
        REFUSED.labels(spec.queue, _routing_key(spec, routing_key), reason).inc()

    def transient_retry(self, queue: str) -> None:
        TRANSIENT_RETRIES.labels(queue).inc()

    def consumer_connected(self, queue: str, connected: bool) -> None:
        CONSUMER_CONNECTED.labels(queue).set(1 if connected else 0)
        _health.consuming[queue] = connected

    def reconnecting(self, component: str, exc: BaseException) -> None:
        reconnecting(component, exc)

    def sweeper_failed(self, kind: str) -> None:
        SWEEPER_FAILED.labels(kind).inc()


def reconnecting(component: str, exc: BaseException) -> None:
    """Count a lost connection of `component` (consumer, relay), blaming the database or the broker."""
    RECONNECTS.labels(component, "database" if _is_database_error(exc) else "broker").inc()


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, SQLAlchemyError | psycopg2.Error | WindowFailed)


def relay_batch(rows: Iterable[Any], sent: Iterable[int], failed: Iterable[int]) -> None:
    """Count the outbox rows of a committed relay batch by exchange and routing key."""
    sent_ids, failed_ids = set(sent), set(failed)
    published: collections.Counter[tuple[str, str]] = collections.Counter()
    refused: collections.Counter[tuple[str, str]] = collections.Counter()
    for row in rows:
        if row.id in sent_ids:
            published[(row.exchange, row.routing_key)] += 1
        elif row.id in failed_ids:
            refused[(row.exchange, row.routing_key)] += 1
    for (exchange, key), count in published.items():
        RELAY_PUBLISHED.labels(exchange, key).inc(count)
    for (exchange, key), count in refused.items():
        RELAY_FAILED.labels(exchange, key).inc(count)


# ---------------------------------------------------------------------------------------------
# Database gauges, sampled


# Each count is served by a partial index (ix_outbox_unsent, ix_orders_unpaid_deadline,
# ix_orders_shipped, ix_aftersales_review), so sampling stays cheap on a large database.
_SAMPLE = text(
    """
    SELECT
      (SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS backlog,
      (SELECT EXTRACT(EPOCH FROM now() - created_at) FROM outbox
        WHERE sent_at IS NULL ORDER BY id LIMIT 1) AS lag,
      unpaid.pending AS unpaid_pending, unpaid.overdue AS unpaid_overdue,
      shipped.pending AS shipped_pending, shipped.overdue AS shipped_overdue,
      review.pending AS review_pending, review.overdue AS review_overdue
    FROM
      (SELECT count(*) AS pending, count(*) FILTER (WHERE pay_deadline < now()) AS overdue
         FROM orders WHERE status = :pending_payment AND parent_no IS NULL) AS unpaid,
      (SELECT count(*) AS pending,
              count(*) FILTER (WHERE shipped_at < now() - make_interval(secs => :confirm_after)) AS overdue
         FROM orders WHERE status = :shipped AND parent_no IS NOT NULL) AS shipped,
      (SELECT count(*) AS pending, count(*) FILTER (WHERE review_deadline < now()) AS overdue
         FROM aftersales WHERE status = :pending_review) AS review
    """
)
_ORDERS_BY_STATUS = text(
    "SELECT status, parent_no IS NULL AS is_parent, count(*) AS n FROM orders GROUP BY 1, 2"
)


@dataclass
class Sample:
    """The last database sample, also shown by /healthz."""

    outbox_backlog: int = 0
    outbox_lag_seconds: float = 0.0
    at: float | None = None


@dataclass
class DatabaseSampler:
    """Samples the database gauges every `interval` seconds; orders by status every `status_every` ticks."""

    engine: Engine
    settings: Settings
    interval: float = 5.0
    status_every: int = 6  # orders by status is a full count: every 30 s is plenty

    def sample(self, with_statuses: bool = True) -> Sample:
        """Read the gauges once (a few index-backed counts) and set them."""
        with self.engine.connect() as conn:
            row = conn.execute(
                _SAMPLE,
                {
                    "pending_payment": OrderStatus.PENDING_PAYMENT.value,
                    "shipped": OrderStatus.SHIPPED.value,
                    "pending_review": AfterSaleStatus.PENDING_REVIEW.value,
                    "confirm_after": self.settings.auto_confirm_receipt_after.total_seconds(),
                },
            ).one()
            statuses = conn.execute(_ORDERS_BY_STATUS).all() if with_statuses else None
        sample = Sample(int(row.backlog), float(row.lag or 0.0), time.time())
        OUTBOX_BACKLOG.set(sample.outbox_backlog)
        OUTBOX_LAG.set(sample.outbox_lag_seconds)
        for kind, pending, overdue in (
            (Timer.PAYMENT_TIMEOUT, row.unpaid_pending, row.unpaid_overdue),
            (Timer.AUTO_CONFIRM, row.shipped_pending, row.shipped_overdue),
            (Timer.AFTERSALE_REVIEW, row.review_pending, row.review_overdue),
        ):
            TIMERS_PENDING.labels(kind).set(pending)
            TIMERS_OVERDUE.labels(kind).set(overdue)
        if statuses is not None:
            counts = {(s.value, level): 0 for s in OrderStatus for level in ("parent", "child")}
            counts.update({(r.status, "parent" if r.is_parent else "child"): r.n for r in statuses})
            for (status, level), count in counts.items():
                ORDERS.labels(status, level).set(count)
        LAST_SAMPLE.set(sample.at or 0)
        _health.sample = sample
        return sample

    def run(self, stop: threading.Event) -> None:
        """Sample until `stop` is set; a failure is logged once per outage and sampling goes on."""
        tick, failing = 0, False
        while not stop.is_set():
            try:
                self.sample(with_statuses=tick % self.status_every == 0)
                if failing:
                    log.info("database sampling recovered")
                failing = False
            except Exception as exc:
                SAMPLE_ERRORS.inc()
                if not failing:
                    log.warning("database sampling failed", extra={"error": redact_text(repr(exc))})
                failing = True
            tick += 1
            stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint: /metrics and /healthz


@dataclass
class _Health:
    """What /healthz reports: set by `serve`, the consumer's observer and the sampler."""

    queue: str = ""
    engine: Engine | None = None
    sample: Sample | None = None
    consuming: dict[str, bool] = field(default_factory=dict)


_health = _Health()


def health() -> tuple[bool, dict[str, Any]]:
    """(healthy, details): healthy when the consumer is subscribed and the database answers SELECT 1."""
    connected = _health.consuming.get(_health.queue, False)
    database = "not configured"
    if _health.engine is not None:
        try:
            with _health.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            database = "ok"
        except Exception as exc:
            database = redact_text(f"{type(exc).__name__}: {exc}".splitlines()[0])[:300]
    healthy = connected and database == "ok"
    details: dict[str, Any] = {
        "status": "ok" if healthy else "unhealthy",
        "queue": _health.queue,
        "consumer": "connected" if connected else "disconnected",
        "database": database,
    }
    if _health.sample is not None:
        details["outbox_backlog"] = _health.sample.outbox_backlog
        details["outbox_lag_seconds"] = round(_health.sample.outbox_lag_seconds, 3)
        details["sampled_at"] = _health.sample.at
    return healthy, details


def _app(metrics_app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            healthy, details = health()
            body = json.dumps(details).encode()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


class _ThreadingServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per request, so a slow /healthz (database timeout) never blocks a scrape.
        threading.Thread(
            target=self._serve_one, args=(request, client_address), daemon=True, name="metrics-request"
        ).start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def serve(port: int, queue: str, engine: Engine) -> WSGIServer:
    """Serve /metrics and /healthz for `queue` on `port` (all interfaces) from a daemon thread."""
    _health.queue, _health.engine = queue, engine
    server = make_server(
        "", port, _app(make_wsgi_app(REGISTRY)), server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    log.info("metrics and /healthz served", extra={"port": port})
    return server


def start(settings: Settings, queue: str, engine: Engine) -> Callable[[threading.Event], None]:
    """Start the HTTP endpoint on METRICS_PORT; returns the sampling job for the consumer's threads."""
    assert settings.metrics_port is not None
    CONSUMER_CONNECTED.labels(queue).set(0)
    try:
        serve(settings.metrics_port, queue, engine)
    except OSError as exc:
        # Metrics are not worth stopping order processing for: say so loudly and go on.
        log.error("metrics port unavailable", extra={"port": settings.metrics_port, "error": repr(exc)})
    sampler = DatabaseSampler(engine, settings)

    def sample_database(stop: threading.Event) -> None:
        sampler.run(stop)

    return sample_database
