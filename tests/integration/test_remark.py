"""order.remark (contract v1.1) through the broker: order.remarked, kept in the timeline, shown by
`orders show`; an unknown order is answered with order.rejected."""

from __future__ import annotations

import json

from domain.errors import Reason
from domain.names import Cmd, Evt
from testing.broker import EventListener
from testing.builders import one_child_order
from testing.system import System, unique


def test_a_remark_is_announced_and_kept_in_the_timeline(system: System, events: EventListener) -> None:
    # Given a paid order of one merchant
    order, child, merchant, _ = one_child_order(system, events)
    note = unique("ring twice\tthen wait")

    # When the buyer remarks on the parent and the merchant on its child
    buyer = f"user:{order.user_id}"
    system.send(Cmd.ORDER_REMARK, {"order_no": order.parent_no, "author": buyer, "text": note})
    system.send(Cmd.ORDER_REMARK, {"order_no": child, "author": f"merchant:{merchant}", "text": "packed"})

    # Then each is announced with order.remarked and kept in its order's timeline
    assert events.one(Evt.ORDER_REMARKED, order_no=order.parent_no) == {
        "order_no": order.parent_no,
        "author": f"user:{order.user_id}",
        "text": note,
    }
    assert events.one(Evt.ORDER_REMARKED, order_no=child)["author"] == f"merchant:{merchant}"
    line = system.db.one(
        "SELECT actor, detail FROM order_timeline WHERE order_no = %s AND action = 'REMARK'", order.parent_no
    )
    assert line == {"actor": f"user:{order.user_id}", "detail": {"text": note}}
    # And `orders show` prints it
    shown = json.loads(system.orders("show", order.parent_no, "--json").stdout)
    assert {"text": note} in [t["detail"] for t in shown["timeline"] if t["action"] == "REMARK"]


def test_a_remark_on_an_unknown_order_is_rejected(system: System, events: EventListener) -> None:
    order_no = unique("NO-ORDER")

    system.send(Cmd.ORDER_REMARK, {"order_no": order_no, "author": "ops:alice", "text": "hello"})

    assert events.one(Evt.ORDER_REJECTED, order_no=order_no)["reason"] == Reason.UNKNOWN_ORDER
