"""HMAC-SHA256 signatures of payment-provider notifications (`payment.notify`, `refund.result`).

The signed text is every body field except `signature`, sorted by key and joined as
`key=value` with `&`; values are plain text (strings as sent, integers in decimal).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def signing_text(body: Mapping[str, Any]) -> str:
    """The text that is signed: `k1=v1&k2=v2` over every field but `signature`, sorted by key."""
    return "&".join(f"{key}={_plain(body[key])}" for key in sorted(body) if key != "signature")


def sign(body: Mapping[str, Any], secret: str) -> str:
    """The lowercase hex HMAC-SHA256 of the body's signing text."""
    return hmac.new(secret.encode(), signing_text(body).encode(), hashlib.sha256).hexdigest()


def verify(body: Mapping[str, Any], secret: str) -> bool:
    """Whether the body's `signature` is right, compared in constant time."""
    given = body.get("signature")
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(sign(body, secret).encode(), given.strip().lower().encode())
