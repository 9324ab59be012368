"""Every exchange, queue, routing key and event name, defined once."""

from __future__ import annotations

from typing import Final

# Exchanges of the wire contract.
COMMANDS_EXCHANGE: Final = "order.commands"
EVENTS_EXCHANGE: Final = "order.events"
# Internal exchanges.
UNROUTED_EXCHANGE: Final = "order.commands.unrouted"  # alternate exchange of order.commands
TIMERS_EXCHANGE: Final = "order.timers"  # routes a timer to its delay queue
TIMERS_FIRED_EXCHANGE: Final = "order.timers.fired"  # dead-letter exchange of the delay queues
RETRY_EXCHANGE: Final = "order.retry"  # routes a failed message to a retry delay queue
RETRY_RETURN_EXCHANGE: Final = "order.retry.return"  # dead-letter exchange of the retry queues

PARKING_LOT_QUEUE: Final = "order.parking-lot"
RETRY_QUEUE_PREFIX: Final = "order.retry."
TIMER_QUEUE_PREFIX: Final = "order.timer."

# Consumer queues.
CATALOG_QUEUE: Final = "order.catalog"
PLACEMENT_QUEUE: Final = "order.placement"
PAYMENT_QUEUE: Final = "order.payment"
FULFILLMENT_QUEUE: Final = "order.fulfillment"
AFTERSALE_QUEUE: Final = "order.aftersale"
TIMEOUTS_QUEUE: Final = "order.timeouts"
UNROUTED_QUEUE: Final = "order.unrouted"


class Cmd:
    """Command routing keys (exchange order.commands)."""

    SKU_UPSERT: Final = "sku.upsert"
    STOCK_RESTOCK: Final = "stock.restock"
    COUPON_GRANT: Final = "coupon.grant"
    ORDER_PLACE: Final = "order.place"
    ORDER_UPDATE_ADDRESS: Final = "order.update-address"
    ORDER_CANCEL: Final = "order.cancel"
    PAYMENT_NOTIFY: Final = "payment.notify"
    ORDER_SHIP: Final = "order.ship"
    LOGISTICS_UPDATE: Final = "logistics.update"
    ORDER_CONFIRM_RECEIPT: Final = "order.confirm-receipt"
    AFTERSALE_REQUEST: Final = "aftersale.request"
    AFTERSALE_APPROVE: Final = "aftersale.approve"
    AFTERSALE_REJECT: Final = "aftersale.reject"
    AFTERSALE_RETURN_RECEIVED: Final = "aftersale.return-received"
    MERCHANT_CANCEL: Final = "merchant.cancel"
    REFUND_RESULT: Final = "refund.result"
    ORDER_REMARK: Final = "order.remark"  # v1.1


class Timer:
    """Timer kinds; a fired timer arrives on the timeouts queue with routing key `timer.<kind>`."""

    PAYMENT_TIMEOUT: Final = "payment-timeout"
    AUTO_CONFIRM: Final = "auto-confirm"
    AFTERSALE_REVIEW: Final = "aftersale-review"

    @staticmethod
    def fired_key(kind: str) -> str:
        return f"timer.{kind}"


class Evt:
    """Event routing keys (exchange order.events)."""

    SKU_UPSERTED: Final = "sku.upserted"
    COUPON_GRANTED: Final = "coupon.granted"
    ORDER_CREATED: Final = "order.created"
    ORDER_REJECTED: Final = "order.rejected"
    ORDER_ADDRESS_UPDATED: Final = "order.address-updated"
    ORDER_PAID: Final = "order.paid"
    ORDER_SPLIT: Final = "order.split"
    ORDER_SHIPPED: Final = "order.shipped"
    ORDER_LOGISTICS_UPDATED: Final = "order.logistics-updated"
    ORDER_COMPLETED: Final = "order.completed"
    ORDER_CANCELLED: Final = "order.cancelled"
    ORDER_CLOSED: Final = "order.closed"
    STOCK_RESTOCKED: Final = "stock.restocked"
    STOCK_LOCKED: Final = "stock.locked"
    STOCK_RELEASED: Final = "stock.released"
    STOCK_DEDUCTED: Final = "stock.deducted"
    STOCK_RESTORED: Final = "stock.restored"
    PAYMENT_REJECTED: Final = "payment.rejected"
    REFUND_REQUESTED: Final = "refund.requested"
    REFUND_SUCCEEDED: Final = "refund.succeeded"
    REFUND_FAILED: Final = "refund.failed"
    AFTERSALE_REQUESTED: Final = "aftersale.requested"
    AFTERSALE_APPROVED: Final = "aftersale.approved"
    AFTERSALE_REJECTED: Final = "aftersale.rejected"
    AFTERSALE_COMPLETED: Final = "aftersale.completed"
    COMMAND_REJECTED: Final = "command.rejected"
    ORDER_REMARKED: Final = "order.remarked"  # v1.1


# AMQP headers.
SCHEMA_VERSION_HEADER: Final = "x-schema-version"
PARKING_REASON_HEADER: Final = "x-parking-reason"
PARKING_CODE_HEADER: Final = "x-parking-code"
ORIGINAL_ROUTING_KEY_HEADER: Final = "x-original-routing-key"
ORIGINAL_EXCHANGE_HEADER: Final = "x-original-exchange"
ORIGINAL_QUEUE_HEADER: Final = "x-original-queue"
ATTEMPTS_HEADER: Final = "x-attempts"
LAST_ERROR_HEADER: Final = "x-last-error"
PARKED_AT_HEADER: Final = "x-parked-at"
DROPPED_HEADERS_HEADER: Final = "x-dropped-headers"  # producer headers that could not be republished

SCHEMA_VERSION: Final = 1
MAX_BODY_BYTES: Final = 1024 * 1024
