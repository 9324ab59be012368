"""Structured logging: JSON lines (or a readable line on a terminal) with message context."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

# The message being handled, added to every log line written while it is in hand.
message_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "message_context", default=None
)
_STATIC: dict[str, Any] = {}
_RESERVED = set(vars(logging.makeLogRecord({})))


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
            entry["exc"] = self.formatException(record.exc_info)
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
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


def configure(level: str = "INFO", fmt: str = "auto", **static: Any) -> None:
    """Set up the root logger once per process; `static` fields (queue, ...) go on every line."""
    _STATIC.update(static)
    handler = logging.StreamHandler(sys.stderr)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty() and not os.environ.get("CI"))
    handler.setFormatter(ConsoleFormatter() if use_console else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.ERROR)  # returns of events nobody subscribes to are expected
