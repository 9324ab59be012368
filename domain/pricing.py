"""Server-side pricing in integer minor units: payable = goods total + freight - discounts.

Freight rule: a physical order pays FREIGHT_PER_PACKAGE for every package, one package per
(merchant, warehouse); a package whose goods reach FREE_FREIGHT_FROM ships free. Virtual
orders pay no freight. A coupon takes at most the goods total off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from domain.errors import Reason, Refusal

FREIGHT_PER_PACKAGE: Final = 800
FREE_FREIGHT_FROM: Final = 9900

PackageKey = tuple[str, str]  # (merchant_id, warehouse_id)


@dataclass(frozen=True)
class Line:
    """One priced order line, the unit price taken from the SKU snapshot."""

    line_no: int
    sku: str
    name: str
    merchant_id: str
    warehouse_id: str
    unit_price: int
    quantity: int

    @property
    def line_total(self) -> int:
        return self.unit_price * self.quantity

    @property
    def package(self) -> PackageKey:
        return (self.merchant_id, self.warehouse_id)


@dataclass(frozen=True)
class CouponTerms:
    code: str
    user_id: str
    amount: int
    min_spend: int
    expires_at: datetime
    state: str


@dataclass(frozen=True)
class Quote:
    goods_total: int
    freight: int
    discount_total: int
    payable: int
    freight_by_package: dict[PackageKey, int]


@dataclass(frozen=True)
class ChildQuote:
    """One child order of a split: a package with its share of freight and discount."""

    merchant_id: str
    warehouse_id: str
    lines: tuple[Line, ...]
    goods_total: int
    freight: int
    discount_total: int

    @property
    def payable(self) -> int:
        return self.goods_total + self.freight - self.discount_total


def package_freight(goods_subtotal: int, physical: bool) -> int:
    """Freight of one package under the rule above."""
    if not physical or goods_subtotal >= FREE_FREIGHT_FROM:
        return 0
    return FREIGHT_PER_PACKAGE


def packages(lines: Sequence[Line]) -> dict[PackageKey, list[Line]]:
    """Lines grouped by (merchant, warehouse), in first-seen order."""
    grouped: dict[PackageKey, list[Line]] = {}
    for line in lines:
        grouped.setdefault(line.package, []).append(line)
    return grouped


def coupon_discount(coupon: CouponTerms, user_id: str, goods_total: int, now: datetime) -> int:
    """The discount a coupon gives this order, or Refusal(COUPON_INVALID) saying why not."""
    if coupon.user_id != user_id:
        raise Refusal(Reason.COUPON_INVALID, "coupon belongs to another user")
    if coupon.state != "AVAILABLE":
        raise Refusal(Reason.COUPON_INVALID, f"coupon is {coupon.state.lower()}")
    if coupon.expires_at <= now:
        raise Refusal(Reason.COUPON_INVALID, "coupon has expired")
    if goods_total < coupon.min_spend:
        raise Refusal(
            Reason.COUPON_INVALID, f"goods total {goods_total} is below min spend {coupon.min_spend}"
        )
    return min(coupon.amount, goods_total)


def quote(
    lines: Sequence[Line], physical: bool, user_id: str, coupon: CouponTerms | None, now: datetime
) -> Quote:
    """Price an order: goods total, freight per package, coupon discount, payable."""
    goods_total = sum(line.line_total for line in lines)
    freight_by_package = {
        key: package_freight(sum(line.line_total for line in group), physical)
        for key, group in packages(lines).items()
    }
    freight = sum(freight_by_package.values())
    discount = coupon_discount(coupon, user_id, goods_total, now) if coupon else 0
    return Quote(goods_total, freight, discount, goods_total + freight - discount, freight_by_package)


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` in proportion to `weights` by largest remainder; the parts add up exactly."""
    if not weights:
        return []
    weight_sum = sum(weights)
    if weight_sum == 0:
        shares = [0] * len(weights)
        shares[0] = total
        return shares
    floors = [total * w // weight_sum for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for i in remainders[: total - sum(floors)]:
        floors[i] += 1
    return floors


def split(lines: Sequence[Line], order_quote: Quote) -> list[ChildQuote]:
    """Split a paid order into one child per package; children's payables add up to the parent's."""
    groups = list(packages(lines).items())
    subtotals = [sum(line.line_total for line in group) for _, group in groups]
    discounts = allocate(order_quote.discount_total, subtotals)
    return [
        ChildQuote(
            merchant_id=key[0],
            warehouse_id=key[1],
            lines=tuple(group),
            goods_total=subtotal,
            freight=order_quote.freight_by_package.get(key, 0),
            discount_total=discount,
        )
        for (key, group), subtotal, discount in zip(groups, subtotals, discounts, strict=True)
    ]
