"""Properties the relay puts on what it publishes (pure: no broker)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from publishers.relay import (
    HELP_THRESHOLD,
    OutboxRelay,
    properties_for,
    publishing_order,
    relayed_writer,
    wakes,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def row(exchange: str, routing_key: str, body: dict) -> SimpleNamespace:
    """An outbox row as the relay claims it: the body as stored text, its due_at alongside."""
    return SimpleNamespace(
        message_id="m-1",
        correlation_id="c-1",
        routing_key=routing_key,
        exchange=exchange,
        body=json.dumps(body),
        due_at=body.get("due_at"),
        headers={"x-schema-version": 1},
    )


def test_events_carry_every_contract_property_and_no_expiration() -> None:
    props = properties_for(row("order.events", "order.created", {"order_no": "O1"}), NOW)
    assert (props.message_id, props.correlation_id, props.type) == ("m-1", "c-1", "order.created")
    assert (props.content_type, props.delivery_mode, props.timestamp) == (
        "application/json",
        2,
        int(NOW.timestamp()),
    )
    assert props.headers == {"x-schema-version": 1}
    assert props.expiration is None


def test_a_timer_published_late_expires_at_its_due_time() -> None:
    # Given a timer due 1.5 s from now (its delay queue's TTL is the full timeout)
    due = (NOW + timedelta(milliseconds=1500)).isoformat()
    props = properties_for(
        row("order.timers", "payment-timeout.2s", {"kind": "payment-timeout", "due_at": due}), NOW
    )
    # Then it carries only what is left
    assert props.expiration == "1500"


def test_a_timer_leaves_its_queue_a_lead_early() -> None:
    # Given a timer due 2 s from now and a lead of 300 ms (the consumer holds it until due)
    due = (NOW + timedelta(seconds=2)).isoformat()
    props = properties_for(
        row("order.timers", "payment-timeout.2s", {"due_at": due}), NOW, lead=timedelta(milliseconds=300)
    )
    assert props.expiration == "1700"
    # A timer due within the lead leaves at once
    soon = (NOW + timedelta(milliseconds=100)).isoformat()
    props = properties_for(
        row("order.timers", "payment-timeout.2s", {"due_at": soon}), NOW, lead=timedelta(milliseconds=300)
    )
    assert props.expiration == "0"


def test_an_overdue_timer_expires_at_once() -> None:
    due = (NOW - timedelta(seconds=3)).isoformat()
    props = properties_for(row("order.timers", "payment-timeout.2s", {"due_at": due}), NOW)
    assert props.expiration == "0"


def test_timers_go_out_by_due_time_and_events_in_outbox_order() -> None:
    rows = [
        SimpleNamespace(id=1, exchange="order.timers", due_at="2026-11-26T12:00:05+00:00"),
        SimpleNamespace(id=2, exchange="order.events", due_at=None),
        SimpleNamespace(id=3, exchange="order.timers", due_at="2026-11-26T12:00:01+00:00"),
        SimpleNamespace(id=4, exchange="order.events", due_at=None),
    ]
    assert [r.id for r in publishing_order(rows)] == [2, 4, 3, 1]


def test_a_relay_wakes_for_its_own_writer_and_for_bursts_of_others() -> None:
    me, other = relayed_writer(100), relayed_writer(200)
    # Its own process's commits, however small
    assert wakes(f"{me} 1", me)
    # Another relayed process's small commit is left to that process's relay
    assert not wakes(f"{other} 1", me)
    assert not wakes(f"{other} {HELP_THRESHOLD - 1}", me)
    # A burst is shared
    assert wakes(f"{other} {HELP_THRESHOLD}", me)


def test_writers_without_a_relay_of_their_own_wake_every_relay() -> None:
    me = relayed_writer(100)
    assert wakes("order-centre 1", me)  # the CLI
    assert wakes("psql 1", me)
    assert wakes("", me)  # the first migration's trigger sent an empty payload
    assert wakes(f"{relayed_writer(200)} 1", None)  # a relay that knows no writer of its own


def test_the_relay_warns_once_about_an_event_the_contract_does_not_define(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = OutboxRelay.__new__(OutboxRelay)
    relay._warned = set()
    rows = [
        SimpleNamespace(exchange="order.events", routing_key="order.created"),
        SimpleNamespace(exchange="order.events", routing_key="test.ping"),
        SimpleNamespace(exchange="order.events", routing_key="test.ping"),
        SimpleNamespace(exchange="order.timers", routing_key="payment-timeout.15m"),
    ]
    with caplog.at_level(logging.WARNING, logger="relay"):
        relay._check_contract(rows)
        relay._check_contract(rows)
    warned = [r for r in caplog.records if "contract does not define" in r.getMessage()]
    assert [getattr(r, "event", None) for r in warned] == ["test.ping"]
