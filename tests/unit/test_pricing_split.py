"""Splitting a paid order into child orders: the children always add up to the parent, exactly."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.pricing import (
    FREE_FREIGHT_FROM,
    FREIGHT_PER_PACKAGE,
    CouponTerms,
    Line,
    allocate,
    quote,
    split,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
USER = "user-1"


def line(line_no: int, merchant: str, warehouse: str, price: int, quantity: int) -> Line:
    return Line(line_no, f"sku-{line_no}", f"Item {line_no}", merchant, warehouse, price, quantity)


def coupon(amount: int, min_spend: int = 0) -> CouponTerms:
    return CouponTerms("C1", USER, amount, min_spend, datetime(2099, 1, 1, tzinfo=UTC), "AVAILABLE")


lines_strategy = st.lists(
    st.tuples(
        st.sampled_from(["M1", "M2", "M3"]),
        st.sampled_from(["W1", "W2"]),
        st.integers(min_value=0, max_value=50_000),
        st.integers(min_value=1, max_value=20),
    ),
    min_size=1,
    max_size=12,
).map(lambda specs: [line(i, *spec) for i, spec in enumerate(specs, start=1)])


def test_two_packages_share_the_discount_by_goods() -> None:
    # Given an order of two packages, 30.00 and 10.00 of goods, and a 4.00 coupon
    lines = [line(1, "M1", "W1", 1000, 3), line(2, "M2", "W2", 1000, 1)]
    order = quote(lines, True, USER, coupon(400), NOW)
    # When it is split
    children = split(lines, order)
    # Then each package pays its own freight and a share of the discount in proportion to its goods
    assert [(c.merchant_id, c.goods_total, c.freight, c.discount_total) for c in children] == [
        ("M1", 3000, FREIGHT_PER_PACKAGE, 300),
        ("M2", 1000, FREIGHT_PER_PACKAGE, 100),
    ]
    assert sum(c.payable for c in children) == order.payable == 4000 + 2 * FREIGHT_PER_PACKAGE - 400


def test_a_package_over_the_free_freight_line_ships_free() -> None:
    # Given one package over the free-freight line and one below it
    lines = [line(1, "M1", "W1", FREE_FREIGHT_FROM, 1), line(2, "M1", "W2", 100, 1)]
    # When the order is priced and split
    children = split(lines, quote(lines, True, USER, None, NOW))
    # Then only the small package pays freight
    assert [c.freight for c in children] == [0, FREIGHT_PER_PACKAGE]


def test_an_indivisible_discount_is_given_out_to_the_cent() -> None:
    # Given three equal packages and a discount of 1.00 that does not divide by three
    lines = [line(i, f"M{i}", "W1", 500, 1) for i in (1, 2, 3)]
    order = quote(lines, True, USER, coupon(100), NOW)
    # When it is split
    children = split(lines, order)
    # Then the odd cent goes to one child and nothing is lost
    assert sorted(c.discount_total for c in children) == [33, 33, 34]
    assert sum(c.payable for c in children) == order.payable


@settings(max_examples=500, deadline=None)
@given(
    lines=lines_strategy, coupon_amount=st.integers(min_value=0, max_value=200_000), physical=st.booleans()
)
def test_children_always_add_up_to_the_parent(lines: list[Line], coupon_amount: int, physical: bool) -> None:
    # Given any order, with or without a coupon
    order = quote(lines, physical, USER, coupon(coupon_amount) if coupon_amount else None, NOW)
    # When it is split
    children = split(lines, order)
    # Then there is one child per (merchant, warehouse), holding every line exactly once
    assert len(children) == len({(ln.merchant_id, ln.warehouse_id) for ln in lines})
    assert sorted(ln.line_no for c in children for ln in c.lines) == [ln.line_no for ln in lines]
    assert all(ln.package == (c.merchant_id, c.warehouse_id) for c in children for ln in c.lines)
    # And goods, freight, discount and payable add up exactly to the parent's
    assert sum(c.goods_total for c in children) == order.goods_total
    assert sum(c.freight for c in children) == order.freight
    assert sum(c.discount_total for c in children) == order.discount_total
    assert sum(c.payable for c in children) == order.payable
    # And no child is discounted below zero
    assert all(0 <= c.discount_total <= c.goods_total for c in children)
    assert all(c.payable >= 0 for c in children)


@settings(max_examples=1000, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=10**12),
    weights=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=30),
)
def test_allocate_parts_add_up_and_stay_proportional(total: int, weights: list[int]) -> None:
    # When any total is shared by any weights
    parts = allocate(total, weights)
    # Then the parts add up exactly, none is negative
    assert len(parts) == len(weights)
    assert sum(parts) == total
    assert all(p >= 0 for p in parts)
    # And each part is its proportional share rounded down or up (largest remainder)
    weight_sum = sum(weights)
    if weight_sum:
        for part, weight in zip(parts, weights, strict=True):
            exact_floor = total * weight // weight_sum
            assert exact_floor <= part <= exact_floor + 1
            if weight == 0:
                assert part == 0


def test_allocate_with_no_weight_gives_everything_to_the_first() -> None:
    # Given weights that are all zero (packages of free goods)
    # When a freight is shared
    # Then the first part carries it, so it still adds up
    assert allocate(800, [0, 0, 0]) == [800, 0, 0]
    assert allocate(5, []) == []
