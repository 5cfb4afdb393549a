"""A hostile operator or an unlucky clock against hold expiry and budget windows:
a sweeper whose clock runs ahead, the repeated hour of a DST fall-back. One body
over fakeredis, redis-py + a real Redis and the production RESP client.

Prices (tests/helpers.PRICES): gpt-4o-mini is $0.15 / $0.60 per million tokens,
so 1,000 input + 500 output tokens are estimated at 150 + 300 = 450 micro-USD.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.permits import PermitIds
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, write_bundle

ONE_CALL = 450  # micro-USD, see the module docstring


def req(rid: str, tenant: str = "acme") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, "chat", "gpt-4o-mini", "openai", 1000, 500)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def windows(engine: Engine, budget_id: str) -> dict[str, tuple[int, int]]:
    """Every window hash of ``budget_id``: key -> (settled, held)."""
    client: Any = engine.store.client
    keys = sorted(k.decode() for k in await client.keys(f"*:b:{budget_id}:*"))
    return {k: await engine.store.window(k) for k in keys}


async def event_types(engine: Engine) -> list[str]:
    """The stream's event types in order, threshold alerts left out."""
    client: Any = engine.store.client
    raw = await client.xrange(engine.store.keys.stream)
    return [t for t in (fields[b"type"].decode() for _, fields in raw) if t != "alert"]


