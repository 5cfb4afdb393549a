from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel_pdp.pricing import (
    Price,
    PriceError,
    TokenUsage,
    estimate_cost_micros,
    max_output_tokens_within,
    parse_price,
    usage_cost_micros,
)


def test_price_string_becomes_exact_pico_per_token() -> None:
    assert parse_price("2.50") == 2_500_000
    assert parse_price("0.075") == 75_000
    assert parse_price("0.000001") == 1


@pytest.mark.parametrize("bad", ["abc", "-1", "0.0000001", "NaN", "1001"])
def test_unrepresentable_prices_are_rejected(bad: str) -> None:
    with pytest.raises(PriceError):
        parse_price(bad)


def test_float_price_is_rejected() -> None:
    with pytest.raises(PriceError, match="decimal string"):
        parse_price(2.5)  # type: ignore[arg-type]


def test_estimate_rounds_up_once() -> None:
    p = Price(input=150_000, cached_input=75_000, cache_write=150_000, output=600_000)
    # 7 * 0.15 + 3 * 0.6 = 2.85 micro-USD -> 3
    assert estimate_cost_micros(p, 7, 3) == 3
    assert estimate_cost_micros(p, 1200, 500) == 480


def test_cached_and_cache_write_tokens_are_priced_at_their_own_rates() -> None:
    p = Price(input=3_000_000, cached_input=300_000, cache_write=3_750_000, output=15_000_000)
    u = TokenUsage(input_tokens=10_000, cached_input_tokens=6_000, cache_write_tokens=2_000,
                   output_tokens=1_000)
    # fresh 2000*3 + cached 6000*0.3 + write 2000*3.75 + out 1000*15
    assert usage_cost_micros(p, u) == 6_000 + 1_800 + 7_500 + 15_000


def test_usage_that_contradicts_the_convention_is_reported() -> None:
    u = TokenUsage(input_tokens=10, cached_input_tokens=20, output_tokens=5, reasoning_tokens=9)
    problems = u.problems()
    assert any("cached_input_tokens" in p for p in problems)
    assert any("reasoning_tokens" in p for p in problems)


@given(st.integers(0, 1_000_000_000), st.integers(0, 2_000_000), st.integers(1, 1_000_000_000),
       st.integers(0, 10**9))
def test_max_output_tokens_within_is_the_largest_that_fits(
        pin: int, tokens: int, pout: int, headroom: int) -> None:
    p = Price(pin, pin, pin, pout)
    k = max_output_tokens_within(p, tokens, headroom)
    if k < 0:
        assert estimate_cost_micros(p, tokens, 0) > headroom
    else:
        assert estimate_cost_micros(p, tokens, k) <= headroom
        assert estimate_cost_micros(p, tokens, k + 1) > headroom


def test_format_usd_is_exact_and_never_goes_through_float() -> None:
    from keel_pdp.pricing import format_usd

    assert format_usd(20_000_000_000) == "$20,000.00"
    assert format_usd(450) == "$0.000450"
    assert format_usd(10**15 + 1) == "$1,000,000,000.000001"  # float would lose the last micro
