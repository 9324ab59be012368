"""Byte-level fuzz through the real broker: no message, however malformed, stops a queue.

Random bodies (arbitrary bytes, JSON with control characters and lone surrogates, deep
nesting, huge strings), random properties and headers (message ids with NUL, odd schema
versions, nested tables, byte arrays, forged x-original-* and x-death) go to every routing key
the service knows and to unknown ones, through every exchange a message can come in by. After
each example a valid command goes to each queue the example reached, and its answer must come:
a queue that stopped on a message would never answer it.

FUZZ_EXAMPLES sets the number of examples (default 120: well under a minute here).
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pika
import pika.exceptions
import pytest
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

from consumers.registry import consumer_specs
from domain import names as n
from settings import Settings
from testing.broker import EventListener
from testing.system import System, unique

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
ANSWER_TIMEOUT = float(os.environ.get("FUZZ_ANSWER_TIMEOUT", "20"))

SPECS = consumer_specs(Settings())
QUEUE_OF = {key: spec.queue for spec in SPECS.values() for key in spec.routes}
TIMER_KEYS = sorted(key for key in QUEUE_OF if key.startswith("timer."))
COMMAND_KEYS = sorted(key for key in QUEUE_OF if not key.startswith("timer."))
UNKNOWN_KEYS = ["", "x.y", "stock.teleport", "order.place.extra", "timer", "#", "order.*"]
QUEUES = sorted(spec.queue for spec in SPECS.values())
SENT: list[Hostile] = []  # what the fuzz published, for the last test's message


# ---------------------------------------------------------------------------------------------
# A valid body per routing key, to mutate (unique identifiers: each may really be applied)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def template(key: str) -> dict[str, Any]:
    u = uuid.uuid4().hex[:10]
    receiver = {"name": "Fuzz", "phone": "1", "address": "1 Fuzz Street"}
    bodies: dict[str, dict[str, Any]] = {
        n.Cmd.SKU_UPSERT: {
            "sku": f"fz-{u}",
            "name": "Fuzz",
            "unit_price": 100,
            "merchant_id": "M1",
            "warehouse_id": "W1",
        },
        n.Cmd.STOCK_RESTOCK: {"sku": f"fz-{u}", "warehouse_id": "W1", "quantity": 1},
        n.Cmd.COUPON_GRANT: {
            "code": f"fz-{u}",
            "user_id": f"u-{u}",
            "amount": 1,
            "min_spend": 0,
            "expires_at": "2099-01-01T00:00:00Z",
        },
        n.Cmd.ORDER_PLACE: {
            "request_id": f"r-{u}",
            "user_id": f"u-{u}",
            "order_type": "physical",
            "items": [{"sku": f"fz-{u}", "quantity": 1}],
            "receiver": receiver,
        },
        n.Cmd.ORDER_UPDATE_ADDRESS: {"order_no": f"o-{u}", "user_id": f"u-{u}", "receiver": receiver},
        n.Cmd.ORDER_CANCEL: {"order_no": f"o-{u}", "user_id": f"u-{u}", "reason": "fuzz"},
        n.Cmd.PAYMENT_NOTIFY: {
            "order_no": f"o-{u}",
            "payment_no": f"p-{u}",
            "method": "card",
            "amount": 100,
            "paid_at": _now(),
            "signature": "0" * 64,
        },
        n.Cmd.ORDER_SHIP: {"order_no": f"o-{u}", "carrier": "C", "tracking_no": f"t-{u}"},
        n.Cmd.LOGISTICS_UPDATE: {
            "order_no": f"o-{u}",
            "tracking_no": f"t-{u}",
            "status": "IN_TRANSIT",
            "at": _now(),
            "detail": "fuzz",
        },
        n.Cmd.ORDER_CONFIRM_RECEIPT: {"order_no": f"o-{u}", "user_id": f"u-{u}"},
        n.Cmd.ORDER_REMARK: {"order_no": f"o-{u}", "author": f"user:u-{u}", "text": "fuzz"},
        n.Cmd.AFTERSALE_REQUEST: {
            "order_no": f"o-{u}",
            "user_id": f"u-{u}",
            "kind": "REFUND_ONLY",
            "amount": 1,
            "reason": "fuzz",
        },
        n.Cmd.AFTERSALE_APPROVE: {"aftersale_no": f"a-{u}", "merchant_id": "M1"},
        n.Cmd.AFTERSALE_REJECT: {"aftersale_no": f"a-{u}", "merchant_id": "M1", "reason": "fuzz"},
        n.Cmd.AFTERSALE_RETURN_RECEIVED: {"aftersale_no": f"a-{u}", "merchant_id": "M1"},
        n.Cmd.MERCHANT_CANCEL: {"order_no": f"o-{u}", "merchant_id": "M1", "reason": "fuzz"},
        n.Cmd.REFUND_RESULT: {"refund_no": f"rf-{u}", "status": "SUCCEEDED", "signature": "0" * 64},
    }
    if key.startswith("timer."):
        return {"kind": key.removeprefix("timer."), "ref": f"o-{u}", "due_at": _now()}
    return bodies.get(key, {"sku": f"fz-{u}", "quantity": 1})


def test_every_template_is_a_valid_command() -> None:
    for spec in SPECS.values():
        for key, route in spec.routes.items():
            route.schema.model_validate(template(key))


# ---------------------------------------------------------------------------------------------
# Strategies

_ODD_CHARS = st.characters(codec=None, categories=["Cc", "Cs", "Cf", "Zl", "Zp", "Co", "Cn"])
hostile_text = st.one_of(
    st.text(max_size=20),
    st.text(_ODD_CHARS | st.sampled_from("ab-\t\n\r"), min_size=1, max_size=12),
    st.sampled_from(
        [
            "\x00",
            "a\x00b",
            "\t",
            "line\nbreak",
            "\x1b[31m",
            "\x7f",
            "\x85",
            "\ud800",
            "\udfff",
            "\u202e",
            "\ufeff",
            "\u2028",
            "x" * 65,
            "",
            " ",
            "订单",
            "\U0001f600",
            "\\u0000",
            "'; DROP TABLE orders;--",
        ]
    ),
)


def wire_bytes(text: str, limit: int | None = None) -> bytes:
    """Text as UTF-8 bytes, lone surrogates and all (invalid UTF-8 then); cut to `limit`."""
    data = text.encode("utf-8", "surrogatepass")
    return data if limit is None else data[:limit]


json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | hostile_text
)
json_values = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=20,
)


def dumps(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def nest(value: Any, depth: int, kind: str) -> Any:
    for _ in range(depth):
        value = [value] if kind == "list" else {"n": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, key: str) -> bytes:
    """A valid body for `key` with one field (or an added one) made hostile."""
    body = template(key)
    field = draw(st.sampled_from([*body, "extra", "reason", "detail", "address", "text"]))
    how = draw(st.sampled_from(["text", "value", "deep", "key", "huge", "inner"]))
    if how == "text":
        body[field] = draw(hostile_text)
    elif how == "value":
        body[field] = draw(json_values)
    elif how == "deep":
        body[field] = nest(
            "x", draw(st.sampled_from([30, 31, 32, 33, 40, 500])), draw(st.sampled_from(["list", "dict"]))
        )
    elif how == "key":
        body[draw(hostile_text)] = "x"
    elif how == "huge":
        body[field] = "x" * draw(st.sampled_from([64, 65, 1000, 1001, 500_000, 1024 * 1024 - 200]))
    elif how == "inner" and "receiver" in body:
        body["receiver"] = {
            **body["receiver"],
            draw(st.sampled_from(["name", "phone", "address"])): draw(hostile_text),
        }
    elif how == "inner" and "items" in body:
        body["items"] = [{**body["items"][0], "sku": draw(hostile_text)}]
    return dumps(body, draw(st.booleans()))


def bodies(key: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(key),
        mutated(key),
        st.binary(max_size=300),
        json_values.flatmap(lambda v: st.booleans().map(lambda a: dumps(v, a))),
        st.sampled_from([50_000, 1000, 33]).map(lambda d: b"[" * d + b"]" * d),
        st.just(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        st.just(b"[" * 200_000),
        st.sampled_from(
            [
                b'{"amount": NaN}',
                b'{"amount": 1e999}',
                b'{"a": ' + b"9" * 5000 + b"}",
                b'{"order_no": "\\u0000"}',
                b'{"order_no": "\\ud800"}',
                b'{"\\u0000": 1}',
                b"",
                b"null",
                b'"\\u0000"',
                b"\xef\xbb\xbf{}",
                b'{"pad": "' + b"x" * (1024 * 1024) + b'"}',  # over the limit by a few bytes
            ]
        ),
    )


def short_strings() -> st.SearchStrategy[Any]:
    """What an AMQP short string property can carry: up to 255 bytes, UTF-8 or not."""
    return st.one_of(
        st.none(),
        st.just(""),
        st.builds(lambda: str(uuid.uuid4())),
        hostile_text.map(lambda t: wire_bytes(t, 255)),
        st.sampled_from([b"x" * 255, ("é" * 127).encode(), b"\xff\xfe", b"a\x00b", ("订" * 85).encode()]),
    )


header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False)
    | st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1))
    | hostile_text.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t))
    | hostile_text.map(wire_bytes)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(hostile_text.map(lambda t: wire_bytes(t, 60)), children, max_size=3),
    max_leaves=10,
)


def forged_death(key: str) -> Any:
    return [
        {
            "count": 1,
            "reason": "expired",
            "queue": "order.retry.1s",
            "time": datetime(2026, 1, 1),
            "exchange": "order.retry",
            "routing-keys": [key, "a\x00b"],
        }
    ]


@st.composite
def headers(draw: st.DrawFn, key: str, hostile: bool) -> dict[Any, Any]:
    """x-schema-version 1 and maybe a forgery or two; with `hostile`, anything goes."""
    found: dict[Any, Any] = {n.SCHEMA_VERSION_HEADER: 1}
    if hostile:
        version = draw(
            st.sampled_from(
                [None, 2, 0, -1, "1", b"1", True, Decimal("1.0"), [1], {"v": 1}, "\x00", 2**64 - 1]
            )
        )
        found[n.SCHEMA_VERSION_HEADER] = version
        if version is None:
            del found[n.SCHEMA_VERSION_HEADER]
    forgeries = {
        n.ORIGINAL_ROUTING_KEY_HEADER: st.sampled_from(
            [*COMMAND_KEYS, *TIMER_KEYS, "x.y", "a\x00b", b"\xff"]
        ),
        n.ORIGINAL_EXCHANGE_HEADER: st.sampled_from(["", n.COMMANDS_EXCHANGE, "nowhere", "a\x00"]),
        n.ORIGINAL_QUEUE_HEADER: st.sampled_from([*QUEUES, "a\x00"]),
        n.ATTEMPTS_HEADER: st.sampled_from([0, 1, 2, 99, -1, 2**63, "1", None]),
        n.LAST_ERROR_HEADER: hostile_text.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
        n.PARKING_REASON_HEADER: st.just("parked\nbefore"),
        n.PARKING_CODE_HEADER: st.sampled_from(["SCHEMA_INVALID", "\x00"]),
        "x-death": st.just(forged_death(key)),
        "x-delivery-count": st.sampled_from([0, 5, 2**63, "x"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(forgeries)), max_size=3, unique=True)):
        found[name] = draw(forgeries[name])
    if hostile:
        names = hostile_text.map(lambda t: wire_bytes(t, 60))
        found.update(draw(st.dictionaries(names, header_values, min_size=1, max_size=3)))
    return found


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 4, 8, 8, 80, 80


class Hostile:
    """One message to publish (a plain class: its repr is short, hypothesis prints it as is)."""

    def __init__(
        self, exchange: str, routing_key: str, queue: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.queue = queue  # where it lands
        self.body = body
        self.properties = properties

    def __repr__(self) -> str:
        p = self.properties
        shown = {
            k: v
            for k, v in vars(p).items()
            if v is not None and k in ("message_id", "correlation_id", "content_type", "type", "headers")
        }
        body = f"{self.body[:120]!r}{'...' if len(self.body) > 120 else ''}"
        return (
            f"Hostile({self.exchange!r}, {self.routing_key!r} -> {self.queue}, "
            f"body={body} ({len(self.body)} bytes), {_SHORT.repr(shown)})"
        )


@st.composite
def hostile_messages(draw: st.DrawFn) -> Hostile:
    way = draw(st.sampled_from(["command"] * 5 + ["timer", "unknown", "direct", "retry"]))
    if way == "command":
        key = draw(st.sampled_from(COMMAND_KEYS))
        exchange, routing_key, queue = n.COMMANDS_EXCHANGE, key, QUEUE_OF[key]
    elif way == "timer":
        key = draw(st.sampled_from([*TIMER_KEYS, "timer.unknown-kind"]))
        exchange, routing_key, queue = n.TIMERS_FIRED_EXCHANGE, key, n.TIMEOUTS_QUEUE
    elif way == "unknown":
        key = draw(st.sampled_from(UNKNOWN_KEYS) | hostile_text.map(lambda t: t[:50]))
        exchange, routing_key, queue = n.COMMANDS_EXCHANGE, key, n.UNROUTED_QUEUE
    elif way == "direct":  # the default exchange, straight into a queue
        queue = draw(st.sampled_from(QUEUES))
        exchange, routing_key, key = "", queue, queue
    else:  # as if back from a retry queue: x-original-* headers are believed there
        queue = draw(st.sampled_from(QUEUES))
        exchange, routing_key = n.RETRY_RETURN_EXCHANGE, f"1s.{queue}"
        key = draw(st.sampled_from([*COMMAND_KEYS, *TIMER_KEYS]))
    # Mostly a hostile body behind proper properties (or the body is never read), else
    # hostile properties, or hostile headers.
    focus = draw(st.sampled_from(["body"] * 6 + ["properties"] * 2 + ["headers"] * 2))
    found_headers = draw(headers(key, hostile=focus == "headers"))
    if way == "retry" and draw(st.booleans()):
        found_headers[n.ORIGINAL_ROUTING_KEY_HEADER] = key
        found_headers[n.ORIGINAL_EXCHANGE_HEADER] = n.COMMANDS_EXCHANGE
    message_id = str(uuid.uuid4())
    if focus == "properties":
        properties = pika.BasicProperties(
            message_id=draw(st.just(message_id) | short_strings()),
            correlation_id=draw(short_strings()),
            content_type=draw(
                st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain"])
                | short_strings()
            ),
            type=draw(st.just(routing_key) | short_strings()),
            app_id=draw(short_strings()),
            reply_to=draw(short_strings()),
            delivery_mode=draw(st.sampled_from([None, 1, 2])),
            priority=draw(st.sampled_from([None, 0, 9, 255])),
            timestamp=draw(st.sampled_from([None, 0, int(time.time()), 2**63 - 1])),
            headers=found_headers,
        )
    else:
        properties = pika.BasicProperties(
            message_id=message_id,
            correlation_id=draw(st.sampled_from([None, message_id, str(uuid.uuid4())])),
            content_type="application/json",
            type=routing_key,
            delivery_mode=2,
            headers=found_headers,
        )
    body = draw(bodies(key) if focus == "body" else mutated(key))
    return Hostile(exchange, routing_key, queue, body, properties)


# ---------------------------------------------------------------------------------------------
# Probes: a valid command per queue, and how to know it was applied


@dataclass
class Probe:
    queue: str
    message_id: str
    answered: Callable[[], bool]


def probe(system: System, events: EventListener, queue: str) -> Probe:
    """Publish a valid command to `queue` whose answer shows the queue is moving."""
    message_id = str(uuid.uuid4())
    props = pika.BasicProperties(
        message_id=message_id,
        correlation_id=message_id,
        content_type="application/json",
        delivery_mode=2,
        headers={n.SCHEMA_VERSION_HEADER: 1},
    )
    if queue == n.TIMEOUTS_QUEUE:
        # A timer for an order that does not exist: applied (its dedup row), nothing announced.
        key = n.Timer.fired_key(n.Timer.PAYMENT_TIMEOUT)
        system.publish_raw(key, json.dumps(template(key)).encode(), props, n.TIMERS_FIRED_EXCHANGE)

        def applied() -> bool:
            rows = system.db.query(
                "SELECT 1 FROM processed_messages WHERE consumer = %s AND message_id = %s", queue, message_id
            )
            return bool(rows)

        return Probe(queue, message_id, applied)
    if queue == n.UNROUTED_QUEUE:
        key = f"fuzz.probe-{unique('k')}"  # nobody's: answered with command.rejected
    else:
        key = {
            n.CATALOG_QUEUE: n.Cmd.SKU_UPSERT,  # sku.upserted
            n.PLACEMENT_QUEUE: n.Cmd.ORDER_PLACE,  # order.rejected, UNKNOWN_SKU
            n.PAYMENT_QUEUE: n.Cmd.ORDER_CANCEL,  # order.rejected, UNKNOWN_ORDER
            n.FULFILLMENT_QUEUE: n.Cmd.ORDER_SHIP,  # order.rejected, UNKNOWN_ORDER
            n.AFTERSALE_QUEUE: n.Cmd.AFTERSALE_APPROVE,  # order.rejected, UNKNOWN_AFTERSALE
        }[queue]
    system.publish_raw(key, json.dumps(template(key)).encode(), props)
    return Probe(queue, message_id, lambda: bool(events.for_correlation(message_id)))


def publish(system: System, message: Hostile) -> bool:
    """Publish with a confirm; False when the client library or the broker refuses the message
    (what cannot be sent cannot stop a queue)."""
    try:
        system.publish_raw(message.routing_key, message.body, message.properties, message.exchange)
        return True
    except (pika.exceptions.AMQPError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
        note(f"not sent: {exc!r}")
        return False


def assert_queues_move(system: System, events: EventListener, queues: set[str], sent: list[Hostile]) -> None:
    probes = [probe(system, events, queue) for queue in sorted(queues)]
    deadline = time.monotonic() + ANSWER_TIMEOUT
    waiting = list(probes)
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if not p.answered()]
        if waiting:
            time.sleep(0.05)
    for name, proc in system.processes.items():
        assert proc.poll() is None, f"consumer {name} died after {sent}"
    assert not waiting, (
        f"queue(s) {[p.queue for p in waiting]} did not apply a valid command within {ANSWER_TIMEOUT}s "
        f"after these messages: {sent}; consumer logs in {system.log_dir}/{system.vhost}-*.log"
    )


# ---------------------------------------------------------------------------------------------
# The fuzz test


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # each run is its own: a replayed example would meet a different system
    phases=[Phase.explicit, Phase.generate],  # no shrinking: examples share the running system
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(batch=st.lists(hostile_messages(), min_size=1, max_size=4))
def test_no_message_stops_a_queue(system: System, events: EventListener, batch: list[Hostile]) -> None:
    sent = [m for m in batch if publish(system, m)]
    assume(sent)
    SENT.extend(sent)
    assert_queues_move(system, events, {m.queue for m in sent}, sent)


def test_every_queue_still_moves_after_the_fuzz(system: System, events: EventListener) -> None:
    """What the fuzz sent to a retry queue is back by now (RETRY_DELAYS): it stops no queue either."""
    time.sleep(4)
    assert_queues_move(system, events, set(QUEUES), SENT[-40:])


# ---------------------------------------------------------------------------------------------
# The inputs of the known defect, and others like them, always tried


def _props(message_id: Any = None, **extra: Any) -> pika.BasicProperties:
    values: dict[str, Any] = {
        "message_id": str(uuid.uuid4()) if message_id is None else message_id,
        "content_type": "application/json",
        "delivery_mode": 2,
        "headers": {n.SCHEMA_VERSION_HEADER: 1},
    }
    return pika.BasicProperties(**{**values, **extra})


def _deep_table(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"t": value}
    return value


NOTIFY = template(n.Cmd.PAYMENT_NOTIFY)
KNOWN: dict[str, tuple[str, str, bytes, pika.BasicProperties, str | None]] = {
    # case: (exchange, routing key, body, properties, expected command.rejected code)
    "nul-in-order-no": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.PAYMENT_NOTIFY,
        json.dumps({**NOTIFY, "order_no": "o-\u00001"}).encode(),
        _props(),
        "CONTROL_CHARACTER",
    ),
    "nul-in-message-id": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.ORDER_CANCEL,
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        _props(message_id=f"{uuid.uuid4()}\x00"),
        "INVALID_MESSAGE_ID",
    ),
    "message-id-not-utf8": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.ORDER_CANCEL,
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        _props(message_id=b"\xff" + uuid.uuid4().hex.encode()),
        "INVALID_MESSAGE_ID",
    ),
    "nul-in-correlation-id": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.SKU_UPSERT,
        json.dumps(template(n.Cmd.SKU_UPSERT)).encode(),
        _props(correlation_id="c\x00"),
        "INVALID_CORRELATION_ID",
    ),
    "content-type-not-utf8": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.SKU_UPSERT,
        json.dumps(template(n.Cmd.SKU_UPSERT)).encode(),
        _props(content_type=b"application/json\xff"),
        "INVALID_PROPERTY",
    ),
    "50000-deep-body": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.PAYMENT_NOTIFY,
        b"[" * 50_000 + b"]" * 50_000,
        _props(),
        "NESTING_TOO_DEEP",
    ),
    "nul-escape-in-unknown-field": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.PAYMENT_NOTIFY,
        json.dumps({**NOTIFY, "note": "\u0000"}).encode(),
        _props(),
        "CONTROL_CHARACTER",
    ),
    "lone-surrogate": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.PAYMENT_NOTIFY,
        json.dumps({**NOTIFY, "note": "\ud800"}).encode(),
        _props(),
        "INVALID_JSON",
    ),
    "nan-in-unknown-field": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.PAYMENT_NOTIFY,
        json.dumps({**NOTIFY, "note": float("nan")}).encode(),
        _props(),
        "INVALID_JSON",
    ),
    "nul-in-header": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.ORDER_CANCEL,
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        pika.BasicProperties(
            message_id=str(uuid.uuid4()),
            content_type="application/json",
            headers={n.SCHEMA_VERSION_HEADER: 1, "x-trace": {"inner": ["a\x00"]}},
        ),
        "CONTROL_CHARACTER",
    ),
    "nul-in-routing-key": (
        n.COMMANDS_EXCHANGE,
        "order.cancel\x00",
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        _props(),
        "CONTROL_CHARACTER",
    ),
    # Read before validation, by the timeouts queue's ConsumerSpec.due_at (consumers/timeouts.py):
    # it must survive a body json.loads cannot parse (RecursionError), as validation does.
    "deep-timer-body": (
        n.TIMERS_FIRED_EXCHANGE,
        n.Timer.fired_key(n.Timer.PAYMENT_TIMEOUT),
        b'{"due_at":' * 50_000 + b"1" + b"}" * 50_000,
        _props(),
        "NESTING_TOO_DEEP",
    ),
    "deep-header-table": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.ORDER_CANCEL,
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        pika.BasicProperties(
            message_id=str(uuid.uuid4()),
            content_type="application/json",
            headers={n.SCHEMA_VERSION_HEADER: 1, "x-deep": _deep_table(400)},
        ),
        "NESTING_TOO_DEEP",
    ),
    # Deeper than pika decodes in the consumer (decode_table recurses twice a level; any other
    # client library can send it, and a frame of 128 KiB holds some 18,000 levels): the
    # connection drops before validation sees the message, and it comes back on reconnecting.
    "very-deep-header-table": (
        n.COMMANDS_EXCHANGE,
        n.Cmd.ORDER_CANCEL,
        json.dumps(template(n.Cmd.ORDER_CANCEL)).encode(),
        pika.BasicProperties(
            message_id=str(uuid.uuid4()),
            content_type="application/json",
            headers={n.SCHEMA_VERSION_HEADER: 1, "x-deep": _deep_table(2000)},
        ),
        "NESTING_TOO_DEEP",
    ),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_hostile_input_is_parked_and_the_queue_moves_on(
    system: System, events: EventListener, case: str
) -> None:
    exchange, routing_key, body, props, code = KNOWN[case]
    message = Hostile(exchange, routing_key, "", body, props)
    queue = (
        n.TIMEOUTS_QUEUE
        if exchange == n.TIMERS_FIRED_EXCHANGE
        else QUEUE_OF.get(routing_key, n.UNROUTED_QUEUE)
    )
    message.queue = queue
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pika encodes tables recursively; other clients need not
    try:
        assert publish(system, message), "the broker should take it"
    finally:
        sys.setrecursionlimit(limit)
    assert_queues_move(system, events, {queue}, [message])
    if code is not None and isinstance(props.message_id, str) and props.message_id.isprintable():
        rejected = events.one("command.rejected", message_id=props.message_id)
        assert rejected["code"] == code
