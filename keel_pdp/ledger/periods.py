"""Accounting periods: calendar months in UTC, named ``YYYY-MM``.

A permit belongs to the period in which it was issued. The permit id encodes
its issue time (``pmt_`` + 12 hex digits of epoch milliseconds), so every event
of a permit can be attributed to its period without looking anything up, even
when the events arrive out of order.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta
from typing import Literal

from keel_pdp.errors import PeriodError as PeriodError

PeriodState = Literal["open", "closing", "closed"]
STATES: tuple[PeriodState, ...] = ("open", "closing", "closed")
# ASCII digits only and nothing after the month: ``\d`` also matches other
# scripts' digits and ``$`` a trailing newline, and either would name a period
# (2026-03 in full-width digits, or followed by a newline) that no report or
# export of 2026-03 reads.
_PERIOD_RE = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
_PID_RE = re.compile(r"^pmt_([0-9a-f]{12})[0-9a-f]{16}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)




def parse_period(text: str) -> tuple[int, int]:
    m = _PERIOD_RE.fullmatch(text)
    if m is None or m.group(1) == "0000":
        raise PeriodError(f"period {text!r} must be YYYY-MM (0001-01 to 9999-12)")
    return int(m.group(1)), int(m.group(2))


def check_period(text: str) -> str:
    parse_period(text)
    return text


def to_datetime(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def to_ms(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def period_of_ms(ms: int) -> str:
    dt = to_datetime(ms)
    return f"{dt.year:04d}-{dt.month:02d}"


def bounds_ms(period: str) -> tuple[int, int]:
    """[start, end) of ``period`` in epoch milliseconds."""
    year, month = parse_period(period)
    start = to_ms(datetime(year, month, 1, tzinfo=UTC))
    # Counted in days, not as the next month's first day: 9999-12 has an end too.
    return start, start + calendar.monthrange(year, month)[1] * 86_400_000


def next_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def previous_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def permit_issued_ms(permit_id: str) -> int | None:
    m = _PID_RE.match(permit_id)
    return int(m.group(1), 16) if m else None


def pid_bound(ms: int) -> str:
    """The smallest permit id issued at ``ms`` (permit ids sort by issue time)."""
    return f"pmt_{ms:012x}"


def iso_utc(ms: int) -> str:
    """FOCUS date/time format: YYYY-MM-DDTHH:mm:ssZ (UTC)."""
    return to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_start_ms(ms: int) -> int:
    return ms - ms % 86_400_000
