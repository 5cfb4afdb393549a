"""A sidecar whose host clock is wrong, against the money: hold expiries, budget
windows, exception grants. The store's clock (Redis TIME) is the one every
sidecar reads alike; a sidecar off it by more than the tolerance keeps time by it
(keel_pdp.clock). One body over fakeredis, redis-py + a real Redis and the
production RESP client.

Prices (tests/helpers.PRICES): gpt-4o-mini is $0.15 / $0.60 per million tokens,
so 1,000 input + 500 output tokens are estimated at 150 + 300 = 450 micro-USD.
"""

from __future__ import annotations

import logging
import pathlib

import pytest
import redis.asyncio as aioredis

from keel_pdp import grants
from keel_pdp.decision import DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.overage.workflow import ExceptionDesk
from keel_pdp.permits import PermitIds, permit_issued_ms
from keel_pdp.pricing import TokenUsage
from tests.adversarial.test_policy_hostile import req, wall_ms, windows
from tests.helpers import budget, make_engine, write_bundle

ONE_CALL = 450  # micro-USD, see the module docstring (the same requests and prices as
# tests/adversarial/test_policy_hostile.py, whose helpers this module shares)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def skewed(client: aioredis.Redis, d: pathlib.Path, skew_ms: int) -> Engine:
    """A sidecar on a host whose clock is ``skew_ms`` off (the system clock shifted,
    so it follows the store's as the real one would)."""
    engine = make_engine(client, d)
    engine.ids = PermitIds(clock_ms=lambda: wall_ms() + skew_ms, follows_store=True)
    return engine


def one_call_budget(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "b", [budget("acme-daily", "0.000500",
                                                scope={"tenant": "acme"},
                                                exception_path="finance-overage")],
                        settings={"hold_ttl_seconds": 60, "allow_constrain": False},
                        exception_paths=[{"name": "finance-overage",
                                          "approver_role": "finance-owner",
                                          "max_overage_usd": "1.00", "max_duration_hours": 24}])


