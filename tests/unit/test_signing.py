"""Signatures of payment-provider notifications (HMAC-SHA256 over the sorted fields)."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from domain.signing import sign, signing_text, verify

SECRET = "s3cret"
NOTIFY = {
    "order_no": "O20300101000000000001",
    "payment_no": "P-1",
    "method": "card",
    "amount": 12345,
    "paid_at": "2030-01-01T00:00:00+00:00",
}


def test_signing_text_sorts_fields_and_leaves_out_the_signature() -> None:
    # Given a body with its fields out of order and a signature
    body = {"b": "x", "a": 1, "signature": "ignored"}
    # When the signed text is built
    # Then it is key=value sorted by key, joined with &, integers in decimal, without the signature
    assert signing_text(body) == "a=1&b=x"


def test_signature_is_lowercase_hex_hmac_sha256_of_the_text() -> None:
    # Given the contract's recipe computed by hand
    text = (
        "amount=12345&method=card&order_no=O20300101000000000001"
        "&paid_at=2030-01-01T00:00:00+00:00&payment_no=P-1"
    )
    expected = hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()
    # When the body is signed
    # Then both agree
    assert sign(NOTIFY, SECRET) == expected
    assert expected == expected.lower() and len(expected) == 64


def test_a_signed_body_verifies() -> None:
    # Given a body signed with the secret
    signature = sign(NOTIFY, SECRET)
    body = {**NOTIFY, "signature": signature}
    # Then it verifies, also with the signature in upper case
    assert verify(body, SECRET)
    assert verify({**body, "signature": signature.upper()}, SECRET)


def test_a_changed_field_wrong_secret_or_missing_signature_fails() -> None:
    # Given a correctly signed body
    body = {**NOTIFY, "signature": sign(NOTIFY, SECRET)}
    # Then any change of a field, another secret, or no signature at all fails verification
    assert not verify({**body, "amount": 12346}, SECRET)
    assert not verify({**body, "extra": "field"}, SECRET)
    assert not verify(body, "other-secret")
    assert not verify(NOTIFY, SECRET)
    assert not verify({**body, "signature": 42}, SECRET)
    assert not verify({**body, "signature": ""}, SECRET)


@given(
    fields=st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
            lambda k: k != "signature"
        ),
        st.one_of(st.integers(), st.text(max_size=40)),
        max_size=8,
    )
)
def test_any_body_round_trips_and_any_tampering_is_caught(fields: dict[str, object]) -> None:
    # Given any body, signed
    body = {**fields, "signature": sign(fields, SECRET)}
    # Then it verifies, and adding a field breaks it
    assert verify(body, SECRET)
    assert not verify({**body, "ADDED": "1"}, SECRET)  # upper case: never a generated key