async def test_a_sweeper_whose_clock_runs_ten_minutes_ahead_cannot_expire_a_live_hold(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # Room for one call; holds last 5 s. Another sidecar sharing the store has a
    # clock ten minutes fast: its sweeps must not end the hold while the provider
    # call still runs, or a second call takes the headroom and the cap is overshot.
    d = write_bundle(tmp_path / "b", [budget("acme-daily", "0.000500", scope={"tenant": "acme"})],
                     settings={"hold_ttl_seconds": 5, "allow_constrain": False})
    issuer = make_engine(aio_client, d)
    fast = make_engine(aio_client, d)
    fast.ids = PermitIds(clock_ms=lambda: wall_ms() + 600_000)

    first = await issuer.authorize(req("r1"))
    assert first.decision is DecisionKind.ALLOW
    assert first.estimated_cost_micros == ONE_CALL
    assert await fast.sweep_once() == 0
    assert list((await windows(issuer, "acme-daily")).values()) == [(0, ONE_CALL)]
    second = await issuer.authorize(req("r2"))
    assert second.decision is DecisionKind.DENY
    assert await event_types(issuer) == ["decision", "decision"]

    # Once the hold's time has passed for every clock, the fast sweeper expires it, once.
    await asyncio.sleep(max(0.0, (first.expires_at_ms - wall_ms()) / 1000) + 0.2)
    assert await fast.sweep_once() == 1
    assert await issuer.sweep_once() == 0
    assert list((await windows(issuer, "acme-daily")).values()) == [(0, 0)]
    late = await issuer.closeout(first.permit_id, TokenUsage(1000, 0, 0, 500), "SUCCEEDED",
                                 None)
    assert late.status == "SETTLED_AFTER_EXPIRY" and late.actual_cost_micros == ONE_CALL
    assert list((await windows(issuer, "acme-daily")).values()) == [(ONE_CALL, 0)]
    assert await event_types(issuer) == ["decision", "decision", "expiry", "settlement"]


# 2030-11-03, America/New_York falls back: 01:00-02:00 local happens twice, as
# 05:00-06:00 UTC (EDT) and again as 06:00-07:00 UTC (EST). Each is an hour of
# its own with its own cap. (A date ahead of the test run: window hashes expire
# a retention after their window ends.)
def _utc(h: int, mi: int) -> int:
    return int(datetime(2030, 11, 3, h, mi, tzinfo=UTC).timestamp() * 1000)


def _clocked(client: aioredis.Redis, d: pathlib.Path, clock: list[int]) -> Engine:
    engine = make_engine(client, d)
    engine.ids = PermitIds(clock_ms=lambda: clock[0])
    return engine


def _hourly_ny(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "b", [budget(
        "acme-hourly", "0.000500", window="hourly", timezone="America/New_York",
        scope={"tenant": "acme"})], settings={"allow_constrain": False})


async def test_the_second_pass_of_a_repeated_dst_hour_is_a_fresh_hourly_window(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    clock = [_utc(5, 30)]  # 01:30 EDT
    engine = _clocked(aio_client, _hourly_ny(tmp_path), clock)
    first = await engine.authorize(req("r1"))
    assert first.decision is DecisionKind.ALLOW
    done = await engine.closeout(first.permit_id, TokenUsage(1000, 0, 0, 500), "SUCCEEDED", None)
    assert done.actual_cost_micros == ONE_CALL
    clock[0] = _utc(6, 30)  # 01:30 EST: the next hour, with a cap of its own
    second = await engine.authorize(req("r2"))
    assert second.decision is DecisionKind.ALLOW
    got = await windows(engine, "acme-hourly")
    assert sorted(got.values()) == [(0, ONE_CALL), (ONE_CALL, 0)]
    assert [k.rsplit(":", 1)[1] for k in got] == [str(_utc(5, 0)), str(_utc(6, 0))]


async def test_two_sidecars_in_the_repeated_dst_hour_share_one_window_and_one_cap(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = _hourly_ny(tmp_path)
    clock = [_utc(5, 59)]
    early = _clocked(aio_client, d, clock)   # has served this shape since 01:59 EDT
    warmup = await early.authorize(req("warm"))
    assert (await early.void(warmup.permit_id)).status == "VOIDED"
    late = _clocked(aio_client, d, clock)    # serves it first at 01:30 EST
    clock[0] = _utc(6, 30)
    a = await early.authorize(req("a"))
    b = await late.authorize(req("b"))
    # One call fits the hour 06:00-07:00 UTC, whichever sidecar asks.
    assert sorted([a.decision, b.decision]) == sorted([DecisionKind.ALLOW, DecisionKind.DENY])
    held_this_hour = sum(h for k, (_, h) in (await windows(early, "acme-hourly")).items()
                         if k.endswith(f":{_utc(6, 0)}"))
    assert held_this_hour == ONE_CALL


# R1: acme-daily, $1 a day; gpt-4o-mini at $0.15 / $0.60. R2 variants change what a
# permit decided under R1 must not follow: its price, its budget's id, window or cap.
R2_PRICES = {"openai": {"gpt-4o-mini": {"input": "0.30", "output": "1.20",
                                        "max_output_tokens": 1000}}}
R2_VARIANTS: dict[str, dict[str, Any]] = {
    "price-doubled": {"budgets": [budget("acme-daily", "1.00", scope={"tenant": "acme"})],
                      "prices": R2_PRICES},
    "budget-removed": {"budgets": [budget("other", "1.00", scope={"tenant": "globex"})]},
    "budget-renamed": {"budgets": [budget("acme-day", "1.00", scope={"tenant": "acme"})]},
    "daily-to-hourly": {"budgets": [budget("acme-daily", "1.00", window="hourly",
                                           scope={"tenant": "acme"})]},
    "cap-below-held": {"budgets": [budget("acme-daily", "0.000100", scope={"tenant": "acme"})]},
}


@pytest.mark.parametrize("expire_first", [False, True], ids=["held", "expired"])
@pytest.mark.parametrize("variant", sorted(R2_VARIANTS))
async def test_a_permit_of_r1_closed_out_under_r2_books_its_r1_price_into_its_r1_windows(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path, variant: str,
        expire_first: bool) -> None:
    d = write_bundle(tmp_path / "b", [budget("acme-daily", "1.00", scope={"tenant": "acme"})],
                     revision="r1")
    engine = make_engine(aio_client, d)
    first = await engine.authorize(req("r1"))
    assert first.decision is DecisionKind.ALLOW and first.estimated_cost_micros == ONE_CALL
    (held_key,) = (await windows(engine, "acme-daily")).keys()

    write_bundle(d, revision="r2", **R2_VARIANTS[variant])
    assert engine.policies.reload() is True
    snapshot = engine.policies.current
    assert snapshot is not None and snapshot.revision == "r2"
    if expire_first:
        assert await engine.sweep_once(now_ms=first.expires_at_ms + 1) == 1
    # 1,000 input + 100 output tokens at R1's price: 150 + 60 = 210 micro-USD.
    done = await engine.closeout(first.permit_id, TokenUsage(1000, 0, 0, 100), "SUCCEEDED",
                                 None)
    assert done.status == ("SETTLED_AFTER_EXPIRY" if expire_first else "SETTLED")
    assert done.actual_cost_micros == done.priced_cost_micros == 210
    assert done.correction_micros == (210 if expire_first else 210 - ONE_CALL)
    client: Any = engine.store.client
    every = sorted(k.decode() for k in await client.keys("*:b:*"))
    assert every == [held_key]
    assert await engine.store.window(held_key) == (210, 0)
    assert await client.zcard(engine.store.keys.expiry_sets[0]) == 0
    again = await engine.closeout(first.permit_id, TokenUsage(1000, 0, 0, 999), "SUCCEEDED",
                                  None)
    assert again.status == "ALREADY_SETTLED" and again.actual_cost_micros == 210
    assert await engine.store.window(held_key) == (210, 0)
