"""The wire contract's limits on every message (v1.1), checked before any database work.

Pure functions, no I/O. Each check returns None when the message is within the limits, or a
`Problem`: a stable reject code and a readable, one-line reason that is itself safe to store
(hostile text in it is escaped with `printable`).

The limits (docs: CONTRACT.md, "Every message"):

* a body is at most 1 MiB (checked by the caller) and nested at most `MAX_DEPTH` levels deep;
  it is UTF-8 JSON proper: no NaN/Infinity, no number too large to be finite, no lone
  surrogate (`"\\ud800"`), none of which PostgreSQL can store;
* no string, in the body (keys and values), in a property or in a header (names and values,
  in nested tables and arrays too), contains a control character (Unicode category Cc: U+0000
  to U+001F and U+007F to U+009F). Tab, line feed and carriage return are allowed only in
  free text: the body fields named in `FREE_TEXT_FIELDS`, at any depth, and the headers named
  in `FREE_TEXT_HEADERS` (which the service itself writes on retries and parking);
* `message_id` and `correlation_id` are at most `MAX_ID_CHARS` printable characters
  (`str.isprintable`: no control, format or separator character other than the space).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika

from domain import names as n
from domain.errors import RejectCode

Problem = tuple[str, str]  # (reject code, readable reason)

MAX_DEPTH = 32
MAX_ID_CHARS = 255
# Body fields of free text, wherever they are nested (receiver.address, say): tab, line feed
# and carriage return are allowed in their string values, never in keys or other strings.
FREE_TEXT_FIELDS: frozenset[str] = frozenset({"reason", "detail", "address", "text"})
# Headers of free text, written by the service itself (a retried or replayed message keeps them).
FREE_TEXT_HEADERS: frozenset[str] = frozenset({n.LAST_ERROR_HEADER, n.PARKING_REASON_HEADER})
FREE_TEXT_WHITESPACE = "\t\n\r"
# AMQP string properties the service does not otherwise check (message_id and correlation_id
# have rules of their own; content_type is judged by validation).
TEXT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "reply_to",
    "user_id",
    "expiration",
    "cluster_id",
)

# Control characters (Cc) and surrogates (Cs: a lone one comes from a JSON "\ud800" escape).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_C1 = re.compile(r"[\x7f-\x9f]")
_FORBIDDEN_IN_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_CUT = "..."
_REASON_TEXT = 80  # hostile text quoted in a reason is cut to this many bytes


# ---------------------------------------------------------------------------------------------
# Escaping


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str | bytes, limit: int, keep: str = "") -> str:
    """`text` safe to write into JSON/JSONB, a text column and an AMQP property or header.

    Control characters (Cc) and lone surrogates become `\\x00` / `\\x85` / `\\ud800` style
    escapes (those in `keep`, e.g. FREE_TEXT_WHITESPACE, stay as they are); bytes are read as
    UTF-8 with undecodable bytes as `\\xff`. The result is at most `limit` UTF-8 bytes (so at
    most `limit` characters too: limit=255 fits an AMQP short string and a VARCHAR(255)); a
    longer one is cut and ends in "...". Backslashes are left alone, so the escaping is not
    reversible: it is for showing and storing hostile text, not for carrying it. Text without
    control characters or surrogates that fits is returned unchanged.
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="backslashreplace")
    elif not isinstance(text, str):
        text = str(text)
    limit = max(limit, 0)
    head = text[: limit + 1]  # every character takes a byte at least: the rest cannot fit
    if _FORBIDDEN.search(head):
        head = _FORBIDDEN.sub(lambda m: _kept(m.group(), keep), head)
    encoded = head.encode("utf-8")
    if len(text) <= limit and len(encoded) <= limit:
        return head
    if limit < len(_CUT):
        return encoded[:limit].decode("utf-8", errors="ignore")
    # Cut on a character boundary (a multi-byte character cut in two is dropped).
    return encoded[: limit - len(_CUT)].decode("utf-8", errors="ignore") + _CUT


def _kept(char: str, keep: str) -> str:
    return char if char in keep and not 0xD800 <= ord(char) <= 0xDFFF else _escape(char)


def _quote(text: str | bytes) -> str:
    """Hostile text for a reason: escaped, cut, in quotes."""
    return f"'{printable(text, _REASON_TEXT)}'"


def _char_name(char: str) -> str:
    return f"U+{ord(char):04X}"


def forbidden_character(text: str, free_text: bool = False) -> int | None:
    """Position of the first control character (or lone surrogate) in `text`, None if none.

    In free text, tab, line feed and carriage return are allowed.
    """
    found = (_FORBIDDEN_IN_FREE_TEXT if free_text else _FORBIDDEN).search(text)
    return found.start() if found else None


