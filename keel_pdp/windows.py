"""Calendar budget windows (hourly, daily, monthly) in a budget's timezone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

WindowKind = Literal["hourly", "daily", "monthly"]


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@lru_cache(maxsize=4096)
def _bounds_cached(kind: WindowKind, tz: str, bucket: int) -> tuple[int, int]:
    # bucket is the hour (epoch ms // 3.6e6): windows never start inside an hour
    # for the zones we accept, so all instants in one hour share a window.
    if kind == "hourly":
        # Offsets are whole hours, so a local hour is a UTC hour. Local wall-clock
        # arithmetic would not do: the first pass of a repeated (fall-back) hour
        # plus one hour lands after the second pass, and the two windows overlap.
        return bucket * 3_600_000, (bucket + 1) * 3_600_000
    now = datetime.fromtimestamp(bucket * 3600, tz=_zone(tz))
    if kind == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=1, hours=3)).replace(hour=0)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1, hour=0)
    # Re-localise so DST changes inside the window give the right UTC instants.
    # fold=0: where local midnight happens twice (America/Havana, Atlantic/Azores
    # fall back to 00:00) the day begins at its first pass, whichever pass ``now``
    # is in (else the second pass would open a second window with a fresh cap).
    zone = _zone(tz)
    start = start.replace(tzinfo=None).replace(tzinfo=zone, fold=0)
    end = end.replace(tzinfo=None).replace(tzinfo=zone, fold=0)
    return _ms(start.astimezone(UTC)), _ms(end.astimezone(UTC))


def window_bounds(kind: WindowKind, now_ms: int, tz: str = "UTC") -> tuple[int, int]:
    """[start_ms, end_ms) of the window of ``kind`` containing ``now_ms``."""
    return _bounds_cached(kind, tz, now_ms // 3_600_000)


def valid_timezone(name: str) -> bool:
    try:
        zone = _zone(name)
    except Exception:
        return False
    # Zones whose offset is not a whole number of hours would split an hour
    # across two windows; reject them rather than mis-bucket.
    probe = datetime(2026, 1, 1, tzinfo=zone).utcoffset()
    probe2 = datetime(2026, 7, 1, tzinfo=zone).utcoffset()
    return all(p is not None and p.total_seconds() % 3600 == 0 for p in (probe, probe2))
