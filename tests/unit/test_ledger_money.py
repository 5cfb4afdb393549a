"""Money formatting, periods, the cost split of the FOCUS export, entry id ranges
and the cost-center mapping."""

from __future__ import annotations

import pathlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel_pdp.ledger.export import id_ranges, parse_id_ranges, split_micros
from keel_pdp.ledger.mapping import CostMapping, MappingError
from keel_pdp.ledger.money import parse_usd, ratio_percent, usd, usd_from_pico
from keel_pdp.ledger.periods import (
    PeriodError,
    bounds_ms,
    iso_utc,
    next_period,
    period_of_ms,
    permit_issued_ms,
    previous_period,
)


def test_usd_formats_integer_micros_exactly() -> None:
    assert usd(0) == "0.000000"
    assert usd(1) == "0.000001"
    assert usd(-1_500_000) == "-1.500000"
    assert usd(10**15 + 7) == "1000000000.000007"
    assert usd_from_pico(75_000) == "0.000000075"
    assert usd_from_pico(120_000_000) == "0.00012"
    assert usd_from_pico(0) == "0"
    assert ratio_percent(1, 3) == "33.3" and ratio_percent(5, 0) == ""


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_usd_round_trips(micros: int) -> None:
    assert parse_usd(usd(micros)) == micros
    assert Decimal(usd(micros)) * 1_000_000 == micros


def test_parse_usd_refuses_sub_micro_amounts() -> None:
    with pytest.raises(ValueError, match="6 fractional"):
        parse_usd("0.0000001")
    with pytest.raises(ValueError, match="not a decimal"):
        parse_usd("ten")


def test_periods_are_utc_months() -> None:
    start, end = bounds_ms("2026-12")
    assert iso_utc(start) == "2026-12-01T00:00:00Z" and iso_utc(end) == "2027-01-01T00:00:00Z"
    assert next_period("2026-12") == "2027-01" and previous_period("2027-01") == "2026-12"
    assert period_of_ms(end - 1) == "2026-12" and period_of_ms(end) == "2027-01"
    assert permit_issued_ms("pmt_" + f"{start:012x}" + "ab" * 8) == start
    assert permit_issued_ms("grt_whatever") is None
    for bad in ("2026-13", "2026-1", "26-01", ""):
        with pytest.raises(PeriodError):
            bounds_ms(bad)


@given(st.integers(min_value=0, max_value=10**12),
       st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=4))
def test_split_micros_is_exact_and_proportional(total: int, weights: list[int]) -> None:
    parts = split_micros(total, weights)
    assert sum(parts) == total and len(parts) == len(weights)
    whole = sum(weights)
    if whole:
        for p, w in zip(parts, weights, strict=True):
            # Each part is within one micro of its exact share.
            assert abs(p * whole - total * w) < whole


def test_split_micros_largest_remainder() -> None:
    assert split_micros(777, [16, 1, 24]) == [303, 19, 455]
    assert split_micros(5, [0, 0]) == [5, 0]


@given(st.sets(st.integers(min_value=1, max_value=500)))
def test_id_ranges_round_trip(ids: set[int]) -> None:
    text = id_ranges(ids)
    assert parse_id_ranges(text) == sorted(ids)


def test_id_ranges_compress_runs() -> None:
    assert id_ranges([3, 1, 2, 7, 9, 10]) == "1-3;7;9-10"


def test_mapping_allocates_workload_then_tenant_then_default(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("tenants:\n  acme: {cost_center: CC-1, business_unit: Retail}\n"
                    "workloads:\n  acme/bot: {cost_center: CC-2}\n")
    m = CostMapping.load(path)
    assert m.allocate("acme", "chat").cost_center == "CC-1"
    assert m.allocate("acme", "bot").cost_center == "CC-2"
    assert m.allocate("acme", "bot").business_unit == "unallocated"
    assert m.allocate("globex", "chat").cost_center == "unallocated"
    path.write_text("tenants:\n  acme: {cost_centre: CC-1}\n")
    with pytest.raises(MappingError, match=r"m.yaml: tenants.acme"):
        CostMapping.load(path)
