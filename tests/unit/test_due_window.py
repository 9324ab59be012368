"""Which buffered deliveries a consumer may apply now, and how to ack them (pure: no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pika

from consumers.delivery import Delivery, ack_plan, due_window
from consumers.timeouts import due_at

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def delivery(tag: int, due: datetime | None) -> Delivery:
    props = pika.BasicProperties()
    return Delivery(tag, "timer.payment-timeout", "order.timers.fired", props, b"{}", due=due)


def test_deliveries_without_a_due_time_are_all_taken_up_to_the_window_limit() -> None:
    buffer = [delivery(i, None) for i in range(5)]
    assert due_window(buffer, NOW, 100) == ([0, 1, 2, 3, 4], None)
    assert due_window(buffer, NOW, 3) == ([0, 1, 2], None)
    assert due_window([], NOW, 100) == ([], None)


def test_when_nothing_is_due_the_wait_is_until_the_earliest_timer() -> None:
    buffer = [delivery(1, NOW + timedelta(milliseconds=250)), delivery(2, NOW + timedelta(milliseconds=40))]
    assert due_window(buffer, NOW, 100) == ([], 0.04)


def test_a_due_timer_behind_one_not_yet_due_is_taken_without_waiting_for_it() -> None:
    buffer = [
        delivery(1, NOW - timedelta(milliseconds=5)),
        delivery(2, NOW + timedelta(milliseconds=60)),  # arrived ahead of timers due before it
        delivery(3, NOW),
        delivery(4, NOW - timedelta(seconds=1)),
        delivery(5, NOW + timedelta(milliseconds=10)),
    ]
    assert due_window(buffer, NOW, 100) == ([0, 2, 3], None)
    assert due_window(buffer, NOW, 2) == ([0, 2], None)


def test_a_window_is_acked_without_acking_a_held_delivery() -> None:
    # Nothing held: one multiple ack of the last tag
    assert ack_plan([3, 4, 5], None) == (5, [])
    # Tags 1 and 2 applied, 3 held, 4 and 5 applied: a multiple ack up to 2, then 4 and 5 alone
    assert ack_plan([1, 2, 4, 5], 3) == (2, [4, 5])
    # Only deliveries after the held one: no multiple ack at all
    assert ack_plan([7, 9], 6) == (None, [7, 9])
    # Only deliveries before it (the usual case with timers in due order)
    assert ack_plan([1, 2], 3) == (2, [])


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
