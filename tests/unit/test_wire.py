"""The wire contract's limits (v1.1): control characters, nesting, message ids; and `printable`."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers import wire
from consumers.delivery import Delivery, validate
from consumers.registry import consumer_specs
from settings import Settings

ROUTES = {key: route for spec in consumer_specs(Settings()).values() for key, route in spec.routes.items()}

NOTIFY = {
    "order_no": "O-1",
    "payment_no": "P-1",
    "method": "card",
    "amount": 100,
    "paid_at": "2026-01-01T00:00:00Z",
    "signature": "ab",
}


def delivery(
    routing_key: Any = "payment.notify",
    body: Any = NOTIFY,
    message_id: Any = "m-1",
    **props: Any,
) -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    properties = pika.BasicProperties(
        message_id=message_id, content_type="application/json", headers={"x-schema-version": 1}
    )
    for name, value in props.items():
        setattr(properties, name, value)
    return Delivery(1, routing_key, "order.commands", properties, raw)


def rejection(d: Delivery) -> tuple[str, str] | None:
    parsed = validate(d, ROUTES)
    if parsed.rejection is not None:
        _code, reason = parsed.rejection
        # Every reason is safe to store and to put in a header, whatever the message held.
        assert wire.forbidden_character(reason) is None, reason
        assert reason.strip()
    return parsed.rejection


def code_of(d: Delivery) -> str | None:
    found = rejection(d)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# The defect: one message that stopped a queue forever


def test_nul_in_an_identifier_is_rejected_before_the_database() -> None:
    found = rejection(delivery(body={**NOTIFY, "order_no": "O-\u00001"}))
    assert found == (
        "CONTROL_CHARACTER",
        "body string at $.order_no contains control character U+0000 at position 2",
    )


def test_nul_in_message_id_is_rejected() -> None:
    code, reason = rejection(delivery(message_id="abc\x00def")) or ("", "")
    assert code == "INVALID_MESSAGE_ID"
    assert "'abc\\x00def'" in reason and "U+0000" in reason


def test_a_50000_deep_body_is_rejected_cheaply() -> None:
    for body in (b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 500_000):
        started = time.perf_counter()
        code = code_of(delivery(body=body))
        assert time.perf_counter() - started < 0.5
        assert code in ("NESTING_TOO_DEEP", "INVALID_JSON")  # unclosed: either is fair
    assert code_of(delivery(body=b"[" * 50_000 + b"]" * 50_000)) == "NESTING_TOO_DEEP"


# ---------------------------------------------------------------------------------------------
# Nesting


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep (the top-level object is level 1)."""
    value: dict[str, Any] = {**NOTIFY}
    for _ in range(depth - 1):
        value = {**NOTIFY, "extra": value}
    return value


def test_32_levels_are_allowed_33_are_not() -> None:
    assert wire.parse_body(json.dumps(nested(32)).encode())[1] is None
    code, reason = wire.parse_body(json.dumps(nested(33)).encode())[1] or ("", "")
    assert code == "NESTING_TOO_DEEP"
    assert reason.startswith("body is nested more than 32 levels deep (at $.extra.extra")
    assert wire.parse_body(json.dumps([[[]]]).encode())[1] is None
    code, reason = wire.parse_body(json.dumps(nested(900)).encode())[1] or ("", "")
    assert code == "NESTING_TOO_DEEP" and len(reason) < 300  # the path is cut
    assert code_of(delivery(body=nested(33))) == "NESTING_TOO_DEEP"
    assert code_of(delivery(body=nested(32))) is None  # unknown fields are ignored


# ---------------------------------------------------------------------------------------------
# Control characters in the body


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x07", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f"])
def test_every_control_character_is_rejected(char: str) -> None:
    assert code_of(delivery(body={**NOTIFY, "payment_no": f"P{char}1"})) == "CONTROL_CHARACTER"
    assert code_of(delivery(body={**NOTIFY, f"x{char}": 1})) == "CONTROL_CHARACTER"  # a key
    assert code_of(delivery(body={**NOTIFY, "extra": [{"y": [char]}]})) == "CONTROL_CHARACTER"


