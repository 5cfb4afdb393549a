"""Budget windows across DST changes, month ends and leap days, against an oracle
that never converts local time to UTC: it walks whole UTC hours and asks only
which local date (or month) each one falls in.

Whole-hour zones only (valid_timezone), so every window starts on a UTC hour.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel_pdp.windows import window_bounds

HOUR = 3_600_000
ZONES = ["UTC", "America/New_York", "Europe/London", "Australia/Sydney", "Asia/Tokyo",
         "America/Santiago", "America/Havana", "Atlantic/Azores", "Asia/Beirut"]


def _local(ms: int, zone: str) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(zone))


def _oracle(kind: str, ms: int, zone: str) -> tuple[int, int]:
    if kind == "hourly":
        return ms - ms % HOUR, ms - ms % HOUR + HOUR

    def label(h: int) -> tuple[int, ...]:
        d = _local(h, zone)
        return (d.year, d.month, d.day) if kind == "daily" else (d.year, d.month)

    here = label(ms)
    start = ms - ms % HOUR
    while label(start - HOUR) == here:
        start -= HOUR
    end = ms - ms % HOUR + HOUR
    while label(end) == here:
        end += HOUR
    return start, end


def _utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, us, tzinfo=UTC).timestamp() * 1000)


# Both passes of each repeated hour, the hour after each skipped one, and the
# last instant of a day, a month and a leap day.
CASES = [
    ("America/New_York", _utc(2030, 11, 3, 5, 30)),   # 01:30 EDT
    ("America/New_York", _utc(2030, 11, 3, 6, 30)),   # 01:30 EST, the second pass
    ("America/New_York", _utc(2030, 3, 10, 7, 0)),    # 03:00 EDT, 02:00 never happened
    ("America/Havana", _utc(2030, 11, 3, 4, 30)),     # 00:30 CDT: midnight happens twice
    ("America/Havana", _utc(2030, 11, 3, 5, 30)),     # 00:30 CST, the second pass
    ("America/Havana", _utc(2026, 11, 1, 5, 30)),     # ... on the first of a month
    ("Atlantic/Azores", _utc(2030, 10, 27, 1, 30)),   # 00:30 -01, the second midnight
    ("America/Santiago", _utc(2030, 9, 8, 4, 30)),    # 01:30 -03, 00:00 never happened
    ("America/Santiago", _utc(2030, 4, 7, 2, 30)),    # 23:30 -03, then 23:xx again
    ("America/Santiago", _utc(2030, 4, 7, 3, 30)),    # 23:30 -04
    ("UTC", _utc(2028, 2, 29, 23, 59, 59, 900_000)),  # leap day, last 100 ms
    ("UTC", _utc(2030, 12, 31, 23, 59, 59, 900_000)),
    ("Australia/Sydney", _utc(2030, 4, 6, 15, 30)),   # 02:30 AEDT, repeated
    ("Australia/Sydney", _utc(2030, 4, 6, 16, 30)),   # 02:30 AEST
]


@pytest.mark.parametrize("kind", ["hourly", "daily", "monthly"])
@pytest.mark.parametrize(("zone", "ms"), CASES)
def test_windows_at_dst_changes_month_ends_and_leap_days(kind: str, zone: str, ms: int) -> None:
    assert window_bounds(kind, ms, zone) == _oracle(kind, ms, zone)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ZONES), st.sampled_from(["hourly", "daily", "monthly"]),
       st.integers(_utc(2026, 1, 1), _utc(2035, 1, 1)))
def test_every_instant_falls_in_its_local_calendar_window(zone: str, kind: str, ms: int) -> None:
    assert window_bounds(kind, ms, zone) == _oracle(kind, ms, zone)  # type: ignore[arg-type]
