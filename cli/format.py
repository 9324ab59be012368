"""Pure helpers of the `orders` command: money, ages, JSON, parked-message headers (no I/O)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from domain import names as n

# Headers the loop adds when it retries or parks a message, and the broker's dead-letter
# history: a replayed command starts clean, whoever set them (the service or a producer).
_REPLAY_DROPPED_PREFIXES = ("x-parking-", "x-original-", "x-first-death-", "x-last-death-")
_REPLAY_DROPPED = {n.ATTEMPTS_HEADER, n.LAST_ERROR_HEADER, n.PARKED_AT_HEADER, "x-death"}


def money(minor: int | Decimal | None) -> str:
    """Minor units as a decimal amount with two places: 12345 -> '123.45', -5 -> '-0.05'."""
    if minor is None:
        return ""
    value = int(minor)
    sign = "-" if value < 0 else ""
    whole, cents = divmod(abs(value), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def age(seconds: float | None) -> str:
    """A short readable duration: '42s', '3m 05s', '2h 07m', '4d 03h'."""
    if seconds is None:
        return ""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def when(value: datetime | None) -> str:
    """A timestamp in UTC to the second, as an operator reads it."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def transition(from_status: str | None, to_status: str | None) -> str:
    """'PAID -> SHIPPED', '-> PENDING_PAYMENT', or '' when the status did not change."""
    if not from_status and not to_status:
        return ""
    return f"{from_status or ''} -> {to_status or ''}".strip()


def compact(detail: Mapping[str, Any] | None, limit: int = 160) -> str:
    """A timeline detail as `key=value, ...`, cut to `limit` characters."""
    if not detail:
        return ""
    parts = []
    for key, value in detail.items():
        shown = value if isinstance(value, str | int | float | bool) or value is None else to_json(value)
        parts.append(f"{key}={shown}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    """`Type: message` on one line, for exceptions (like pika's) whose str() is empty."""
    text = str(exc).strip() or ", ".join(repr(arg) for arg in exc.args)
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _utc_iso(value: datetime) -> str:
    return (value.astimezone(UTC) if value.tzinfo else value).isoformat()


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


# What `jsonable` makes of each kind of value, the first that fits (a datetime is a date too).
_JSONABLE: tuple[tuple[type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    (datetime, _utc_iso),
    (date, lambda value: value.isoformat()),
    (timedelta, lambda value: value.total_seconds()),
    (Decimal, _number),
    (bytes, lambda value: value.decode("utf-8", errors="replace")),
    (Mapping, lambda value: {str(k): jsonable(v) for k, v in value.items()}),
    ((list, tuple, set), lambda value: [jsonable(v) for v in value]),
)


def jsonable(value: Any) -> Any:
    """Turn database and AMQP values into what JSON can hold (times as ISO 8601 UTC)."""
    for kind, convert in _JSONABLE:
        if isinstance(value, kind):
            return convert(value)
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Machine-readable JSON of any result (UTF-8 text, times as ISO 8601)."""
    return json.dumps(jsonable(value), indent=indent, ensure_ascii=False)


def parse_since(text: str) -> datetime:
    """`2025-01-31` or an ISO 8601 time; a time without a zone is read as UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a date (use YYYY-MM-DD or an ISO 8601 time)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def header_text(value: Any) -> str | None:
    """A header value as text (pika hands back bytes for non-UTF-8 long strings)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def replay_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers a parked command is replayed with: parking and retry bookkeeping removed."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if key not in _REPLAY_DROPPED and not key.startswith(_REPLAY_DROPPED_PREFIXES)
    }


def replay_target(
    headers: Mapping[str, Any] | None, message_type: str | None, delivered_key: str
) -> tuple[str, str]:
    """(exchange, routing key) a parked command is replayed to (contract v1.1).

    Always order.commands, whatever the headers say: a replay must not publish a producer's body
    on order.events or the timer exchanges. The routing key is the one the service recorded
    when it parked the message (`consumers.amqp.parked_headers` writes it from the delivery the
    service saw, never from a producer's header); a message parked by hand without it goes back
    by its type.
    """
    headers = headers or {}
    routing_key = header_text(headers.get(n.ORIGINAL_ROUTING_KEY_HEADER)) or message_type or delivered_key
    return n.COMMANDS_EXCHANGE, routing_key


def parked_summary(
    message_id: str | None,
    message_type: str | None,
    timestamp: int | None,
    headers: Mapping[str, Any] | None,
    delivered_key: str,
    now: datetime,
) -> dict[str, Any]:
    """What an operator needs to know about one parked message, from its properties and headers.

    Every value is text: a hostile message's properties may come back from pika as bytes.
    """
    headers = headers or {}
    message_id, message_type = header_text(message_id), header_text(message_type)
    exchange, routing_key = replay_target(headers, message_type, delivered_key)
    parked_at: datetime | None = None
    raw_parked_at = header_text(headers.get(n.PARKED_AT_HEADER))
    if raw_parked_at:
        try:
            parked_at = parse_since(raw_parked_at)
        except ValueError:
            parked_at = None
    if parked_at is None and timestamp:
        parked_at = datetime.fromtimestamp(timestamp, UTC)
    attempts = headers.get(n.ATTEMPTS_HEADER)
    return {
        "message_id": message_id,
        "routing_key": routing_key,
        "exchange": exchange,
        "code": header_text(headers.get(n.PARKING_CODE_HEADER)),
        "reason": header_text(headers.get(n.PARKING_REASON_HEADER)),
        "attempts": attempts if isinstance(attempts, int) else 0,
        "queue": header_text(headers.get(n.ORIGINAL_QUEUE_HEADER)),
        "last_error": header_text(headers.get(n.LAST_ERROR_HEADER)),
        "parked_at": parked_at,
        "age_seconds": round((now - parked_at).total_seconds(), 1) if parked_at else None,
    }
