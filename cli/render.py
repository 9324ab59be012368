"""Rich tables of the `orders` command (the --json output is built from the same dicts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.format import age, compact, money, to_json, transition, when
from cli.views import MONEY_COLUMNS, REFUND_COLUMNS, TIME_COLUMNS

PASS, FAIL = "[green]PASS[/green]", "[red]FAIL[/red]"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping | list):
        return to_json(value)
    if hasattr(value, "isoformat"):
        return when(value)
    return str(value)


def key_values(title: str, pairs: Iterable[tuple[str, Any]]) -> Table:
    """A two-column table of the non-empty pairs."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in pairs:
        if value not in (None, "", [], {}):
            table.add_row(key, value if isinstance(value, Text) else _cell(value))
    return table


def rows_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Table:
    """A table of dict rows (columns: the given ones, or the first row's keys)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table


def _receiver(receiver: Mapping[str, Any] | None) -> str:
    if not receiver:
        return ""
    return " / ".join(str(receiver.get(k, "")) for k in ("name", "phone", "address") if receiver.get(k))


def _items_brief(items: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{i['sku']} x{i['quantity']}" for i in items)


def order(view: Mapping[str, Any]) -> RenderableType:
    """The whole order: summary, money, times, items, children, payments, refunds, after-sales, timeline."""
    parts: list[RenderableType] = [
        key_values(
            f"Order {view['order_no']}",
            [
                ("status", Text(view["status"], style="bold")),
                ("type", view["order_type"]),
                ("parent", view["parent_no"]),
                ("user", view["user_id"]),
                ("request", view["request_id"]),
                ("merchant", view["merchant_id"]),
                ("warehouse", view["warehouse_id"]),
                ("coupon", view["coupon_code"]),
                ("payment", view["payment_no"]),
                ("receiver", _receiver(view["receiver"])),
                ("carrier / tracking", " / ".join(x for x in (view["carrier"], view["tracking_no"]) if x)),
                (
                    "logistics",
                    " ".join(x for x in (view["logistics_status"], when(view["logistics_at"])) if x),
                ),
            ],
        ),
        key_values("Money", [(c, money(view[c])) for c in MONEY_COLUMNS]),
        key_values("Times (UTC)", [(c, when(view[c])) for c in TIME_COLUMNS]),
    ]
    items = Table(title="Items", title_justify="left")
    for column in ("line", "sku", "name", "merchant", "warehouse", "unit price", "qty", "total", "child"):
        items.add_column(column, justify="right" if column in ("unit price", "qty", "total") else "left")
    for i in view["items"]:
        items.add_row(
            str(i["line_no"]),
            i["sku"],
            i["name"],
            i["merchant_id"],
            i["warehouse_id"],
            money(i["unit_price"]),
            str(i["quantity"]),
            money(i["line_total"]),
            i["child_order_no"] or "",
        )
    parts.append(items)
    if view["children"]:
        children = Table(title="Children", title_justify="left")
        for column in (
            "order_no",
            "status",
            "merchant",
            "warehouse",
            "payable",
            "paid",
            "refunded",
            "items",
            "carrier / tracking",
            "logistics",
        ):
            children.add_column(column)
        for c in view["children"]:
            children.add_row(
                c["order_no"],
                c["status"],
                c["merchant_id"] or "",
                c["warehouse_id"] or "",
                money(c["payable"]),
                money(c["paid_amount"]),
                money(c["refunded_amount"]),
                _items_brief(c["items"]),
                " / ".join(x for x in (c["carrier"], c["tracking_no"]) if x),
                c["logistics_status"] or "",
            )
        parts.append(children)
    for title, key, columns in (
        ("Payments", "payments", ("payment_no", "order_no", "method", "amount", "outcome", "paid_at")),
        (
            "Refunds",
            "refunds",
            ("refund_no", "order_no", "source", "source_ref", "amount", "status", "attempts"),
        ),
        ("After-sales", "aftersales", ("aftersale_no", "order_no", "kind", "amount", "status", "refund_no")),
    ):
        if view[key]:
            rows = [{**r, "amount": money(r["amount"])} for r in view[key]]
            parts.append(rows_table(title, rows, columns))
    parts.append(timeline(view["timeline"]))
    return Group(*parts)


def refunds(rows: Sequence[Mapping[str, Any]]) -> Table:
    shown = [{**r, "amount": money(r["amount"])} for r in rows]
    return rows_table(f"Refunds ({len(rows)})", shown, REFUND_COLUMNS)


def timeline(entries: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Timeline", title_justify="left")
    for column in ("at (UTC)", "order_no", "actor", "action", "from -> to", "detail"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            when(e["at"]),
            e["order_no"],
            e["actor"],
            e["action"],
            transition(e["from_status"], e["to_status"]),
            compact(e["detail"]),
        )
    return table


def stock(view: Mapping[str, Any]) -> RenderableType:
    summary = key_values(
        f"SKU {view['sku']}",
        [
            ("name", view["name"]),
            ("available", str(view["available"])),
            ("locked", str(view["locked"])),
            ("sold", str(view["sold"])),
            ("sales count", str(view["sales_count"])),
            ("restocked total", str(view["restocked_total"])),
        ],
    )
    return Group(summary, rows_table("Warehouses", view["warehouses"]))


def parked(entries: Sequence[Mapping[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("message_id", "routing key", "code", "reason", "attempts", "age", "queue"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(
            e["message_id"] or "(none)",
            e["routing_key"],
            e["code"] or "",
            e["reason"] or "",
            str(e["attempts"]),
            age(e["age_seconds"]),
            e["queue"] or "",
        )
    return table


def checks(results: Sequence[Mapping[str, Any]]) -> RenderableType:
    summary = Table(title="Invariants", title_justify="left")
    for column in ("check", "invariant", "result", "offending", "what it verifies"):
        summary.add_column(column)
    for r in results:
        summary.add_row(
            r["name"], r["invariant"], PASS if r["ok"] else FAIL, str(len(r["offending"])), r["description"]
        )
    parts: list[RenderableType] = [summary]
    for r in results:
        if not r["ok"]:
            parts.append(rows_table(f"{r['invariant']} {r['name']}: offending rows", r["offending"]))
    return Group(*parts)


def health(components: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Health", title_justify="left")
    for column in ("component", "status", "detail"):
        table.add_column(column)
    for c in components:
        table.add_row(c["name"], "[green]ok[/green]" if c["ok"] else "[red]UNHEALTHY[/red]", c["detail"])
    return table


def report(data: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    for kind in ("parents", "children"):
        rows = [
            {**r, **{c: money(r[c]) for c in ("payable", "paid_amount", "refunded_amount")}}
            for r in data["orders"][kind]
        ]
        parts.append(
            rows_table(
                f"Orders placed since {when(data['since'])} ({kind}) by status",
                rows,
                ("status", "orders", "payable", "paid_amount", "refunded_amount"),
            )
        )
    parts.append(
        rows_table(
            "Payments by outcome",
            [{**r, "amount": money(r["amount"])} for r in data["payments"]],
            ("outcome", "payments", "amount"),
        )
    )
    parts.append(
        rows_table(
            "Refunds by source and status",
            [{**r, "amount": money(r["amount"])} for r in data["refunds"]],
            ("source", "status", "refunds", "amount"),
        )
    )
    parts.append(
        key_values(
            "Cancellations and closures",
            [(k, money(v) if k.endswith("amount") else str(v)) for k, v in data["cancellations"].items()],
        )
    )
    parts.append(
        rows_table(
            "Reconciliation",
            [
                {
                    "check": r["check"],
                    "left": money(r["left"]),
                    "right": money(r["right"]),
                    "difference": money(r["difference"]),
                    "result": PASS if r["difference"] == 0 else FAIL,
                }
                for r in data["reconciliation"]
            ],
        )
    )
    return Group(*parts)
