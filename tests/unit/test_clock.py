"""keel_pdp.clock: when a sidecar keeps time by the store's clock. Samples are
(local ms when asked, store ms, local ms when answered)."""

from __future__ import annotations

from keel_pdp.clock import MAX_FOLLOW_MS, MAX_RTT_MS, TOLERANCE_MS, ClockSync


def test_within_the_tolerance_the_own_clock_is_kept() -> None:
    sync = ClockSync()
    assert not sync.observe(1_000, 1_000 + TOLERANCE_MS - 1 + 5, 1_010)
    assert sync.offset_ms == TOLERANCE_MS - 1 and sync.applied_ms == 0


def test_at_the_tolerance_the_store_clock_is_followed_from_the_round_trips_midpoint() -> None:
    sync = ClockSync()
    # asked at 10,000, answered at 10,040: the store said 10,020 + 7,200,000
    assert sync.observe(10_000, 7_210_020, 10_040)
    assert sync.applied_ms == 7_200_000 and sync.following
    # ahead of the store: a negative offset
    sync = ClockSync()
    assert sync.observe(10_000, 10_000 - TOLERANCE_MS, 10_000)
    assert sync.applied_ms == -TOLERANCE_MS


def test_a_slow_round_trip_or_a_clock_step_says_nothing() -> None:
    sync = ClockSync()
    assert not sync.observe(0, 9_999_999, MAX_RTT_MS + 1)
    assert not sync.observe(1_000, 9_999_999, 999)  # the local clock stepped back
    assert sync.samples == 0 and sync.applied_ms == 0 and sync.offset_ms == 0


def test_following_stops_only_under_half_the_tolerance() -> None:
    sync = ClockSync()
    sync.observe(0, 1_000, 0)
    half = TOLERANCE_MS // 2
    assert sync.observe(0, half + 20, 0)  # still off by more than half: follow on
    assert sync.following and sync.applied_ms == half + 20
    assert sync.observe(0, half - 1, 0)
    assert not sync.following and sync.applied_ms == 0


def test_while_following_jitter_does_not_move_the_clock() -> None:
    sync = ClockSync()
    sync.observe(0, 60_000, 0)
    assert not sync.observe(0, 60_008, 0)
    assert sync.applied_ms == 60_000 and sync.offset_ms == 60_008
    assert sync.observe(0, 60_050, 0)
    assert sync.applied_ms == 60_050


def test_clocks_more_than_a_week_apart_are_not_followed() -> None:
    # One of them was reset (1970, 2000): no telling which, and following a reset
    # Redis would move the whole fleet into other windows at once.
    sync = ClockSync()
    assert sync.observe(0, 3_600_000, 0) and sync.following
    assert sync.observe(0, MAX_FOLLOW_MS + 1, 0)
    assert not sync.following and sync.offset_ms == MAX_FOLLOW_MS + 1
    assert not sync.observe(0, -50 * 365 * 86_400_000, 0)
    assert sync.applied_ms == 0
    assert sync.observe(0, MAX_FOLLOW_MS, 0) and sync.applied_ms == MAX_FOLLOW_MS