@pytest.mark.parametrize("char", ["\t", "\n", "\r"])
def test_tab_lf_cr_only_in_free_text(char: str) -> None:
    cancel = {"order_no": "O-1", "user_id": "u", "reason": f"changed{char}my mind"}
    assert code_of(delivery("order.cancel", cancel)) is None
    assert code_of(delivery("order.cancel", {**cancel, "user_id": f"u{char}"})) == "CONTROL_CHARACTER"
    receiver = {"name": "A", "phone": "1", "address": f"line 1{char}line 2"}
    update = {"order_no": "O-1", "user_id": "u", "receiver": receiver}
    assert code_of(delivery("order.update-address", update)) is None
    bad = {**update, "receiver": {**receiver, "name": f"A{char}B"}}
    assert code_of(delivery("order.update-address", bad)) == "CONTROL_CHARACTER"
    update_detail = {
        "order_no": "O-1",
        "tracking_no": "T",
        "status": "IN_TRANSIT",
        "at": "2026-01-01T00:00:00Z",
        "detail": f"a{char}b",
    }
    assert code_of(delivery("logistics.update", update_detail)) is None
    # Never in a key, nor in a list of strings, nor elsewhere under a free-text name.
    assert code_of(delivery("order.cancel", {**cancel, f"reason{char}": "x"})) == "CONTROL_CHARACTER"
    assert code_of(delivery("order.cancel", {**cancel, "extra": [f"a{char}"]})) == "CONTROL_CHARACTER"
    assert code_of(delivery("order.cancel", {**cancel, "reason": [f"a{char}"]})) == "CONTROL_CHARACTER"


def test_free_text_fields_are_the_documented_ones() -> None:
    assert wire.FREE_TEXT_FIELDS == {"reason", "detail", "address", "text"}  # noqa: SIM300
    assert wire.FREE_TEXT_WHITESPACE == "\t\n\r"


def test_other_free_text_controls_are_still_rejected() -> None:
    cancel = {"order_no": "O-1", "user_id": "u", "reason": "a\x00b"}
    assert code_of(delivery("order.cancel", cancel)) == "CONTROL_CHARACTER"
    assert code_of(delivery("order.cancel", {**cancel, "reason": "a\x0bb"})) == "CONTROL_CHARACTER"


@pytest.mark.parametrize("body", [b"null", b"1", b"true", b"1.5", b'"text"', b"[]", b"[null]", b"{}"])
def test_bodies_that_are_not_objects(body: bytes) -> None:
    assert wire.parse_body(body)[1] is None
    assert code_of(delivery(body=body)) in ("INVALID_JSON", "SCHEMA_INVALID")
    assert wire.parse_body(b'"a\\u0000"')[1] == (
        "CONTROL_CHARACTER",
        "body string contains control character U+0000 at position 1",
    )


def test_json_postgresql_cannot_store_is_invalid() -> None:
    for body in (
        b'{"order_no": "\\ud800"}',  # a lone surrogate
        b'{"\\udfff": 1}',
        b'{"amount": NaN}',
        b'{"amount": -Infinity}',
        b'{"amount": 1e999}',
        b'{"amount": ' + b"9" * 5000 + b"}",
    ):
        assert code_of(delivery(body=body)) == "INVALID_JSON", body[:40]
    assert code_of(delivery(body=b"\xff{}")) == "INVALID_JSON"


def test_unicode_text_is_fine() -> None:
    body = {**NOTIFY, "order_no": "订单-1", "method": "carte bancaire é", "note": "emoji \U0001f600"}
    assert code_of(delivery(body=body)) in (None,)


