"""Settings: durations, and a bad setting stopping the process with its name."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from settings import format_duration, parse_duration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("900", timedelta(seconds=900)),
        ("2s", timedelta(seconds=2)),
        ("15m", timedelta(minutes=15)),
        ("5d", timedelta(days=5)),
        ("1500ms", timedelta(milliseconds=1500)),
        (" 3h ", timedelta(hours=3)),
    ],
)
def test_durations_are_read(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "-5s", "0", "5 weeks", "1.5m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_queue_name_labels_are_exact_and_short() -> None:
    assert [format_duration(parse_duration(t)) for t in ("900", "2s", "60s", "5d", "1500ms")] == [
        "15m",
        "2s",
        "1m",
        "5d",
        "1500ms",
    ]


def test_a_malformed_setting_stops_the_process_naming_it() -> None:
    # Given a malformed timeout in the environment
    env = {"PATH": "/usr/bin:/bin", "ORDER_PAYMENT_TIMEOUT": "soon", "PREFETCH": "0"}
    # When a process starts
    result = subprocess.run(
        [sys.executable, "run_consumer.py", "--list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it stops at once, naming each bad setting
    assert result.returncode == 2
    assert "ORDER_PAYMENT_TIMEOUT" in result.stderr and "PREFETCH" in result.stderr
    assert result.stdout == ""
