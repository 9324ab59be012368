"""Queue order.fulfillment: address changes, remarks, shipping, tracking and receipt (by hand or timer)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

from consumers.common import derive_parent
from consumers.events import (
    OrderAddressUpdated,
    OrderCompleted,
    OrderLogisticsUpdated,
    OrderRejected,
    OrderRemarked,
    OrderShipped,
)
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import (
    Command,
    LogisticsUpdate,
    OrderConfirmReceipt,
    OrderRemark,
    OrderShip,
    OrderUpdateAddress,
)
from consumers.timers import TimerKind
from domain.actors import SYSTEM, merchant, user
from domain.errors import Reason, Refusal
from domain.names import FULFILLMENT_QUEUE, Cmd, Timer
from domain.status import ORDER_TRANSITIONS, OrderAction, OrderType, can
from settings import Settings
from store.orders import overdue_receipts
from store.ports import Record, UnitOfWork

LOGISTICS_UPDATE = "LOGISTICS_UPDATE"  # timeline action of a carrier's tracking update
REMARK = "REMARK"  # timeline action of an order.remark


def require_owner(order: Record, user_id: str) -> None:
    """Refusal(NOT_YOUR_ORDER) unless the user placed the order."""
    if order.user_id != user_id:
        raise Refusal(
            Reason.NOT_YOUR_ORDER, f"order {order.order_no} belongs to another user", order_no=order.order_no
        )


def require_shippable_unit(order: Record) -> None:
    """A command that takes a child must not name a parent that was split (nor a virtual order)."""
    if order.order_type == OrderType.VIRTUAL:
        raise Refusal(
            Reason.VIRTUAL_ORDER,
            f"order {order.order_no} is virtual and never ships",
            order_no=order.order_no,
        )
    if order.parent_no is None:
        raise Refusal(
            Reason.INVALID_STATE,
            f"order {order.order_no} is a parent order; name one of its children",
            order_no=order.order_no,
        )


class Fulfillment:
    """The forward flow after payment: ship each child, track it, and complete it on receipt."""

    def __init__(self, settings: Settings) -> None:
        self.auto_confirm_after: timedelta = settings.auto_confirm_receipt_after

    # -- order.update-address -----------------------------------------------------------------

    def update_address(self, cmd: OrderUpdateAddress, uow: UnitOfWork) -> None:
        """Change the receiver of a parent and its children while none of them has shipped."""
        orders = uow.orders
        found = orders.require(cmd.order_no, lock=False)
        require_owner(found, cmd.user_id)
        if found.parent_no is not None:
            raise Refusal(
                Reason.INVALID_STATE,
                f"order {found.order_no} is a child; change the address on its parent {found.parent_no}",
                order_no=found.order_no,
            )
        # Lock children before the parent: the same order as ship/confirm (child, then parent).
        children = orders.children(cmd.order_no, lock=True)
        parent = orders.require(cmd.order_no)
        shipped = [c.order_no for c in children if c.shipped_at is not None]
        if shipped or parent.shipped_at is not None:
            raise Refusal(
                Reason.ALREADY_SHIPPED,
                f"already shipped: {', '.join(shipped) or parent.order_no}",
                order_no=parent.order_no,
            )
        if not can(ORDER_TRANSITIONS, parent.status, OrderAction.UPDATE_ADDRESS):
            raise Refusal(
                Reason.INVALID_STATE, f"order {parent.order_no} is {parent.status}", order_no=parent.order_no
            )
        receiver = cmd.receiver.model_dump()
        actor = user(cmd.user_id)
        orders.update(parent, receiver=receiver)
        uow.record(
            parent.order_no,
            OrderAction.UPDATE_ADDRESS.value,
            parent.status,
            parent.status,
            actor,
            {"receiver": receiver, "previous": parent.receiver},
        )
        updated = [parent.order_no]
        for child in children:
            if can(ORDER_TRANSITIONS, child.status, OrderAction.UPDATE_ADDRESS):
                orders.update(child, receiver=receiver)
                uow.record(
                    child.order_no,
                    OrderAction.UPDATE_ADDRESS.value,
                    child.status,
                    child.status,
                    actor,
                    {"receiver": receiver},
                )
                updated.append(child.order_no)
        uow.emit(
            OrderAddressUpdated(
                order_no=parent.order_no,
                user_id=parent.user_id,
                status=parent.status,
                receiver=receiver,
                orders=updated,
            )
        )

    # -- order.ship ---------------------------------------------------------------------------

    def ship(self, cmd: OrderShip, uow: UnitOfWork) -> None:
        """A paid child leaves the warehouse: SHIPPED, its auto-confirm timer starts."""
        order = uow.orders.require(cmd.order_no)
        require_shippable_unit(order)
        if uow.aftersales.load_cancellation(order.order_no, lock=False) is not None:
            raise Refusal(
                Reason.INVALID_STATE,
                f"order {order.order_no} is being cancelled by its merchant",
                order_no=order.order_no,
            )
        # The user cancelled the paid order and its refund is under way: nothing may ship now.
        cancelling = [
            r
            for r in uow.refunds.open_for([order.parent_no or order.order_no])
            if r.source == Reason.USER_CANCEL
        ]
        if cancelling:
            raise Refusal(
                Reason.INVALID_STATE,
                f"order {order.parent_no or order.order_no} is being cancelled by its user "
                f"(refund {cancelling[0].refund_no})",
                order_no=order.order_no,
            )
        status = uow.orders.transition(
            order,
            OrderAction.SHIP,
            merchant(order.merchant_id),
            {"carrier": cmd.carrier, "tracking_no": cmd.tracking_no},
            carrier=cmd.carrier,
            tracking_no=cmd.tracking_no,
            shipped_at=uow.now,
        )
        uow.emit(
            OrderShipped(
                order_no=order.order_no,
                parent_no=order.parent_no,
                user_id=order.user_id,
                merchant_id=order.merchant_id,
                status=status,
                carrier=cmd.carrier,
                tracking_no=cmd.tracking_no,
                shipped_at=uow.now.isoformat(),
                auto_confirm_at=(uow.now + self.auto_confirm_after).isoformat(),
            )
        )
        derive_parent(uow, order.parent_no, SYSTEM)
        uow.start_timer(Timer.AUTO_CONFIRM, order.order_no, self.auto_confirm_after)

    # -- logistics.update ---------------------------------------------------------------------

    def logistics(self, cmd: LogisticsUpdate, uow: UnitOfWork) -> None:
        """Keep a carrier update in the timeline; only a newer one replaces the current status."""
        order = uow.orders.require(cmd.order_no)
        require_shippable_unit(order)
        if order.shipped_at is None:
            raise Refusal(
                Reason.INVALID_STATE, f"order {order.order_no} has not shipped", order_no=order.order_no
            )
        if cmd.tracking_no != order.tracking_no:
            raise Refusal(
                Reason.INVALID_STATE,
                f"tracking number {cmd.tracking_no} is not {order.order_no}'s ({order.tracking_no})",
                order_no=order.order_no,
            )
        at = cmd.at.isoformat()
        if uow.orders.timeline_has(
            order.order_no, LOGISTICS_UPDATE, tracking_no=cmd.tracking_no, status=cmd.status, at=at
        ):
            return  # an exact repeat of an update already kept: nothing new to say
        current = order.logistics_at is None or cmd.at >= order.logistics_at
        uow.record(
            order.order_no,
            LOGISTICS_UPDATE,
            order.status,
            order.status,
            f"carrier:{order.carrier}",
            {
                "tracking_no": cmd.tracking_no,
                "status": cmd.status,
                "at": at,
                "detail": cmd.detail,
                "current": current,
            },
        )
        if current:
            uow.orders.update(order, logistics_status=cmd.status, logistics_at=cmd.at)
        uow.emit(
            OrderLogisticsUpdated(
                order_no=order.order_no,
                status=order.status,
                tracking_no=cmd.tracking_no,
                logistics_status=cmd.status,
                at=at,
                detail=cmd.detail,
                current=current,
                current_logistics_status=cmd.status if current else order.logistics_status,
            )
        )

    # -- order.remark (v1.1) --------------------------------------------------------------------

    def remark(self, cmd: OrderRemark, uow: UnitOfWork) -> None:
        """A note on an order, kept in its timeline: by its buyer, by a merchant whose goods it
        holds, or by an operator (`ops:`). The order itself does not change."""
        order = uow.orders.require(cmd.order_no, lock=False)
        kind, _, who = cmd.author.partition(":")
        if kind == "user":
            require_owner(order, who)
        elif kind == "merchant" and who not in {item.merchant_id for item in uow.orders.items(order)}:
            raise Refusal(
                Reason.MERCHANT_MISMATCH,
                f"order {order.order_no} holds no goods of merchant {who}",
                order_no=order.order_no,
            )
        uow.record(order.order_no, REMARK, order.status, order.status, cmd.author, {"text": cmd.text})
        uow.emit(OrderRemarked(order_no=order.order_no, author=cmd.author, text=cmd.text))

    # -- order.confirm-receipt and the auto-confirm timer --------------------------------------

    def confirm_receipt(self, cmd: OrderConfirmReceipt, uow: UnitOfWork) -> None:
        """The user confirms receipt of a shipped child: COMPLETED."""
        order = uow.orders.require(cmd.order_no)
        require_owner(order, cmd.user_id)
        require_shippable_unit(order)
        self._complete(uow, order, user(cmd.user_id), auto=False)

    def auto_confirm(self, uow: UnitOfWork, order_no: str) -> None:
        """Timer AUTO_CONFIRM: complete the child if it is still shipped and unconfirmed."""
        order = uow.orders.load(order_no)
        if order is None or not can(ORDER_TRANSITIONS, order.status, OrderAction.CONFIRM_RECEIPT):
            return  # confirmed, closed or unknown: the timer has nothing left to do
        if order.shipped_at is None or order.shipped_at + self.auto_confirm_after > uow.now:
            return  # a timer before the stored deadline (forged or misrouted) changes nothing
        self._complete(uow, order, SYSTEM, auto=True)

    def _complete(self, uow: UnitOfWork, order: Record, actor: str, auto: bool) -> None:
        status = uow.orders.transition(
            order, OrderAction.CONFIRM_RECEIPT, actor, {"auto": auto}, completed_at=uow.now
        )
        uow.emit(
            OrderCompleted(
                order_no=order.order_no,
                parent_no=order.parent_no,
                user_id=order.user_id,
                status=status,
                completed_at=uow.now.isoformat(),
                auto_confirmed=auto,
            )
        )
        derive_parent(uow, order.parent_no, SYSTEM)


def announce_refusal(cmd: Command, refusal: Refusal, uow: UnitOfWork) -> None:
    """order.rejected for a refused fulfillment command (with the order's user when known)."""
    order_no = refusal.fields.get("order_no") or getattr(cmd, "order_no", None)
    subject = uow.orders.refusal_subject(str(order_no) if order_no else None)
    sender = getattr(cmd, "user_id", None)
    if sender is not None and sender != subject["user_id"]:
        # Answer the sender; never hand them another user's identifiers.
        subject.update(user_id=sender, request_id=None)
    fields: dict[str, Any] = {
        **subject,
        "reason": refusal.reason,
        "detail": refusal.detail,
        "command": uow.envelope.routing_key,
        **{k: v for k, v in refusal.fields.items() if k != "order_no"},
    }
    uow.emit(OrderRejected(**fields))


def spec(settings: Settings) -> ConsumerSpec:
    fulfillment = Fulfillment(settings)
    routes: dict[str, Route[Any]] = {
        Cmd.ORDER_UPDATE_ADDRESS: Route(OrderUpdateAddress, fulfillment.update_address, announce_refusal),
        Cmd.ORDER_SHIP: Route(OrderShip, fulfillment.ship, announce_refusal),
        Cmd.LOGISTICS_UPDATE: Route(LogisticsUpdate, fulfillment.logistics, announce_refusal),
        Cmd.ORDER_CONFIRM_RECEIPT: Route(OrderConfirmReceipt, fulfillment.confirm_receipt, announce_refusal),
        Cmd.ORDER_REMARK: Route(OrderRemark, fulfillment.remark, announce_refusal),
    }
    return ConsumerSpec(FULFILLMENT_QUEUE, routes)  # bound from order.commands by its routes' keys


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """The timers this module's flows start."""
    fulfillment = Fulfillment(settings)
    overdue = partial(overdue_receipts, auto_confirm_after=fulfillment.auto_confirm_after)
    return [
        TimerKind(Timer.AUTO_CONFIRM, fulfillment.auto_confirm, overdue, delay=fulfillment.auto_confirm_after)
    ]
