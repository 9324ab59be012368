"""A window's timers travel as one message: how they are merged and read back (pure: no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from consumers.schemas import TIMER_REFS_MAX, TimerFired
from store.uow import TIMER_BATCH_MAX, coalesce_timers

DUE = "2026-11-27T12:00:05+00:00"


def timer(ref: str, due_at: str = DUE, key: str = "payment-timeout.5s", **extra: Any) -> dict[str, Any]:
    return {
        "message_id": f"m-{ref}",
        "exchange": "order.timers",
        "routing_key": key,
        "correlation_id": f"c-{ref}",
        "body": {"kind": key.split(".")[0], "ref": ref, "due_at": due_at, **extra},
        "headers": {"x-schema-version": 1},
    }


def event(name: str) -> dict[str, Any]:
    return {
        "message_id": f"m-{name}",
        "exchange": "order.events",
        "routing_key": "order.created",
        "correlation_id": f"c-{name}",
        "body": {"order_no": name},
        "headers": {"x-schema-version": 1},
    }


def test_timers_of_one_queue_and_due_time_become_one_message_with_each_correlation_id() -> None:
    rows = [event("E1"), timer("O1"), event("E2"), timer("O2"), timer("O3")]
    out = coalesce_timers(rows)
    # The events stay where they were; the merged timer takes its first member's place
    assert [r["message_id"] for r in out] == ["m-E1", "m-O1", "m-E2"]
    merged = out[1]
    assert merged["body"] == {
        "kind": "payment-timeout",
        "due_at": DUE,
        "refs": ["O1", "O2", "O3"],
        "correlation_ids": ["c-O1", "c-O2", "c-O3"],
    }
    assert (merged["exchange"], merged["routing_key"], merged["correlation_id"]) == (
        "order.timers",
        "payment-timeout.5s",
        None,
    )
    # The originals are not changed
    assert rows[1]["body"]["ref"] == "O1" and rows[1]["correlation_id"] == "c-O1"


def test_timers_that_differ_in_queue_or_due_time_or_carry_more_fields_stay_apart() -> None:
    rows = [
        timer("O1"),
        timer("O2", due_at="2026-11-27T12:00:06+00:00"),
        timer("A1", key="aftersale-review.5d"),
        timer("O3", note="extra"),
    ]
    # None shares its group with another, so each stays exactly as it was
    assert coalesce_timers(rows) == rows


def test_a_large_window_is_cut_into_messages_of_at_most_the_batch_limit() -> None:
    rows = [timer(f"O{i}") for i in range(TIMER_BATCH_MAX * 2 + 1)]
    out = coalesce_timers(rows)
    assert [len(r["body"].get("refs", [r["body"].get("ref")])) for r in out] == [
        TIMER_BATCH_MAX,
        TIMER_BATCH_MAX,
        1,
    ]
    assert out[2] == rows[-1]  # the one left over is a plain single timer
    assert TIMER_BATCH_MAX <= TIMER_REFS_MAX  # every merged message passes the schema


def test_a_fired_message_names_its_timers_with_their_own_correlation_ids() -> None:
    single = TimerFired.model_validate({"kind": "payment-timeout", "ref": "O1", "due_at": DUE})
    assert single.targets("corr") == [("O1", "corr")]
    batch = TimerFired.model_validate(
        {"kind": "payment-timeout", "refs": ["O1", "O2"], "correlation_ids": ["c1", None], "due_at": DUE}
    )
    # A ref without a correlation id of its own gets the message's
    assert batch.targets("corr") == [("O1", "c1"), ("O2", "corr")]
    without_ids = TimerFired.model_validate({"kind": "payment-timeout", "refs": ["O1"], "due_at": DUE})
    assert without_ids.targets(None) == [("O1", None)]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"kind": "k", "due_at": DUE}, "either ref or refs"),
        ({"kind": "k", "ref": "O1", "refs": ["O2"], "due_at": DUE}, "either ref or refs"),
        ({"kind": "k", "refs": [], "due_at": DUE}, "at least 1"),
        ({"kind": "k", "refs": ["O1", "O2"], "correlation_ids": ["c1"], "due_at": DUE}, "one for one"),
        ({"kind": "k", "refs": ["O1"] * (TIMER_REFS_MAX + 1), "due_at": DUE}, "at most"),
        ({"kind": "k", "refs": ["O1", ""], "due_at": DUE}, "at least 1 character"),
    ],
)
def test_a_malformed_timer_message_is_invalid(body: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        TimerFired.model_validate(body)
