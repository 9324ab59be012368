"""Pure helpers of the `orders` command: money, ages, JSON, parked-message headers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from cli.format import (
    age,
    compact,
    describe_error,
    jsonable,
    money,
    parked_summary,
    parse_since,
    replay_headers,
    replay_target,
    to_json,
    transition,
    when,
)
from cli.views import report_rows

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("minor", "shown"),
    [
        (0, "0.00"),
        (5, "0.05"),
        (12345, "123.45"),
        (-5, "-0.05"),
        (123456789, "1,234,567.89"),
        (Decimal(250), "2.50"),
        (None, ""),
    ],
)
def test_money_in_minor_units(minor: int | Decimal | None, shown: str) -> None:
    assert money(minor) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (42.9, "42s"),
        (185, "3m 05s"),
        (7620, "2h 07m"),
        (4 * 86400 + 3 * 3600, "4d 03h"),
        (-3, "0s"),
        (None, ""),
    ],
)
def test_age(seconds: float | None, shown: str) -> None:
    assert age(seconds) == shown


def test_when_is_utc_to_the_second() -> None:
    shanghai = timezone(timedelta(hours=8))
    assert when(datetime(2025, 3, 1, 20, 0, 5, 999, tzinfo=shanghai)) == "2025-03-01 12:00:05"
    assert when(None) == ""


def test_transition() -> None:
    assert transition("PAID", "SHIPPED") == "PAID -> SHIPPED"
    assert transition(None, "PENDING_PAYMENT") == "-> PENDING_PAYMENT"
    assert transition(None, None) == ""


def test_compact_detail() -> None:
    assert compact({"refund_no": "R1", "amount": 100, "items": [{"sku": "a"}]}) == (
        'refund_no=R1, amount=100, items=[{"sku": "a"}]'
    )
    assert compact(None) == ""
    long = compact({"k": "x" * 500}, limit=20)
    assert len(long) == 20 and long.endswith("…")


def test_json_of_database_and_amqp_values() -> None:
    shanghai = timezone(timedelta(hours=8))
    value = {
        "at": datetime(2025, 3, 1, 20, 0, tzinfo=shanghai),
        "n": Decimal(7),
        "r": Decimal("1.5"),
        "b": b"text",
        "t": ("a", 1),
        "nested": {"d": timedelta(seconds=90)},
    }
    assert jsonable(value) == {
        "at": "2025-03-01T12:00:00+00:00",
        "n": 7,
        "r": 1.5,
        "b": "text",
        "t": ["a", 1],
        "nested": {"d": 90.0},
    }
    assert json.loads(to_json(value))["n"] == 7


def test_parse_since() -> None:
    assert parse_since("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_since("2025-01-31T10:00:00Z") == datetime(2025, 1, 31, 10, tzinfo=UTC)
    assert parse_since("2025-01-31T18:00:00+08:00") == datetime(2025, 1, 31, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a date"):
        parse_since("yesterday")


PARKED_HEADERS = {
    "x-schema-version": 1,
    "x-parking-reason": "SKU 's1' is unknown",
    "x-parking-code": "UNKNOWN_SKU",
    "x-original-routing-key": "stock.restock",
    "x-original-exchange": "order.commands",
    "x-original-queue": "order.catalog",
    "x-attempts": 2,
    "x-last-error": "boom",
    "x-parked-at": "2025-03-01T11:58:30+00:00",
    "x-death": [{"count": 1, "queue": "order.retry.1s.order.catalog"}],
    "x-first-death-queue": "order.retry.1s.order.catalog",
    "x-tenant": "kept",
}


def test_replay_headers_drop_parking_and_retry_bookkeeping() -> None:
    assert replay_headers(PARKED_HEADERS) == {"x-schema-version": 1, "x-tenant": "kept"}
    assert replay_headers(None) == {}


def test_replay_target_is_where_the_command_was_first_published() -> None:
    assert replay_target(PARKED_HEADERS, "ignored", "order.parking-lot") == (
        "order.commands",
        "stock.restock",
    )
    # A message parked by hand without the headers goes back by its type
    assert replay_target({}, "order.place", "order.parking-lot") == ("order.commands", "order.place")
    assert replay_target({"x-original-exchange": ""}, None, "k") == ("order.commands", "k")
    # Replays only ever go to order.commands, whatever exchange a header names (contract v1.1)
    assert replay_target({"x-original-exchange": b"order.timers.fired"}, "timer.x", "k") == (
        "order.commands",
        "timer.x",
    )
    forged = {"x-original-exchange": "order.events", "x-original-routing-key": "order.paid"}
    assert replay_target(forged, "order.paid", "order.parking-lot")[0] == "order.commands"


def test_parked_summary() -> None:
    summary = parked_summary("m1", "stock.restock", None, PARKED_HEADERS, "order.parking-lot", NOW)
    assert summary == {
        "message_id": "m1",
        "routing_key": "stock.restock",
        "exchange": "order.commands",
        "code": "UNKNOWN_SKU",
        "reason": "SKU 's1' is unknown",
        "attempts": 2,
        "queue": "order.catalog",
        "last_error": "boom",
        "parked_at": datetime(2025, 3, 1, 11, 58, 30, tzinfo=UTC),
        "age_seconds": 90.0,
    }


def test_parked_summary_without_headers_falls_back_to_the_timestamp() -> None:
    timestamp = int((NOW - timedelta(minutes=5)).timestamp())
    summary = parked_summary(None, None, timestamp, {"x-parked-at": "garbage"}, "order.place", NOW)
    assert summary["routing_key"] == "order.place"
    assert summary["attempts"] == 0 and summary["code"] is None
    assert summary["age_seconds"] == 300.0


def test_report_rows_are_long_form() -> None:
    data = {
        "orders": {
            "parents": [
                {"status": "PAID", "orders": 2, "payable": 300, "paid_amount": 300, "refunded_amount": 0}
            ],
            "children": [],
        },
        "payments": [{"outcome": "APPLIED", "payments": 2, "amount": 300}],
        "refunds": [{"source": "USER_CANCEL", "status": "SUCCEEDED", "refunds": 1, "amount": 50}],
        "cancellations": {"cancelled_orders": 0},
        "reconciliation": [{"check": "c", "left": 1, "right": 1, "difference": 0}],
    }
    rows = report_rows(data)
    assert ("orders.parents", "PAID", "orders", 2) in rows
    assert ("payments", "APPLIED", "amount", 300) in rows
    assert ("refunds", "USER_CANCEL/SUCCEEDED", "refunds", 1) in rows
    assert ("cancellations", "all", "cancelled_orders", 0) in rows
    assert ("reconciliation", "c", "difference", 0) in rows
    assert all(len(r) == 4 for r in rows)


def test_describe_error_on_one_line() -> None:
    assert describe_error(ValueError("bad\nsecond line")) == "ValueError: bad"
    wrapped = ConnectionError(OSError(111, "Connection refused"))
    assert describe_error(wrapped) == "ConnectionError: [Errno 111] Connection refused"

    class Quiet(Exception):
        def __str__(self) -> str:
            return ""

    assert describe_error(Quiet(KeyError("k"))) == "Quiet: KeyError('k')"
    assert describe_error(Quiet()) == "Quiet"


def test_parked_summary_of_a_message_whose_properties_are_bytes() -> None:
    summary = parked_summary(b"m\xff1", b"order.\xffplace", None, {}, "order.parking-lot", NOW)
    assert summary["message_id"] == "m\ufffd1"
    assert summary["routing_key"] == "order.\ufffdplace"