def _text_problem(text: str, where: str, free_text: bool = False) -> Problem | None:
    at = forbidden_character(text, free_text)
    if at is None:
        return None
    char = text[at]
    if 0xD800 <= ord(char) <= 0xDFFF:
        return (
            RejectCode.INVALID_JSON,
            f"{where} contains a lone surrogate {_char_name(char)} at position {at}: not Unicode text",
        )
    return (
        RejectCode.CONTROL_CHARACTER,
        f"{where} contains control character {_char_name(char)} at position {at}",
    )


# ---------------------------------------------------------------------------------------------
# Properties and headers


def _not_text(value: object, where: str) -> str:
    """The reason for a value that ought to be text and is not (bytes: not UTF-8)."""
    if isinstance(value, bytes):
        return f"{where} is not UTF-8 text: {_quote(value)}"
    return f"{where} is a {type(value).__name__}, not text"


def check_id(value: object, name: str, code: str) -> Problem | None:
    """message_id / correlation_id: at most MAX_ID_CHARS printable characters (None is fine here)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return code, _not_text(value, name)
    if len(value) > MAX_ID_CHARS:
        return code, f"{name} is {len(value)} characters long, over the limit of {MAX_ID_CHARS}"
    if value.isprintable():
        return None  # every message's ids: the reason below is spelled out only for a problem
    # Not printable, and so not empty: some character is not printable.
    position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
    return (
        code,
        f"{name} {_quote(value)} contains the non-printable character "
        f"{_char_name(char)} at position {position}",
    )


def check_text(value: object, where: str) -> Problem | None:
    """A string property or the routing key: UTF-8 text without control characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        return RejectCode.INVALID_PROPERTY, _not_text(value, where)
    if not _FORBIDDEN.search(value):
        return None
    return _text_problem(value, f"{where} {_quote(value)}")


def _header_problem(value: object, path: str, free_text: bool, depth: int) -> Problem | None:
    """A header value: strings without control characters, tables and arrays recursively."""
    if value is None or isinstance(value, bool | int | float | Decimal | datetime):
        return None
    if isinstance(value, bytes | bytearray):
        # A byte array, or a long string that is not UTF-8: text as far as it decodes.
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        if forbidden_character(value, free_text) is None:
            return None  # the reason below is spelled out only for a problem
        return _text_problem(value, _header_where(path), free_text)
    return _nested_header_problem(value, path, depth)


def _header_where(path: str) -> str:
    return f"header {printable(path, 200)}"


def _nested_header_problem(value: object, path: str, depth: int) -> Problem | None:
    """A header value that is neither a scalar nor text: a table or an array, checked
    recursively (at most MAX_DEPTH levels deep); anything else is not an AMQP value."""
    if depth >= MAX_DEPTH:
        return (
            RejectCode.NESTING_TOO_DEEP,
            f"{_header_where(path)} is nested more than {MAX_DEPTH} levels deep",
        )
    if isinstance(value, Mapping):
        return headers_problem(value, f"{path}.", depth + 1)
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _header_problem(item, f"{path}[{index}]", False, depth + 1)
            if problem:
                return problem
        return None
    return RejectCode.INVALID_PROPERTY, f"{_header_where(path)} has a value of type {type(value).__name__}"


def headers_problem(headers: Mapping[Any, Any], prefix: str = "", depth: int = 0) -> Problem | None:
    """Header names and values (tables and arrays recursively) without control characters;
    tab, line feed and carriage return are allowed in the values of FREE_TEXT_HEADERS."""
    for key, value in headers.items():
        if isinstance(key, bytes):
            return RejectCode.INVALID_PROPERTY, f"header name {prefix}{_quote(key)} is not UTF-8 text"
        name = str(key)
        if _FORBIDDEN.search(name):
            return _text_problem(name, f"header name {prefix}{_quote(name)}")
        free_text = depth == 0 and name in FREE_TEXT_HEADERS
        problem = _header_problem(value, f"{prefix}{name}", free_text, depth)
        if problem:
            return problem
    return None


def properties_problem(props: pika.BasicProperties) -> Problem | None:
    """message_id, correlation_id, the other string properties and the headers."""
    problem = check_id(props.message_id, "message_id", RejectCode.INVALID_MESSAGE_ID) or check_id(
        props.correlation_id, "correlation_id", RejectCode.INVALID_CORRELATION_ID
    )
    if problem:
        return problem
    for name in TEXT_PROPERTIES:
        problem = check_text(getattr(props, name, None), f"property {name}")
        if problem:
            return problem
    headers = props.headers
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        return RejectCode.INVALID_PROPERTY, f"headers are a {type(headers).__name__}, not a table"
    return headers_problem(headers)


