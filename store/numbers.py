"""Business numbers: unique, sortable by time, readable.

Format: a one-letter kind, the UTC time to the second, then six digits of a database
sequence, e.g. `O20261126093015000042` for an order. Child orders append `-NN` to their
parent's number (`O20261126093015000042-01`); after-sales start with `A`, refunds with `R`.
Numbers made in the same second sort by the sequence; the sequence wraps at a million a second.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Connection, text

ORDER: Final = "O"
AFTERSALE: Final = "A"
REFUND: Final = "R"


def next_number(conn: Connection, kind: str, now: datetime) -> str:
    """A new number of `kind` (ORDER, AFTERSALE, REFUND)."""
    return format_number(kind, now, conn.execute(text("SELECT nextval('order_no_seq')")).scalar_one())


def next_numbers(conn: Connection, count: int) -> list[int]:
    """`count` sequence values in one round trip (for a window of orders)."""
    return list(
        conn.execute(
            text("SELECT nextval('order_no_seq') FROM generate_series(1, :n)"), {"n": count}
        ).scalars()
    )


def format_number(kind: str, now: datetime, seq: int) -> str:
    return f"{kind}{now:%Y%m%d%H%M%S}{seq % 1_000_000:06d}"


def child_number(parent_no: str, index: int) -> str:
    """The number of a parent's `index`-th child (1-based)."""
    return f"{parent_no}-{index:02d}"
