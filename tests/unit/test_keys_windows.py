from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from hypothesis import given
from hypothesis import strategies as st

from keel_pdp.budget.keys import KeySpace, enc
from keel_pdp.windows import window_bounds


def _ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: tzinfo = UTC) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)


def test_special_characters_are_encoded_away() -> None:
    for name in ["a:b", "{pdp}", "x*y", "a b", "ü", "%41", "", "a\nb"]:
        e = enc(name)
        assert not set(e) & set(":{}*? \n[]"), e


@given(st.text(max_size=40), st.text(max_size=40))
def test_encoding_is_injective(a: str, b: str) -> None:
    if a != b:
        assert enc(a) != enc(b)


def test_split_values_cannot_collide_across_positions() -> None:
    ks = KeySpace("k")
    assert ks.window("b", ("a:b",), 0) != ks.window("b", ("a", "b"), 0)
    assert ks.window("b", ("a%3Ab",), 0) != ks.window("b", ("a:b",), 0)


def test_window_bounds_utc() -> None:
    now = _ms(2026, 11, 22, 15, 27)
    assert window_bounds("hourly", now) == (_ms(2026, 11, 22, 15), _ms(2026, 11, 22, 16))
    assert window_bounds("daily", now) == (_ms(2026, 11, 22), _ms(2026, 11, 23))
    assert window_bounds("monthly", now) == (_ms(2026, 11, 1), _ms(2026, 12, 1))
    dec = _ms(2026, 12, 31, 23, 59)
    assert window_bounds("monthly", dec) == (_ms(2026, 12, 1), _ms(2027, 1, 1))


def test_window_bounds_in_a_timezone_follow_local_midnight() -> None:
    from zoneinfo import ZoneInfo

    ny = ZoneInfo("America/New_York")
    # 03:00 UTC on Nov 22 is still Nov 21 in New York
    now = _ms(2026, 11, 22, 3, 0)
    start, end = window_bounds("daily", now, "America/New_York")
    assert start == _ms(2026, 11, 21, tz=ny)
    assert end == _ms(2026, 11, 22, tz=ny)
    # The month containing the DST change is still a calendar month.
    start, end = window_bounds("monthly", _ms(2026, 11, 15), "America/New_York")
    assert (start, end) == (_ms(2026, 11, 1, tz=ny), _ms(2026, 12, 1, tz=ny))
