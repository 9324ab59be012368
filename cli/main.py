"""The `orders` command: look at orders and stock, send commands, tend the parking lot, check health.

    orders show ORDER_NO [--json]          orders stock SKU [--json]
    orders list [--user U] [--status S]    orders sign BODY_JSON
    orders send ROUTING_KEY BODY_JSON      orders parking-lot list | replay MESSAGE_ID|--all
    orders check [--json]                  orders refunds [--failed] | refund-retry REFUND_NO
    orders health [--json]                 orders report --since DATE [--csv]

Settings (DATABASE_URL, AMQP_URL) are read when a command runs, never at import.
Exit codes: 0 fine, 1 not found / unhealthy / invariant broken / unreachable, 2 bad usage.
"""

from __future__ import annotations

import csv
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from cli import render, views
from cli.format import describe_error, parse_since, to_json
from domain.errors import Refusal
from settings import InsecureSetting, Settings, load_settings
from store.db import make_engine

app = typer.Typer(
    name="orders",
    help="Operate the order service: orders, stock, commands, the parking lot, invariants, health.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
parking_app = typer.Typer(help="What is parked in order.parking-lot, and replaying it.", no_args_is_help=True)
app.add_typer(parking_app, name="parking-lot")

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


# ---------------------------------------------------------------------------------------------
# Plumbing


def _console(stderr: bool = False) -> Console:
    # Piped output is not cut at 80 columns: operators grep it.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _print(renderable: RenderableType) -> None:
    _console().print(renderable)


def _print_json(value: Any) -> None:
    sys.stdout.write(to_json(value, indent=2) + "\n")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error to stderr and stop with `code`."""
    _console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    return load_settings()


@contextmanager
def _database(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        yield engine
    except DBAPIError as exc:
        fail(f"database error: {str(exc.orig or exc).strip().splitlines()[0]}")
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Orders and stock


@app.command()
def show(
    order_no: Annotated[str, typer.Argument(help="A parent or child order number.")],
    as_json: JsonOption = False,
) -> None:
    """An order: status, money, times, receiver, items, children, payments, refunds, after-sales, timeline."""
    with _database(_settings()) as engine, engine.connect() as conn:
        view = views.order_view(conn, order_no)
    if view is None:
        fail(f"no order {order_no}")
    _print_json(view) if as_json else _print(render.order(view))


@app.command()
def stock(sku: Annotated[str, typer.Argument(help="The SKU.")], as_json: JsonOption = False) -> None:
    """A SKU's available (locked units excluded), locked and sold counts, in total and per warehouse."""
    with _database(_settings()) as engine, engine.connect() as conn:
        view = views.stock_view(conn, sku)
    if view is None:
        fail(f"no SKU {sku}")
    _print_json(view) if as_json else _print(render.stock(view))


@app.command("list")
def list_orders(
    user: Annotated[str | None, typer.Option(help="Only this user's orders.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only orders in this status, e.g. PENDING_PAYMENT.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent parent orders (to find an order number)."""
    with _database(_settings()) as engine, engine.connect() as conn:
        rows = views.order_list(conn, user, status, limit)
    _print_json(rows) if as_json else _print(render.rows_table("Orders", rows))


# ---------------------------------------------------------------------------------------------
# Commands to the service


@app.command()
def sign(
    body_json: Annotated[str, typer.Argument(help="A payment.notify or refund.result body, unsigned.")],
) -> None:
    """Print the body with its `signature` (HMAC-SHA256 with PAYMENT_WEBHOOK_SECRET), for smoke tests."""
    from domain.signing import sign as hmac_sign

    try:
        body = json.loads(body_json)
    except json.JSONDecodeError as exc:
        fail(f"BODY_JSON is not valid JSON: {exc}", 2)
    if not isinstance(body, dict):
        fail("BODY_JSON must be a JSON object", 2)
    body.pop("signature", None)
    try:
        secret = _settings().webhook_secret()
    except InsecureSetting as exc:  # unset or a published example value (outside DEV_MODE)
        fail(str(exc), 2)
    typer.echo(json.dumps({**body, "signature": hmac_sign(body, secret)}, separators=(",", ":")))


@app.command()
def send(
    routing_key: Annotated[str, typer.Argument(help="The command's name, e.g. order.place.")],
    body_json: Annotated[str, typer.Argument(help="The command's body as JSON.")],
    message_id: Annotated[str | None, typer.Option(help="Use this message_id (default: a new UUID).")] = None,
    correlation_id: Annotated[str | None, typer.Option(help="Default: the message_id.")] = None,
) -> None:
    """Publish one command to order.commands with every contract property; waits for the confirm."""
    try:
        body = json.loads(body_json)
    except json.JSONDecodeError as exc:
        fail(f"BODY_JSON is not valid JSON: {exc}", 2)
    from publishers.commands import CommandPublisher

    # A non-object body goes out as written: operators use it to exercise the parking lot.
    payload: dict[str, Any] | str = body if isinstance(body, dict) else body_json
    try:
        with CommandPublisher(_settings().amqp_url, app_id="orders-cli") as publisher:
            sent = publisher.send(routing_key, payload, message_id=message_id, correlation_id=correlation_id)
    except Exception as exc:  # kombu raises many kinds once its retries are spent
        fail(f"could not publish {routing_key}: {describe_error(exc)}")
    typer.echo(sent)


# ---------------------------------------------------------------------------------------------
# The parking lot


@parking_app.command("list")
def parking_list(
    as_json: JsonOption = False,
    limit: Annotated[int | None, typer.Option(help="Show at most this many (oldest first).")] = None,
) -> None:
    """Every parked message: message_id, routing key, code, reason, attempts, age, queue."""
    from cli import parking

    try:
        entries = parking.list_parked(_settings(), limit)
    except Exception as exc:
        fail(f"broker error: {describe_error(exc)}")
    if as_json:
        _print_json(entries)
    else:
        _print(render.parked(entries, f"Parking lot: {len(entries)} message(s)"))


@parking_app.command("replay")
def parking_replay(
    message_ids: Annotated[list[str] | None, typer.Argument(help="Message ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every parked message.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send parked commands back through order.commands with their recorded routing key, then remove them."""
    from cli import parking

    if bool(message_ids) == replay_all:
        fail("give MESSAGE_ID(s) or --all (not both)", 2)
    try:
        results = parking.replay(_settings(), None if replay_all else set(message_ids or ()))
    except Exception as exc:
        fail(f"broker error: {describe_error(exc)}")
    if as_json:
        _print_json(results)
    else:
        _print(render.parked(results, f"Replayed {sum(r['replayed'] for r in results)} message(s)"))
    missing = set(message_ids or ()) - {r["message_id"] for r in results}
    if missing:
        fail(f"not in the parking lot: {', '.join(sorted(missing))}")
    if not all(r["replayed"] for r in results):
        fail("some messages could not be republished; they stay parked")


# ---------------------------------------------------------------------------------------------
# Invariants, refunds, health, report


@app.command()
def check(as_json: JsonOption = False) -> None:
    """Verify invariants I2-I5 on the database; exits 1 listing the offending rows when one fails."""
    from cli.checks import run_checks

    with _database(_settings()) as engine:
        results = [r.as_dict() for r in run_checks(engine)]
    ok = all(r["ok"] for r in results)
    _print_json({"ok": ok, "checks": results}) if as_json else _print(render.checks(results))
    if not ok:
        raise typer.Exit(1)


@app.command()
def refunds(
    failed: Annotated[bool, typer.Option("--failed", help="Only FAILED refunds.")] = False,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 200,
) -> None:
    """Refunds of every source, newest first."""
    with _database(_settings()) as engine, engine.connect() as conn:
        rows = views.refund_list(conn, failed, limit)
    if as_json:
        _print_json(rows)
    else:
        _print(render.refunds(rows))


@app.command("refund-retry")
def refund_retry(refund_no: Annotated[str, typer.Argument(help="A FAILED refund.")]) -> None:
    """Submit a FAILED refund again: `refund.requested` goes out through the outbox."""
    from consumers.refunds import retry_refund
    from store.uow import Envelope, UnitOfWork

    # Events caused by an operator still carry a correlation_id (the contract asks it of every message).
    correlation_id = f"cli-{uuid.uuid4()}"
    with _database(_settings()) as engine:
        with engine.begin() as conn:
            envelope = Envelope(
                consumer="cli", message_id=None, correlation_id=correlation_id, routing_key="refund.retry"
            )
            uow = UnitOfWork(conn, envelope, datetime.now(UTC))
            try:
                retried = retry_refund(uow, refund_no, actor="cli")
            except Refusal as refusal:  # its amount was refunded another way meanwhile
                fail(f"refund {refund_no} cannot be submitted again: {refusal.detail}")
            uow.flush()
        if not retried:
            with engine.connect() as conn:
                status = views.refund_status(conn, refund_no)
            fail(
                f"no refund {refund_no}"
                if status is None
                else f"refund {refund_no} is {status}; only a FAILED refund can be retried"
            )
    typer.echo(f"refund {refund_no} submitted again (correlation_id {correlation_id})")


@app.command()
def health(
    as_json: JsonOption = False,
    max_outbox_age: Annotated[
        float, typer.Option(help="Seconds the oldest unsent outbox row may wait.")
    ] = 60.0,
    max_queue_depth: Annotated[
        int | None, typer.Option(help="Ready messages a consumer queue may hold.")
    ] = None,
    max_parked: Annotated[int | None, typer.Option(help="Parked messages tolerated.")] = None,
) -> None:
    """Database, broker, consumer queues, parking lot and outbox lag; exits 1 when unhealthy."""
    # Imported here, as every subcommand's own needs are: the consumers' routes and event
    # models cost 0.35 s to import, and `orders show` must not pay for them.
    from cli.health import Thresholds, broker_components, database_components
    from consumers.registry import consumer_specs

    settings = _settings()
    thresholds = Thresholds(max_outbox_age, max_queue_depth, max_parked)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        components = database_components(engine, thresholds)
    finally:
        engine.dispose()
    components += broker_components(settings, consumer_specs(settings), thresholds)
    results = [c.as_dict() for c in components]
    healthy = all(c.ok for c in components)
    _print_json({"healthy": healthy, "components": results}) if as_json else _print(render.health(results))
    if not healthy:
        raise typer.Exit(1)


@app.command()
def report(
    since: Annotated[str, typer.Option(help="Orders placed from this date (YYYY-MM-DD or ISO 8601, UTC).")],
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV (section,key,metric,value) on stdout.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Reconciliation: orders by status, payments against orders, refunds against cancellations."""
    try:
        start = parse_since(since)
    except ValueError as exc:
        fail(str(exc), 2)
    with _database(_settings()) as engine, engine.connect() as conn:
        data = views.report(conn, start)
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(("section", "key", "metric", "value"))
        writer.writerows(views.report_rows(data))
    elif as_json:
        _print_json(data)
    else:
        _print(render.report(data))


if __name__ == "__main__":
    app(prog_name="orders")
