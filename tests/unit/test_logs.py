"""Structured logs: JSON lines carry the message context (order_no included) and never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

import logs


@pytest.fixture
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines through the redaction filter into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactSecrets())
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, buffer
    logger.handlers.clear()


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://order:s3cret@rabbitmq:5672/%2F", "amqp://order:***@rabbitmq:5672/%2F"),
        (
            "postgresql+psycopg2://order:pa:ss@postgres:5432/orders",
            "postgresql+psycopg2://order:***@postgres:5432/orders",
        ),
        ("amqp://guest@host/vhost", "amqp://guest@host/vhost"),
        ("amount=100&signature=ab12cd&paid_at=x", "amount=100&signature=***&paid_at=x"),
        ('{"order_no": "O1", "signature": "ab12"}', '{"order_no": "O1", "signature": "***"}'),
        ("host=db password='hunter 2' dbname=orders", "host=db password='***' dbname=orders"),
        ("PAYMENT_WEBHOOK_SECRET: topsecret", "PAYMENT_WEBHOOK_SECRET: ***"),
        ("reason=BAD_SIGNATURE, code: SCHEMA_INVALID", "reason=BAD_SIGNATURE, code: SCHEMA_INVALID"),
    ],
)
def test_redact_text_masks_url_passwords_and_secret_values(text: str, expected: str) -> None:
    assert logs.redact_text(text) == expected


def test_redact_masks_secret_keys_at_any_depth() -> None:
    # Given a structure with secrets under secret-named keys and in URLs
    value = {
        "body": {"order_no": "O1", "amount": 100, "signature": "ab12"},
        "password": "x",
        "urls": ["amqp://u:p@h/", 3],
    }
    # Then only the secrets are masked
    assert logs.redact(value) == {
        "body": {"order_no": "O1", "amount": 100, "signature": "***"},
        "password": "***",
        "urls": ["amqp://u:***@h/", 3],
    }


def test_json_line_carries_message_context_and_bound_order_no(
    json_lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = json_lines
    # Given a message in hand whose handler learns its order number
    context = {"message_id": "m-1", "correlation_id": "c-1", "routing_key": "order.place"}
    token = logs.message_context.set(context)
    try:
        logs.bind(order_no="O20261126093015000042")
        # When it logs
        logger.info("order placed", extra={"payable": 13100})
    finally:
        logs.message_context.reset(token)
    logger.info("between messages")
    # Then the line has time, level, process and the context, order_no included
    first, second = lines(buffer)
    assert first["msg"] == "order placed"
    assert first["level"] == "info" and first["time"] and first["process"]
    assert first["message_id"] == "m-1" and first["correlation_id"] == "c-1"
    assert first["order_no"] == "O20261126093015000042"
    assert first["payable"] == 13100
    # And the context ends with the message
    assert "order_no" not in second and "message_id" not in second


def test_bind_outside_a_message_changes_nothing() -> None:
    logs.bind(order_no="O1")
    assert logs.message_context.get() is None


def test_secrets_never_reach_the_log_line(json_lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = json_lines
    # Given log calls holding secrets in the message, the extras and an exception
    logger.warning("connecting to %s", "amqp://order:s3cret@rabbitmq:5672/%2F")
    logger.info("payment received", extra={"body": {"payment_no": "P-1", "signature": "deadbeef"}})
    try:
        raise ConnectionError("could not connect to postgresql://order:hunter2@db/orders")
    except ConnectionError:
        logger.exception("database down")
    # Then no secret is written, and the rest is
    output = buffer.getvalue()
    for secret in ("s3cret", "deadbeef", "hunter2"):
        assert secret not in output
    connect, payment, down = lines(buffer)
    assert connect["msg"] == "connecting to amqp://order:***@rabbitmq:5672/%2F"
    assert payment["body"] == {"payment_no": "P-1", "signature": "***"}
    assert "postgresql://order:***@db/orders" in down["exc"]


def test_console_lines_are_redacted_too() -> None:
    record = logging.makeLogRecord(
        {"name": "relay", "levelname": "WARNING", "msg": "lost amqp://a:b@h/", "password": "p"}
    )
    logs.RedactSecrets().filter(record)
    line = logs.ConsoleFormatter().format(record)
    assert "amqp://a:***@h/" in line and "password=***" in line and ":b@" not in line


def test_configure_installs_the_redaction_filter() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        assert any(isinstance(f, logs.RedactSecrets) for f in root.handlers[0].filters)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
