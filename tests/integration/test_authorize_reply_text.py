"""The authorize script's answer, byte for byte, in real Redis.

The answer is stored twice (the decision's ``res`` in the stream, the idempotency
record's ``res`` for a replay) and read by every release of the ledger writer, so
its text is a format: the members in their order, every figure an exact decimal
integer however large (below 2^53), nothing printed as a float. Each expected text
here is written out in the test from the figures the test put in Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore, HoldCandidate, HoldRequest, hold_shape

_ids = itertools.count(1)
BIG = 2**53 - 1  # the largest figure the caller lets through


def _request(limits: Sequence[int], enforce: Sequence[bool], *, estimate: int, tokens: int,
             out_price: int = 1_000_000, may_constrain: bool = False,
             indexes: Sequence[int] | None = None) -> HoldRequest:
    i = next(_ids)
    n = len(limits)
    shape = hold_shape(tuple(f"t:win:{i}:{j}" for j in range(n)),
                       tuple(f"t:grant:{i}:{j}" for j in range(n)), tuple(limits),
                       tuple(enforce), (4_000_000_000,) * n, ((),) * n,
                       idempotency_ttl_s=60, permit_retention_s=60, min_output_tokens=1)
    idx = tuple(range(n)) if indexes is None else tuple(indexes)
    return HoldRequest(
        permit_id=f"pmt_{i:028x}", idempotency_key=f"t:req:{i}", fingerprint="f", now_ms=1_000,
        expires_at_ms=600_000, event_data="{}", shape=shape,
        candidates=(HoldCandidate(0, out_price, tokens, may_constrain, "{}", idx, estimate),))


def _answer(redis_url: str, r: HoldRequest, windows: Sequence[tuple[int | None, int | None]],
            grants: Sequence[int] = ()) -> str:
    """The text the script stored in the stream for ``r``, after putting the window
    figures (settled, held; None: field absent) and grants in place."""
    async def run() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            ks = KeySpace("t")
            store = BudgetStore(client, ks, timeout_s=2.0)
            n = len(windows)
            for key, (s, h) in zip(r.shape.keys[:n], windows, strict=True):
                if s is not None:
                    await client.hset(key, "s", s)
                if h is not None:
                    await client.hset(key, "h", h)
            for key, g in zip(r.shape.keys[n:2 * n], grants, strict=False):
                if g:
                    await client.hset(key, "g1", f"{g}:9999999999999")
            await store.hold(r)
            entries = await client.xrevrange(ks.stream, count=1)
            assert entries and entries[0][1] is not None
            res = entries[0][1][b"res"]
            assert isinstance(res, bytes)
            return res.decode()
        finally:
            await client.aclose()
    return asyncio.run(run())


def test_an_allow_over_three_budgets_with_the_largest_figures(redis_url: str) -> None:
    est = 1_234_567
    r = _request((BIG, BIG, BIG), (True, True, True), estimate=est, tokens=7)
    s = (BIG - 10 * est, 8_999_999_999_999_999 - 3 * est, 0)
    h = (5 * est, 1, 0)
    text = _answer(redis_url, r, [(s[0], h[0]), (s[1], h[1]), (None, None)])
    pid = r.permit_id
    assert text == (
        f'{{"d":"ALLOW","pid":"{pid}","exp":600000,"amt":{est},"k":7,"c":1,'
        f'"b":[[{s[0]},{h[0] + est}],[{s[1]},{h[1] + est}],[0,{est}]],"held":[1,2,3]}}')


def test_a_denial_names_the_failing_budget_and_holds_nothing(redis_url: str) -> None:
    r = _request((1_000_000_000_000_000,), (True,), estimate=500, tokens=3)
    text = _answer(redis_url, r, [(1_000_000_000_000_000 - 499, 0)])
    assert text == (
        f'{{"d":"DENY","pid":"{r.permit_id}","exp":600000,"amt":500,"k":3,"c":1,'
        '"b":[[999999999999501,0]],"held":[],"fail":1}')


def test_an_observe_budget_over_its_limit_is_a_shadow(redis_url: str) -> None:
    r = _request((10**12, 1_000), (True, False), estimate=600, tokens=9)
    text = _answer(redis_url, r, [(None, None), (500, None)])
    assert text == (
        f'{{"d":"ALLOW","pid":"{r.permit_id}","exp":600000,"amt":600,"k":9,"c":1,'
        '"b":[[0,600],[500,600]],"held":[1,2],"shadow":[2]}')


def test_grants_and_a_constrained_hold_in_some_budgets(redis_url: str) -> None:
    # Budget 2 of 4 is not the candidate's; budget 1 has 2,500 of room with a
    # 1,000 grant: 2 tokens at 1,000 each fit, not the 5 asked for.
    r = _request((1_500, 10**15, 10**15, 10**15), (True, True, True, True), estimate=5_000,
                 tokens=5, out_price=1_000 * 1_000_000, may_constrain=True, indexes=(0, 2, 3))
    text = _answer(redis_url, r, [(0, None), (7, 8), (12_345_678_901_234, 3), (None, None)],
                   grants=(1_000, 0, 0, 0))
    assert text == (
        f'{{"d":"CONSTRAIN","pid":"{r.permit_id}","exp":600000,"amt":2000,"k":2,"c":1,'
        '"b":[[0,2000],[7,8],[12345678901234,2003],[0,2000]],"held":[1,3,4],'
        '"gr":[1000,0,0,0]}')
