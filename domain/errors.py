"""Business refusals and rejection codes, each with a stable reason code."""

from __future__ import annotations

from typing import Final


class Reason:
    """Reason codes carried by refusal events (`order.rejected`, `payment.rejected`, ...)."""

    OUT_OF_STOCK: Final = "OUT_OF_STOCK"
    UNKNOWN_SKU: Final = "UNKNOWN_SKU"
    COUPON_INVALID: Final = "COUPON_INVALID"
    DUPLICATE_REQUEST: Final = "DUPLICATE_REQUEST"
    UNKNOWN_ORDER: Final = "UNKNOWN_ORDER"
    NOT_YOUR_ORDER: Final = "NOT_YOUR_ORDER"
    INVALID_STATE: Final = "INVALID_STATE"
    ALREADY_SHIPPED: Final = "ALREADY_SHIPPED"
    BAD_SIGNATURE: Final = "BAD_SIGNATURE"
    AMOUNT_MISMATCH: Final = "AMOUNT_MISMATCH"
    MERCHANT_MISMATCH: Final = "MERCHANT_MISMATCH"
    AMOUNT_EXCEEDS_REFUNDABLE: Final = "AMOUNT_EXCEEDS_REFUNDABLE"
    UNKNOWN_AFTERSALE: Final = "UNKNOWN_AFTERSALE"
    UNKNOWN_REFUND: Final = "UNKNOWN_REFUND"
    VIRTUAL_ORDER: Final = "VIRTUAL_ORDER"
    # Refund reasons.
    USER_CANCEL: Final = "USER_CANCEL"
    LATE_PAYMENT: Final = "LATE_PAYMENT"
    AFTERSALE: Final = "AFTERSALE"
    MERCHANT_CANCEL: Final = "MERCHANT_CANCEL"
    PAYMENT_REJECTED: Final = "PAYMENT_REJECTED"
    # A refund.result that would refund more than remains of its payment (parked for an operator).
    REFUND_CONFLICT: Final = "REFUND_CONFLICT"
    # Cancel reasons.
    USER: Final = "USER"
    PAYMENT_TIMEOUT: Final = "PAYMENT_TIMEOUT"


class RejectCode:
    """Codes of `command.rejected` / `x-parking-code`: the command itself is unusable."""

    INVALID_JSON: Final = "INVALID_JSON"
    MISSING_MESSAGE_ID: Final = "MISSING_MESSAGE_ID"
    UNKNOWN_ROUTING_KEY: Final = "UNKNOWN_ROUTING_KEY"
    SCHEMA_INVALID: Final = "SCHEMA_INVALID"
    BODY_TOO_LARGE: Final = "BODY_TOO_LARGE"
    UNSUPPORTED_SCHEMA_VERSION: Final = "UNSUPPORTED_SCHEMA_VERSION"
    UNSUPPORTED_CONTENT_TYPE: Final = "UNSUPPORTED_CONTENT_TYPE"
    UNKNOWN_SKU: Final = "UNKNOWN_SKU"
    RETRIES_EXHAUSTED: Final = "RETRIES_EXHAUSTED"
    # The message's own transaction failed outside its handler (a bug, hostile content), retries spent.
    INTERNAL_ERROR: Final = "INTERNAL_ERROR"
    # Contract v1.1 limits on every message (consumers/wire.py).
    CONTROL_CHARACTER: Final = "CONTROL_CHARACTER"  # in a body string or key, a property or a header
    NESTING_TOO_DEEP: Final = "NESTING_TOO_DEEP"  # body (or a header table) over 32 levels deep
    INVALID_MESSAGE_ID: Final = "INVALID_MESSAGE_ID"  # not at most 255 printable characters
    INVALID_CORRELATION_ID: Final = "INVALID_CORRELATION_ID"  # not at most 255 printable characters
    INVALID_PROPERTY: Final = "INVALID_PROPERTY"  # a string property, header name or routing key not UTF-8


class Refusal(Exception):
    """A valid command the business refuses; the handler turns it into a refusal event."""

    def __init__(self, reason: str, detail: str = "", **fields: object) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.fields = fields  # extra fields for the refusal event (e.g. the existing order_no)


class ParkCommand(Exception):
    """A command that cannot be applied now and must be parked (e.g. restock of an unknown SKU)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ConcurrentUpdate(Exception):
    """A guarded update found the row changed under it (version mismatch); the message is retried."""
