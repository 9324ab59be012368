"""Which buffered deliveries a consumer may apply now (pure: no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pika

from consumers.loop import Delivery, due_prefix
from consumers.timeouts import due_at

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def delivery(tag: int, due: datetime | None) -> Delivery:
    props = pika.BasicProperties()
    return Delivery(tag, "timer.payment-timeout", "order.timers.fired", props, b"{}", due=due)


def test_deliveries_without_a_due_time_are_all_taken_up_to_the_window_limit() -> None:
    buffer = [delivery(i, None) for i in range(5)]
    assert due_prefix(buffer, NOW, 100) == (5, None)
    assert due_prefix(buffer, NOW, 3) == (3, None)
    assert due_prefix([], NOW, 100) == (0, None)


def test_a_timer_not_yet_due_waits_and_says_how_long() -> None:
    buffer = [delivery(1, NOW + timedelta(milliseconds=250)), delivery(2, NOW - timedelta(seconds=1))]
    count, wait = due_prefix(buffer, NOW, 100)
    # Nothing is taken: only a prefix can be acked with one multiple ack
    assert count == 0
    assert wait == 0.25


def test_the_due_head_is_taken_and_stops_at_the_first_timer_not_due() -> None:
    buffer = [
        delivery(1, NOW - timedelta(milliseconds=5)),
        delivery(2, NOW),
        delivery(3, NOW + timedelta(milliseconds=10)),
        delivery(4, NOW - timedelta(seconds=1)),
    ]
    assert due_prefix(buffer, NOW, 100) == (2, None)


def test_a_fired_timer_is_due_at_the_time_in_its_body() -> None:
    def fired(body: object) -> Delivery:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Delivery(1, "timer.x", "order.timers.fired", pika.BasicProperties(), raw)

    assert due_at(fired({"kind": "payment-timeout", "ref": "O1", "due_at": NOW.isoformat()})) == NOW
    # A naive time is read as UTC
    assert due_at(fired({"due_at": "2026-11-27T12:00:00"})) == NOW
    # Anything unreadable is applied at once, and validation parks it
    for bad in (b"not json", b"[1, 2]", {"due_at": 5}, {"due_at": "soon"}, {}):
        assert due_at(fired(bad)) is None
