"""A backlog of expired holds is released at once, not one page per sweep interval.

A fleet restarted after an outage, or a burst of calls whose callers all vanished,
leaves thousands of holds expiring together. Each sweep reads one page of due
holds per shard; while a page comes back full the sidecar sweeps again within the
same interval, and releases run concurrently. Until they are released the held
money blocks other callers (wrongful denials), so a backlog must not wait for
hundreds of intervals.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, DecisionKind
from tests.helpers import budget, make_engine, write_bundle

HOLDS = 700  # more than three pages of 200
PAGE = 200


@pytest.fixture
def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "b", [budget("acme-daily", "100.00",
                                                scope={"tenant": "acme"})])


async def test_a_backlog_of_expired_holds_is_released_in_one_sweep_tick(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> Any:
        async with sem:
            return await engine.authorize(AuthorizeInput(
                f"r{i}", "acme", "chat", "gpt-4o-mini", "openai", 1000, 500))

    outs = await asyncio.gather(*(one(i) for i in range(HOLDS)))
    assert all(o.decision is DecisionKind.ALLOW for o in outs)
    held = sum(o.estimated_cost_micros for o in outs)
    assert held == HOLDS * 450  # 1000 x 0.15 + 500 x 0.60 micro-USD each
    after = max(o.expires_at_ms for o in outs) + 1

    released = await engine.sweep_backlog(now_ms=after, time_budget_s=30.0)
    assert released == HOLDS
    assert not engine.sweep_full
    client: Any = engine.store.client
    assert await client.zcard(engine.store.keys.expiry_sets[0]) == 0
    # Every hold is back: nothing is held in the window any more.
    keys = [k.decode() for k in await client.keys("*:b:acme-daily:*")]
    assert len(keys) == 1
    assert (await engine.store.window(keys[0]))[1] == 0
    stream = await client.xrange(engine.store.keys.stream)
    kinds = [fields[b"type"] for _, fields in stream]
    assert kinds.count(b"expiry") == HOLDS

    # Idempotent: nothing more is due, one page, not full.
    assert await engine.sweep_backlog(now_ms=after + 1) == 0
    assert not engine.sweep_full


async def test_one_sweep_page_releases_a_page_and_says_more_are_due(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    outs = [await engine.authorize(AuthorizeInput(
        f"p{i}", "acme", "chat", "gpt-4o-mini", "openai", 1000, 500)) for i in range(PAGE + 5)]
    after = max(o.expires_at_ms for o in outs) + 1
    assert await engine.sweep_once(now_ms=after) == PAGE
    assert engine.sweep_full
    assert await engine.sweep_once(now_ms=after) == 5
    assert not engine.sweep_full


async def test_the_background_loop_sweeps_again_while_pages_come_back_full(
        tmp_path: pathlib.Path) -> None:
    """One tick of the sidecar's background loop keeps sweeping while pages are full
    (within half the interval), then waits for the next tick."""
    import fakeredis.aioredis

    engine = make_engine(fakeredis.aioredis.FakeRedis(), write_bundle(
        tmp_path / "b", [budget("acme-daily", "1.00", scope={"tenant": "acme"})]))
    calls: list[float] = []
    full_pages = 3

    async def fake_sweep(now_ms: int | None = None, limit: int = 200) -> int:
        calls.append(asyncio.get_running_loop().time())
        engine.sweep_full = len(calls) <= full_pages
        return limit if engine.sweep_full else 0

    engine.sweep_once = fake_sweep  # type: ignore[method-assign]
    task = asyncio.create_task(engine.run_background(interval_s=0.2))
    await asyncio.sleep(0.3)  # one tick (at 0.2 s), not two
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == full_pages + 1
