"""COPY text format of the values the service writes (pure code; the round trip is in integration)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from domain.status import OrderStatus
from store.uow import copy_text, json_text


def test_null_is_backslash_n_and_json_null_is_a_json_value() -> None:
    assert copy_text(None) == "\\N"
    assert json_text(None) == "null"


def test_backslash_tab_and_line_breaks_are_escaped() -> None:
    assert copy_text("a\\b\tc\nd\re") == "a\\\\b\\tc\\nd\\re"


def test_json_is_compact_keeps_unicode_and_escapes_its_own_backslashes() -> None:
    assert json_text({"name": "上海\n", "n": 1}) == '{"name":"上海\\\\n","n":1}'


def test_scalars() -> None:
    assert copy_text(OrderStatus.CANCELLED) == "CANCELLED"
    assert copy_text(12345678901234) == "12345678901234"
    assert copy_text(Decimal("1.50")) == "1.50"
    assert copy_text(datetime(2026, 11, 27, 1, 2, 3, 4, tzinfo=UTC)) == "2026-11-27T01:02:03.000004+00:00"
    assert copy_text(date(2026, 11, 27)) == "2026-11-27"


def test_a_value_without_a_text_form_is_refused() -> None:
    with pytest.raises(TypeError, match="dict"):
        copy_text({"not": "a json column"})