def test_identifiers_are_printable() -> None:
    # Format characters are not control characters, but an identifier must be printable.
    code, reason = rejection(delivery(body={**NOTIFY, "order_no": "O-\u200b1"})) or ("", "")
    assert code == "SCHEMA_INVALID"
    assert "order_no" in reason and "U+200B" in reason
    assert code_of(delivery(body={**NOTIFY, "order_no": "O 1"})) is None  # the space is printable
    assert code_of(delivery(body={**NOTIFY, "order_no": "x" * 65})) == "SCHEMA_INVALID"
    assert code_of(delivery(body={**NOTIFY, "order_no": ""})) == "SCHEMA_INVALID"


# ---------------------------------------------------------------------------------------------
# Properties and headers


@pytest.mark.parametrize(
    ("message_id", "expected"),
    [
        ("x" * 255, None),
        ("订" * 85, None),
        ("x" * 256, "INVALID_MESSAGE_ID"),
        ("a\nb", "INVALID_MESSAGE_ID"),
        ("a\u200bb", "INVALID_MESSAGE_ID"),  # printable: no format characters
        ("a\u2028b", "INVALID_MESSAGE_ID"),
        (b"\xff\xfe", "INVALID_MESSAGE_ID"),  # pika hands back bytes for a non-UTF-8 short string
        ("", "MISSING_MESSAGE_ID"),
        (None, "MISSING_MESSAGE_ID"),
    ],
)
def test_message_id(message_id: Any, expected: str | None) -> None:
    assert code_of(delivery(message_id=message_id)) == expected


def test_correlation_id() -> None:
    assert code_of(delivery(correlation_id="c" * 255)) is None
    assert code_of(delivery(correlation_id="c" * 256)) == "INVALID_CORRELATION_ID"
    assert code_of(delivery(correlation_id="c\x00")) == "INVALID_CORRELATION_ID"
    assert code_of(delivery(correlation_id=b"\x80")) == "INVALID_CORRELATION_ID"


@pytest.mark.parametrize("name", wire.TEXT_PROPERTIES)
def test_string_properties(name: str) -> None:
    assert code_of(delivery(**{name: "a\x00b"})) == "CONTROL_CHARACTER"
    assert code_of(delivery(**{name: b"\xc3\x28"})) == "INVALID_PROPERTY"


def test_content_type_not_utf8_no_longer_crashes() -> None:
    # Before: bytes.split(";") raised TypeError out of validate().
    assert code_of(delivery(content_type=b"application/json\xff")) == "INVALID_PROPERTY"


def test_routing_key_and_exchange() -> None:
    assert code_of(delivery(routing_key="payment.notify\x00")) == "CONTROL_CHARACTER"
    assert code_of(delivery(routing_key=b"\xff")) == "INVALID_PROPERTY"
    d = delivery()
    d.exchange = "order.commands\x1b"
    assert code_of(d) == "CONTROL_CHARACTER"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-trace": "a\x00b"},
        {"x-trace\x00": "a"},
        {"x-trace": {"inner": ["ok", "bad\x07"]}},
        {"x-trace": [{"k": b"\x00"}]},  # a byte array is text as far as it decodes
        {"x-original-routing-key": "payment.notify\x00"},
        {"x-death": [{"queue": "q\x00", "count": 1}]},
        {"x-trace": "a\nb"},  # only the service's own free-text headers may hold line feeds
    ],
)
def test_control_characters_in_headers(headers: dict[str, Any]) -> None:
    assert code_of(delivery(headers={"x-schema-version": 1, **headers})) == "CONTROL_CHARACTER"


def test_header_names_not_utf8() -> None:
    assert code_of(delivery(headers={b"\xff": 1})) == "INVALID_PROPERTY"


def test_headers_the_broker_and_the_service_write_are_fine() -> None:
    headers = {
        "x-schema-version": 1,
        "x-death": [
            {
                "count": 1,
                "reason": "expired",
                "queue": "order.retry.1s.order.payment",
                "time": datetime(2026, 1, 1),
                "exchange": "order.retry",
                "routing-keys": ["1s.order.payment"],
            }
        ],
        "x-first-death-reason": "expired",
        "x-attempts": 1,
        "x-last-error": "OperationalError: server closed the connection\n\tThis probably means...\r\n",
        "x-parking-reason": "failed 3 times; last error:\nboom",
        "x-binary": b"\xff\xfe\x01\x02"[:2],
        "x-decimal": Decimal("1.5"),
        "x-none": None,
        "x-bool": True,
    }
    assert code_of(delivery(headers=headers)) is None


