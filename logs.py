"""Structured logging: JSON lines (or a readable line on a terminal) with message context."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# The message being handled, added to every log line written while it is in hand.
message_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "message_context", default=None
)
_STATIC: dict[str, Any] = {}
_RESERVED = set(vars(logging.makeLogRecord({})))

REDACTED = "***"
_SECRET_WORDS = r"signature|password|passwd|secret|token|authorization|api[_-]?key"
# A key naming a secret: its value is masked wherever it appears (extras, nested dicts, text).
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
# amqp://user:pass@host -> amqp://user:***@host (any scheme).
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]*(@)", re.IGNORECASE)
# signature=abc, "password": "x", 'secret': 'y', token: z (a quoted value up to its closing quote).
_SECRET_PAIR = re.compile(
    rf"""(["']?[\w-]*(?:{_SECRET_WORDS})[\w-]*["']?\s*[:=]\s*)(["'])?(?(2)[^"']*|[^\s,;&'"}})\]]+)""",
    re.IGNORECASE,
)


def redact_text(value: str) -> str:
    """The text with URL passwords and the values of secret-named keys masked."""
    return _SECRET_PAIR.sub(rf"\1\2{REDACTED}", _URL_PASSWORD.sub(rf"\1{REDACTED}\2", value))


def redact(value: Any, key: str = "") -> Any:
    """A log field's value with secrets masked: by its key, inside mappings and lists, and in text."""
    if key and _SECRET_KEY.search(key):
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [redact(v) for v in value]
    return redact_text(str(value))


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message, extra fields and exception text before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        for key, value in list(vars(record).items()):
            if key not in _RESERVED and not key.startswith("_"):
                setattr(record, key, redact(value, key))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def bind(**fields: Any) -> None:
    """Add fields (`order_no`, ...) to the log context of the message in hand, until it is done."""
    current = message_context.get()
    if current is not None:
        message_context.set({**current, **fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, logger, message and any context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
            **_STATIC,
            **(message_context.get() or {}),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """A readable line for people at a terminal, context as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        context = {**_STATIC, **(message_context.get() or {})}
        context.update(
            {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}
        )
        extras = " ".join(f"{k}={v}" for k, v in context.items() if v is not None)
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()} {extras}"
        if record.exc_info:
            line += "\n" + (record.exc_text or self.formatException(record.exc_info))
        return line.rstrip()


def configure(level: str = "INFO", fmt: str = "auto", **static: Any) -> None:
    """Set up the root logger once per process; `static` fields (queue, ...) go on every line."""
    _STATIC.update(static)
    handler = logging.StreamHandler(sys.stderr)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty() and not os.environ.get("CI"))
    handler.setFormatter(ConsoleFormatter() if use_console else JsonFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.ERROR)  # returns of events nobody subscribes to are expected