# ---------------------------------------------------------------------------------------------
# The body


class _NotJson(ValueError):
    pass


def _constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{printable(text, 40)} is too large a number")
    return value


def body_problem(value: Any) -> Problem | None:
    """A parsed body nested at most MAX_DEPTH levels, its keys and strings without control
    characters (tab, line feed and carriage return allowed in FREE_TEXT_FIELDS values).

    Iterative, so a body as deep as the parser allows costs no Python recursion; a path is
    only spelled out for the reason of a problem.
    """
    if isinstance(value, str):
        return _text_problem(value, "body string")
    if not isinstance(value, dict | list):
        return None  # a number, true, false or null
    # (container, its depth, its path as (parent's path, key))
    stack: list[tuple[Any, int, tuple[Any, str | int] | None]] = [(value, 1, None)]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return (
                RejectCode.NESTING_TOO_DEEP,
                f"body is nested more than {MAX_DEPTH} levels deep (at {_spell(where)})",
            )
        pairs = enumerate(item) if isinstance(item, list) else item.items()
        for key, child in pairs:
            # Where a problem is is spelled out only once one is found: this walk is on the hot path.
            if isinstance(key, str) and _FORBIDDEN.search(key):
                return _text_problem(key, f"body key {_quote(key)} at {_spell(where)}")
            if isinstance(child, str):
                free_text = isinstance(key, str) and key in FREE_TEXT_FIELDS
                if forbidden_character(child, free_text) is not None:
                    return _text_problem(child, f"body string at {_spell((where, key))}", free_text)
            elif isinstance(child, dict | list):
                stack.append((child, depth + 1, (where, key)))
    return None


def _spell(where: tuple[Any, str | int] | None) -> str:
    """A JSON path like `$.items[0].sku` (keys escaped and quoted when not plain names)."""
    keys: list[str | int] = []
    while where is not None:
        where, key = where
        keys.append(key)
    path = "$"
    for key in reversed(keys):
        if isinstance(key, int):
            path += f"[{key}]"
        elif key.isidentifier():
            path += f".{key}"
        else:
            path += f"[{_quote(key)}]"
    return path if len(path) <= 200 else path[:197] + "..."


# Deeper than this, a body never reaches the JSON parser (whose C recursion is bounded only by
# the interpreter's recursion limit); between MAX_DEPTH and this, the walk names where.
PARSER_DEPTH = 500
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than `limit` (a cheap pre-scan: a body
    with at most `limit` opening brackets cannot, and is not scanned at all)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        elif bracket in "]}":
            depth -= 1
    return False


def _loads(text: str) -> tuple[Any, Problem | None]:
    """`text` parsed as JSON, or what the parser refused in it (NaN, 1e999, too deep, ...)."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_finite), None
    except RecursionError:
        return None, (RejectCode.NESTING_TOO_DEEP, f"body is nested more than {MAX_DEPTH} levels deep")
    except json.JSONDecodeError as exc:
        return None, (RejectCode.INVALID_JSON, f"body is not UTF-8 JSON: {exc}")
    except _NotJson as exc:  # NaN/Infinity, 1e999
        return None, (RejectCode.INVALID_JSON, f"body is not JSON the service can store: {exc}")
    except ValueError:  # int() refuses over 4,300 digits (sys.get_int_max_str_digits)
        return None, (RejectCode.INVALID_JSON, "body has an integer of more digits than can be read")


def parse_body(body: bytes) -> tuple[Any, Problem | None]:
    """The body as JSON within the limits, or the problem with it.

    A body nested deeper than Python's parser can go (a 50,000-deep `[[[...]]]`) fails fast
    with RecursionError: NESTING_TOO_DEEP, like any body deeper than MAX_DEPTH.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (RejectCode.INVALID_JSON, f"body is not UTF-8 JSON: {exc}")
    if nested_deeper_than(text, PARSER_DEPTH):
        # Before the parser: its recursion must never depend on the interpreter's limit
        # (the consumers raise it so that pika can decode any header table a frame can hold).
        return None, (RejectCode.NESTING_TOO_DEEP, f"body is nested more than {MAX_DEPTH} levels deep")
    value, problem = _loads(text)
    if problem is not None:
        return None, problem
    if "\\" not in text and not _C1.search(text) and text.count("[") + text.count("{") <= MAX_DEPTH:
        # The parser refuses raw control characters below U+0020 in strings: without an escape
        # or a C1 character no string can hold one, and so few brackets cannot nest too deep.
        return value, None
    problem = body_problem(value)
    return (None, problem) if problem else (value, None)
