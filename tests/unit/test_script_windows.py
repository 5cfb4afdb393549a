"""The cheaper hold/settle scripts keep every window hash's expiry, apply grants and
cross thresholds exactly as before, over fakeredis, redis-py + Redis and the RESP
client.

The scripts no longer set a window's expiry with every hold and settlement (only
when a script may have created the hash) and look at grant hashes only when one
exists: these tests provoke what those shortcuts could get wrong — a window that
expired under a live hold and comes back without an expiry, an expiry shortened by
an older permit, a grant on one of three budgets ignored, a threshold crossing
missed at its exact level.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore, HoldCandidate, HoldRequest, hold_shape
from tests.conftest import RESP_URL_ATTR

_ids = itertools.count(1)
NOW_MS = int(time.time() * 1000)
WEXP = NOW_MS // 1000 + 7200  # the windows' expire-at (s)


@pytest.fixture
async def store(aio_client: aioredis.Redis) -> AsyncIterator[BudgetStore]:
    """The budget store over ``aio_client``'s Redis (the RESP client where it names one)."""
    url = getattr(aio_client, RESP_URL_ATTR, None)
    st = (BudgetStore.from_url(url, prefix="w", timeout_s=2.0) if url is not None
          else BudgetStore(aio_client, KeySpace("w"), timeout_s=2.0))
    try:
        yield st
    finally:
        await st.close()


def _hold(tag: str, limits: tuple[int, ...], cost_micros: int, *,
          thresholds: tuple[tuple[int, ...], ...] | None = None,
          enforce: tuple[bool, ...] | None = None,
          idx: tuple[int, ...] | None = None) -> HoldRequest:
    n = len(limits)
    i = next(_ids)
    ks = KeySpace("w")
    return HoldRequest(
        permit_id=f"pmt_{i:028x}", idempotency_key=ks.idempotency("t", f"{tag}-{i}"),
        fingerprint="f", now_ms=NOW_MS, expires_at_ms=NOW_MS + 600_000, event_data="{}",
        shape=hold_shape(
            tuple(ks.window(f"{tag}{b}", (), 0) for b in range(n)),
            tuple(ks.grants(f"{tag}{b}", ()) for b in range(n)), limits,
            enforce or (True,) * n, (WEXP,) * n, thresholds or ((),) * n,
            idempotency_ttl_s=600, permit_retention_s=600, min_output_tokens=1),
        # cost_micros exactly: 1 output token at cost_micros x 10^6 pico-USD
        candidates=(HoldCandidate(0, cost_micros * 1_000_000, 1, False, "{}",
                                  idx if idx is not None else tuple(range(n)), cost_micros),))


def _near_wexp(ttl: int) -> bool:
    """A TTL that ends at WEXP, the windows' expire-at (the suite may run minutes
    after this module was imported)."""
    left = WEXP - int(time.time())
    return left - 5 <= ttl <= left + 1


async def _ttl(client: aioredis.Redis, key: str) -> int:
    return int(await client.ttl(key))


