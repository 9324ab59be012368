"""Property-based: random bodies, headers and routing keys never crash validation.

Every delivery ends as either a typed command or a rejection with a code and a readable reason.
"""

from __future__ import annotations

import json
from typing import Any

import pika
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.loop import Delivery, validate
from consumers.registry import consumer_specs
from settings import Settings

ROUTES = {key: route for spec in consumer_specs(Settings()).values() for key, route in spec.routes.items()}
KEYS = sorted(ROUTES) + ["unknown.key", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


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
    ),
    message_id=st.one_of(st.none(), st.text(max_size=40)),
    version=st.one_of(st.none(), st.integers(-2, 3), st.text(max_size=3), st.booleans()),
    content_type=st.one_of(
        st.none(), st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"])
    ),
)
def test_random_input_is_classified_never_crashes(
    routing_key: str, body: bytes, message_id: str | None, version: Any, content_type: str | None
) -> None:
    headers = {} if version is None else {"x-schema-version": version}
    props = pika.BasicProperties(message_id=message_id, content_type=content_type, headers=headers)
    parsed = validate(Delivery(1, routing_key, "order.commands", props, body), ROUTES)
    if parsed.rejection is None:
        assert parsed.command is not None and routing_key in ROUTES and message_id
    else:
        code, reason = parsed.rejection
        assert code.isupper() and reason.strip()