def test_headers_nested_too_deep() -> None:
    value: Any = "leaf"
    for _ in range(40):
        value = {"a": value}
    assert code_of(delivery(headers={"x-schema-version": 1, "x-deep": value})) == "NESTING_TOO_DEEP"


def test_the_first_problem_is_reported_in_a_stable_order() -> None:
    # message_id first, then correlation_id, the other properties, headers, body size, ...
    d = delivery(message_id="a\x00", correlation_id="b\x00", body={**NOTIFY, "order_no": "\x00"})
    assert code_of(d) == "INVALID_MESSAGE_ID"
    d = delivery(correlation_id="b\x00", body=b"[" * 100)
    assert code_of(d) == "INVALID_CORRELATION_ID"


# ---------------------------------------------------------------------------------------------
# printable


def test_printable_escapes_control_characters_and_surrogates() -> None:
    assert wire.printable("a\x00b\x1b\x7f\x85\ud800c", 100) == "a\\x00b\\x1b\\x7f\\x85\\ud800c"
    assert wire.printable("tab\there\nnew", 100) == "tab\\x09here\\x0anew"
    assert wire.printable("tab\there\nnew", 100, keep=wire.FREE_TEXT_WHITESPACE) == "tab\there\nnew"
    assert wire.printable("a\x00", 100, keep="\x00\t") == "a\x00"  # keep is the caller's choice
    assert wire.printable(b"ok\xff\x00", 100) == "ok\\xff\\x00"
    assert wire.printable("clean text 订单 \\x00 stays", 100) == "clean text 订单 \\x00 stays"


def test_printable_limits_utf8_bytes() -> None:
    assert wire.printable("x" * 10, 10) == "x" * 10
    assert wire.printable("x" * 11, 10) == "x" * 7 + "..."
    assert wire.printable("订" * 4, 12) == "订" * 4
    assert wire.printable("订" * 5, 12) == "订" * 3 + "..."
    assert wire.printable("\x00" * 100, 255) == "\\x00" * 63 + "..."
    assert wire.printable("abc", 2) == "ab"
    assert wire.printable("abc", 0) == ""


@given(text=st.text() | st.binary().map(bytes), limit=st.integers(0, 300))
def test_printable_output_is_always_safe(text: str | bytes, limit: int) -> None:
    out = wire.printable(text, limit)
    assert wire.forbidden_character(out) is None
    assert len(out.encode("utf-8")) <= limit
    assert len(out) <= limit
    if isinstance(text, str) and wire.forbidden_character(text) is None and len(text.encode()) <= limit:
        assert out == text


@given(text=st.text(), limit=st.integers(0, 300))
def test_printable_free_text_keeps_only_whitespace(text: str, limit: int) -> None:
    out = wire.printable(text, limit, keep=wire.FREE_TEXT_WHITESPACE)
    assert wire.forbidden_character(out, free_text=True) is None
    assert len(out.encode("utf-8")) <= limit


def test_a_body_deeper_than_the_parser_may_go_never_reaches_it_whatever_the_recursion_limit() -> None:
    # The consumers raise the recursion limit (for pika's header decoding): the JSON parser's
    # own recursion is in C, so a 1 MiB body of brackets must be refused before it.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        deep = b"[" * 500_000 + b"]" * 500_000
        assert wire.parse_body(deep)[1] == (
            "NESTING_TOO_DEEP",
            f"body is nested more than {wire.MAX_DEPTH} levels deep",
        )
        # Brackets inside strings do not count
        text = json.dumps({"reason": "[" * 1000, "items": [[1]]})
        assert not wire.nested_deeper_than(text, 3)
        assert wire.nested_deeper_than("[" * 4 + "]" * 4, 3)
    finally:
        sys.setrecursionlimit(limit)