async def _window(client: aioredis.Redis, key: str) -> dict[str, int]:
    raw: Any = await client.hgetall(key)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_first_hold_sets_the_window_expiry_and_later_holds_leave_it(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    first = _hold("a", (10**9, 10**9), 100)
    res = await store.hold(first)
    assert res.decision == "ALLOW"
    windows = first.shape.keys[:2]
    for key in windows:
        assert _near_wexp(await _ttl(aio_client, key))
    # Someone (an operator) moved the expiry: a later hold does not rewrite it.
    await aio_client.expireat(windows[0], WEXP + 3600)
    res = await store.hold(_hold("a", (10**9, 10**9), 100))
    assert res.decision == "ALLOW" and res.figures == ((0, 200), (0, 200))
    assert await _ttl(aio_client, windows[0]) > 7200


async def test_a_hold_in_a_window_that_only_has_settlements_sets_its_expiry(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r = _hold("b", (10**9,), 100)
    # A degraded permit's closeout made the window: s only, no expiry yet.
    await aio_client.hset(r.shape.keys[0], "s", 7)
    res = await store.hold(r)
    assert res.figures == ((7, 100),)
    assert _near_wexp(await _ttl(aio_client, r.shape.keys[0]))


async def test_closeout_recreates_an_expired_window_with_its_expiry(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r = _hold("c", (10**9, 10**9), 100)
    res = await store.hold(r)
    windows = r.shape.keys[:2]
    await aio_client.delete(*windows)  # both windows expired under the hold
    out = await store.settle(res.permit_id, windows, NOW_MS + 1, 90, "{}",
                             idempotency_key=r.idempotency_key)
    assert out.status == "SETTLED"
    for key in windows:
        assert await _window(aio_client, key) == {"s": 90, "h": -100}
        assert _near_wexp(await _ttl(aio_client, key))


async def test_closeout_never_shortens_a_window_expiry(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r = _hold("d", (10**9,), 100)
    res = await store.hold(r)
    key = r.shape.keys[0]
    await aio_client.expireat(key, WEXP + 86400)  # a later retention setting
    out = await store.settle(res.permit_id, (key,), NOW_MS + 1, 90, "{}",
                             idempotency_key=r.idempotency_key)
    assert out.status == "SETTLED" and await _window(aio_client, key) == {"s": 90, "h": 0}
    assert await _ttl(aio_client, key) > 86400


async def test_void_and_abort_give_a_recreated_window_its_expiry(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r1 = _hold("e", (10**9,), 100)
    p1 = (await store.hold(r1)).permit_id
    r2 = _hold("e", (10**9,), 50)
    p2 = (await store.hold(r2)).permit_id
    key = r1.shape.keys[0]
    await aio_client.delete(key)
    out = await store.release(p1, (key,), NOW_MS + 1, "voided", "{}",
                              idempotency_key=r1.idempotency_key)
    assert (out.status, out.amount_micros) == ("RELEASED", 100)
    assert await _window(aio_client, key) == {"h": -100}
    assert _near_wexp(await _ttl(aio_client, key))
    await aio_client.delete(key)
    ab = await store.abort(p2, r2.idempotency_key, (key,), NOW_MS + 2, "{}", 2.0)
    assert ab.status == "RELEASED"
    assert await _window(aio_client, key) == {"h": -50}
    assert _near_wexp(await _ttl(aio_client, key))


async def test_a_grant_on_one_of_three_budgets_raises_only_that_budget(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    limits = (10**9, 1_000, 10**9)
    r = _hold("g", limits, 1_500)
    denied = await store.hold(r)
    assert (denied.decision, denied.fail, denied.granted) == ("DENY", 1, ())
    grant_key = r.shape.keys[3 + 1]
    await aio_client.hset(grant_key, mapping={
        "old": f"5000:{NOW_MS - 1}",  # lapsed: counts for nothing
        "x1": f"600:{NOW_MS + 60_000}"})
    res = await store.hold(_hold("g", limits, 1_500))
    assert res.decision == "ALLOW" and res.granted == (0, 600, 0)
    assert res.figures == ((0, 1_500), (0, 1_500), (0, 1_500))
    # budget 2 now has 1,000 + 600 granted - 1,500 held = 100 of room
    again = await store.hold(_hold("g", limits, 101))
    assert (again.decision, again.fail) == ("DENY", 1)


async def test_thresholds_cross_at_their_exact_level_whatever_order_they_come_in(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    limit = 999_999_999_999_999  # near the largest figures (doubles stay exact)
    level80 = limit * 80 // 100
    th = ((100, 80),)  # hold_shape sorts them: the script relies on ascending order
    below = await store.hold(_hold("h", (limit,), level80 - 1, thresholds=th))
    assert below.alerts == ()
    at = await store.hold(_hold("h", (limit,), 1, thresholds=th))
    assert at.figures == ((0, level80),) and at.alerts == ((0, 80),)
    rest = await store.hold(_hold("h", (limit,), limit - level80, thresholds=th))
    assert rest.alerts == ((0, 100),)
    # A budget far below its lowest threshold crosses nothing (and an
    # observe-mode budget above its cap is reported as shadow).
    other = await store.hold(_hold("i", (10**6, 10), 20, thresholds=((50, 80), ()),
                                   enforce=(True, False)))
    assert other.alerts == () and other.shadow == (1,)


async def test_a_candidate_holding_some_budgets_records_only_those_windows(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r = _hold("j", (10**9, 10**9, 10**9), 100, idx=(2, 0))
    res = await store.hold(r)
    assert res.held == (2, 0) and res.figures == ((0, 100), (0, 0), (0, 100))
    rec = await store.permit(res.permit_id)
    assert rec is not None and rec.keys == (r.shape.keys[2], r.shape.keys[0])
    assert not await aio_client.exists(r.shape.keys[1])
    out = await store.settle(res.permit_id, rec.keys, NOW_MS + 1, 80, "{}",
                             idempotency_key=r.idempotency_key)
    assert out.status == "SETTLED"
    assert await _window(aio_client, r.shape.keys[2]) == {"s": 80, "h": 0}


async def test_lapsed_grants_alone_leave_the_reply_as_without_grants(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    r = _hold("k", (10**9, 10**9), 100)
    await aio_client.hset(r.shape.keys[2 + 1], "old", f"5000:{NOW_MS - 1}")
    res = await store.hold(r)
    assert res.decision == "ALLOW" and res.granted == ()


def _again(r: HoldRequest, fingerprint: str = "f") -> HoldRequest:
    """The same request (idempotency key) under a new permit id, as a retry sends it."""
    return HoldRequest(f"pmt_{next(_ids):028x}", r.idempotency_key, fingerprint, r.now_ms + 1,
                       r.expires_at_ms, r.event_data, r.shape, r.candidates)


async def test_one_exists_tells_apart_what_it_found(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    """The script asks for the idempotency record, the tombstone and the grant hashes
    in one EXISTS; whatever combination exists, each is read and acted on."""
    limits = (10**9, 1_000)
    # A live grant and nothing else: decided, with the grant.
    r = _hold("x", limits, 1_400)
    grant_key = r.shape.keys[2 + 1]
    await aio_client.hset(grant_key, "x1", f"500:{NOW_MS + 60_000}")
    res = await store.hold(r)
    assert (res.outcome, res.decision, res.granted) == ("decided", "ALLOW", (0, 500))
    assert await _window(aio_client, r.shape.keys[1]) == {"h": 1_400}
    # A retry of it while the grant lives is a replay: no second hold.
    replay = await store.hold(_again(r))
    assert (replay.outcome, replay.permit_id) == ("replay", res.permit_id)
    assert await _window(aio_client, r.shape.keys[1]) == {"h": 1_400}
    # The same request id with other parameters is refused, grant or not.
    assert (await store.hold(_again(r, "other"))).outcome == "reused"
    # Once its permit is settled, a retry is told it ended, grant or not.
    rec = await store.permit(res.permit_id)
    assert rec is not None
    done = await store.settle(res.permit_id, rec.keys, NOW_MS + 2, 1_000, "{}",
                              idempotency_key=r.idempotency_key)
    assert done.status == "SETTLED"
    ended = await store.hold(_again(r))
    assert (ended.outcome, ended.permit_id, ended.ended_state) == (
        "ended", res.permit_id, "settled")
    assert await _window(aio_client, r.shape.keys[1]) == {"s": 1_000, "h": 0}
    # A tombstone under the permit id, with the grant still there: nothing is held.
    t = _hold("x", limits, 50)
    await aio_client.hset(store.keys.permit(t.permit_id), "state", "aborted")
    assert (await store.hold(t)).outcome == "aborted"
    assert await _window(aio_client, t.shape.keys[0]) == {"s": 1_000, "h": 0}
    assert not await aio_client.exists(t.idempotency_key)
    # With the grant gone, the settled 1,000 fill budget 1's cap again.
    await aio_client.delete(grant_key)
    plain = await store.hold(_hold("x", limits, 50))
    assert (plain.decision, plain.fail, plain.granted) == ("DENY", 1, ())


async def test_every_budget_in_order_and_out_of_order_store_the_same_permit(
        store: BudgetStore, aio_client: aioredis.Redis) -> None:
    """A candidate on every budget in order is sent without indexes; one on the same
    budgets in another order is sent with them. Both hold in every window and record
    the windows (and their expire-at) in the order held."""
    limits = (10**9, 10**9, 10**9)
    ordered = _hold("o", limits, 70)
    _, args = store.hold_call(ordered)
    assert args[-1] == "a"
    res = await store.hold(ordered)
    assert res.held == (0, 1, 2) and res.figures == ((0, 70),) * 3
    rec = await store.permit(res.permit_id)
    assert rec is not None and rec.keys == ordered.shape.keys[:3]
    mixed = _hold("m", limits, 70, idx=(2, 0, 1))
    _, margs = store.hold_call(mixed)
    assert margs[-4:] == [3, 3, 1, 2]
    mres = await store.hold(mixed)
    assert mres.held == (2, 0, 1) and mres.figures == ((0, 70),) * 3
    mrec = await store.permit(mres.permit_id)
    assert mrec is not None and mrec.keys == tuple(mixed.shape.keys[i] for i in (2, 0, 1))
    for pid in (res.permit_id, mres.permit_id):
        wx, k, amount = await aio_client.hmget(store.keys.permit(pid), "wx", "k", "amount")
        assert (wx, k, amount) == (f"{WEXP},{WEXP},{WEXP}".encode(), b"1", b"70")
        ttl = await aio_client.ttl(store.keys.permit(pid))
        left = (NOW_MS + 600_000) // 1000 + 600 - int(time.time())
        assert left - 5 <= ttl <= left + 1
