"""Property-based: random bodies, headers and routing keys never crash validation.

Every delivery ends as either a typed command or a rejection with a code and a readable reason,
and whatever it held, nothing PostgreSQL or AMQP would refuse gets through: an accepted command
is within the wire limits (consumers/wire.py) and a reason has no control character.
"""

from __future__ import annotations

import json
from typing import Any

import pika
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers import wire
from consumers.delivery import Delivery, validate
from consumers.registry import consumer_specs
from settings import Settings

ROUTES = {key: route for spec in consumer_specs(Settings()).values() for key, route in spec.routes.items()}
KEYS = [*sorted(ROUTES), "unknown.key", ""]

# Text as it comes: control characters, lone surrogates and all.
hostile_text = st.text(max_size=80) | st.text(
    st.characters(codec=None, categories=["Cc", "Cs", "Cf", "Zl", "Zp"]) | st.sampled_from("ab\t\n\r"),
    max_size=12,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(hostile_text, children, max_size=6),
    max_leaves=30,
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = {"extra": value}
    return value


def field_values() -> st.SearchStrategy[Any]:
    return json_values | st.sampled_from(["", "x" * 65, "2026-01-01T00:00:00Z", "physical", "REFUND_ONLY"])


def likely_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the contract's field names and arbitrary values: they reach the schemas."""
    names = sorted({name for route in ROUTES.values() for name in route.schema.model_fields})
    return st.dictionaries(st.sampled_from(names), field_values(), max_size=10)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    routing_key=st.sampled_from(KEYS),
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        likely_bodies().map(lambda v: json.dumps(v).encode()),
        st.tuples(likely_bodies(), st.integers(25, 40)).map(lambda v: json.dumps(deep(*v)).encode()),
        st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
        st.sampled_from([b'{"a": NaN}', b'{"a": 1e400}', b'{"a": "\\ud800"}', b"1" * 5000, b"null", b"[]"]),
    ),
    # Often proper properties: the body is only read behind them.
    message_id=st.one_of(
        st.just("m-1"), st.just("m-1"), st.none(), st.text(max_size=40), hostile_text, st.binary(max_size=8)
    ),
    correlation_id=st.one_of(st.none(), st.none(), hostile_text, st.text(min_size=250, max_size=260)),
    version=st.one_of(st.none(), st.just(1), st.integers(-2, 3), st.text(max_size=3), st.booleans()),
    content_type=st.one_of(
        st.none(),
        st.just("application/json"),
        st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]),
        hostile_text,
        st.binary(max_size=8),
    ),
    extra_headers=st.just({})
    | st.dictionaries(
        hostile_text | st.binary(max_size=4),
        json_values | st.binary(max_size=8),
        max_size=3,
    ),
)
def test_random_input_is_classified_never_crashes(
    routing_key: str,
    body: bytes,
    message_id: Any,
    correlation_id: Any,
    version: Any,
    content_type: Any,
    extra_headers: dict[Any, Any],
) -> None:
    headers = {**extra_headers}
    if version is not None:
        headers["x-schema-version"] = version
    props = pika.BasicProperties(
        message_id=message_id, correlation_id=correlation_id, content_type=content_type, headers=headers
    )
    parsed = validate(Delivery(1, routing_key, "order.commands", props, body), ROUTES)
    if parsed.rejection is None:
        assert parsed.command is not None and routing_key in ROUTES and message_id
        # Within the wire limits: nothing the database or the broker would refuse.
        assert wire.properties_problem(props) is None
        assert wire.body_problem(parsed.raw) is None
        assert isinstance(message_id, str) and message_id.isprintable() and len(message_id) <= 255
    else:
        code, reason = parsed.rejection
        assert code.isupper() and reason.strip()
        assert wire.forbidden_character(reason) is None, reason
