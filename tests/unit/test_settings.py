"""Settings: durations, a bad setting stopping the process with its name, the webhook secret."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

import settings as settings_module
from domain.signing import sign
from settings import DEV_WEBHOOK_SECRET, InsecureSetting, Settings, format_duration, parse_duration

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


# ---------------------------------------------------------------------------------------------
# PAYMENT_WEBHOOK_SECRET is required (contract v1.1), except in DEV_MODE


def test_the_webhook_secret_has_no_default() -> None:
    settings = Settings(payment_webhook_secret="", dev_mode=False)
    with pytest.raises(InsecureSetting, match="PAYMENT_WEBHOOK_SECRET is not set"):
        settings.webhook_secret()


@pytest.mark.parametrize("published", ["dev-secret-change-me", "DEV-SECRET-CHANGE-ME ", DEV_WEBHOOK_SECRET])
def test_a_published_webhook_secret_is_refused(published: str) -> None:
    with pytest.raises(InsecureSetting, match="PAYMENT_WEBHOOK_SECRET is a published example value"):
        Settings(payment_webhook_secret=published, dev_mode=False).webhook_secret()


def test_dev_mode_gives_a_missing_secret_a_development_value_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "_dev_secret_warned", False)
    settings = Settings(payment_webhook_secret="", dev_mode=True)
    with caplog.at_level(logging.WARNING, logger="settings"):
        assert settings.webhook_secret() == DEV_WEBHOOK_SECRET
    assert "DEV_MODE" in caplog.text and "Never run like this in production" in caplog.text
    assert Settings(payment_webhook_secret="dev-secret-change-me", dev_mode=True).webhook_secret() == (
        "dev-secret-change-me"
    )


def test_a_real_webhook_secret_is_used_as_it_is() -> None:
    assert Settings(payment_webhook_secret="k" * 64).webhook_secret() == "k" * 64


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, "is not set"),
        ({"PAYMENT_WEBHOOK_SECRET": ""}, "is not set"),
        ({"PAYMENT_WEBHOOK_SECRET": "dev-secret-change-me"}, "is a published example value"),
        ({"PAYMENT_WEBHOOK_SECRET": "dev-secret-change-me", "DEV_MODE": "false"}, "is a published"),
    ],
)
@pytest.mark.parametrize("queues", [("order.payment",), ("--all",)])
def test_a_consumer_refuses_to_start_without_a_real_webhook_secret(
    env: dict[str, str], problem: str, queues: tuple[str, ...]
) -> None:
    # When a consumer (or all of them) starts without a usable secret (no broker is needed: it
    # stops before connecting)
    result = _run("run_consumer.py", *queues, **env)
    # Then it stops at once, naming the setting
    assert result.returncode == 2, result.stderr
    assert f"PAYMENT_WEBHOOK_SECRET {problem}" in result.stderr
    assert "Traceback" not in result.stderr


def test_orders_sign_refuses_without_a_real_webhook_secret() -> None:
    result = _run("-m", "cli.main", "sign", '{"order_no": "O1"}')
    assert result.returncode == 2
    assert "PAYMENT_WEBHOOK_SECRET" in result.stderr and result.stdout == ""
    signed = _run("-m", "cli.main", "sign", '{"order_no": "O1"}', DEV_MODE="true")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["signature"] == sign({"order_no": "O1"}, DEV_WEBHOOK_SECRET)