async def test_a_sidecar_two_hours_slow_gives_its_holds_their_full_time(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # Room for one call. The slow sidecar's holds would expire two hours before
    # they are made by the store's clock: any sweeping sidecar would release the
    # hold while the provider call runs, and a second call would take the room.
    d = one_call_budget(tmp_path)
    slow = skewed(aio_client, d, -2 * HOUR_MS)
    on_time = make_engine(aio_client, d)
    assert await slow.sweep_once() == 0  # its first sweep reads the store's clock
    assert slow.clock.following and abs(slow.ids.offset_ms - 2 * HOUR_MS) < 1000

    first = await slow.authorize(req("r1"))
    assert first.decision is DecisionKind.ALLOW
    assert abs(first.expires_at_ms - (wall_ms() + 60_000)) < 5_000
    assert abs(permit_issued_ms(first.permit_id) - wall_ms()) < 5_000
    assert await on_time.sweep_once() == 0
    assert await slow.sweep_once() == 0
    assert list((await windows(on_time, "acme-daily")).values()) == [(0, ONE_CALL)]
    second = await on_time.authorize(req("r2"))
    assert second.decision is DecisionKind.DENY
    done = await slow.closeout(first.permit_id, TokenUsage(1000, 0, 0, 500), "SUCCEEDED", None)
    assert done.status == "SETTLED" and done.actual_cost_micros == ONE_CALL
    assert list((await windows(on_time, "acme-daily")).values()) == [(ONE_CALL, 0)]


async def test_a_sidecar_a_day_ahead_books_into_todays_window_not_a_fresh_one(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # Room for one call a day. A sidecar a day ahead would judge its calls against
    # tomorrow's daily window, a full cap, and the tenant would spend two days' cap.
    d = one_call_budget(tmp_path)
    on_time = make_engine(aio_client, d)
    ahead = skewed(aio_client, d, DAY_MS)
    await ahead.sync_clock()
    first = await on_time.authorize(req("r1"))
    assert first.decision is DecisionKind.ALLOW
    second = await ahead.authorize(req("r2"))
    assert second.decision is DecisionKind.DENY
    got = await windows(on_time, "acme-daily")
    assert list(got.values()) == [(0, ONE_CALL)]  # one window: today's


async def test_a_grant_from_a_slow_sidecar_lasts_its_full_duration(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # A one-hour grant stamped by a clock two hours slow would have expired an hour
    # before it was given: the denied caller would stay denied, the approval wasted.
    d = one_call_budget(tmp_path)
    slow = skewed(aio_client, d, -2 * HOUR_MS)
    await slow.sync_clock()
    snapshot = slow.policies.current
    assert snapshot is not None
    g = grants.GrantRequest(exception_path="finance-overage", budget_id="acme-daily",
                            scope=(), amount_micros=1_000,
                            duration_seconds=3600, approver="ops", approver_role="finance-owner",
                            justification="product launch week")
    res = await grants.record(slow.store, snapshot, g, slow.ids.now_ms())
    assert abs(res.expires_at_ms - (wall_ms() + HOUR_MS)) < 5_000
    desk = ExceptionDesk(slow.store, clock_ms=slow.ids.now_ms)
    assert abs(desk._now_ms() - wall_ms()) < 5_000
    # The grant counts now: two more calls fit (500 + 1,000 micro-USD of room).
    for rid in ("r1", "r2", "r3"):
        assert (await slow.authorize(req(rid))).decision is DecisionKind.ALLOW
    assert (await slow.authorize(req("r4"))).decision is DecisionKind.DENY


async def test_a_sidecar_within_the_tolerance_keeps_its_own_clock(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = one_call_budget(tmp_path)
    near = skewed(aio_client, d, -100)
    await near.sync_clock()
    assert not near.clock.following and near.ids.offset_ms == 0
    assert -1_000 < near.clock.offset_ms < 1_000
    assert near.metrics.clock_following._value.get() == 0


async def test_an_injected_clock_is_never_corrected(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # A fixed clock (a test's, a replay's) is time on purpose.
    d = one_call_budget(tmp_path)
    engine = make_engine(aio_client, d)
    engine.ids = PermitIds(clock_ms=lambda: 1_000)
    await engine.sync_clock()
    assert engine.ids.now_ms() == 1_000


async def test_following_and_recovering_are_logged_and_exported(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    d = one_call_budget(tmp_path)
    skew = [-5_000]
    engine = make_engine(aio_client, d)
    engine.ids = PermitIds(clock_ms=lambda: wall_ms() + skew[0], follows_store=True)
    with caplog.at_level(logging.WARNING, logger="keel_pdp.engine"):
        await engine.sync_clock()
        assert engine.metrics.clock_following._value.get() == 1
        assert 4.0 < engine.metrics.clock_offset._value.get() < 6.0
        assert "5.0" in caplog.text and "behind" in caplog.text
        skew[0] = 0  # NTP fixed the host
        await engine.sync_clock()
    assert engine.ids.offset_ms == 0 and not engine.clock.following
    assert engine.metrics.clock_following._value.get() == 0
    assert "agrees with the budget store's again" in caplog.text


async def test_clocks_years_apart_are_not_followed_and_say_so_once(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # An RTC reset (here: thirty years back). Either clock could be the wrong one;
    # the sidecar keeps its own and says so, once, and the offset is exported.
    d = one_call_budget(tmp_path)
    reset = skewed(aio_client, d, -30 * 365 * DAY_MS)
    with caplog.at_level(logging.ERROR, logger="keel_pdp.engine"):
        await reset.sync_clock()
        await reset.sync_clock()
    assert not reset.clock.following and reset.ids.offset_ms == 0
    assert caplog.text.count("days apart: one of them was reset") == 1
    assert reset.metrics.clock_offset._value.get() > 29 * 365 * 86_400
