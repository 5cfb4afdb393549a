"""The hold script's integer arithmetic, in real Redis Lua (doubles only),
against the exact Python reference, including the largest supported figures."""

from __future__ import annotations

import asyncio
import itertools

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.replies import HoldReply
from keel_pdp.budget.store import BudgetStore, HoldCandidate, HoldRequest, hold_shape
from keel_pdp.pricing import (
    MAX_PRICE_PICO_PER_TOKEN,
    MAX_TOKENS,
    Price,
    estimate_cost_micros,
    max_output_tokens_within,
)

_counter = itertools.count()


def _hold(pin: int, pout: int, tin: int, tout: int, limit: int, settled: int,
          min_out: int) -> HoldRequest:
    i = next(_counter)
    return HoldRequest(
        permit_id=f"pmt_{i:028x}", idempotency_key=f"x:req:{i}", fingerprint="f", now_ms=1,
        expires_at_ms=600_000, event_data="{}",
        shape=hold_shape((f"x:win:{i}",), (f"x:grant:{i}",), (limit,), (True,),
                         (4_000_000_000,), ((50, 80, 100),), idempotency_ttl_s=60,
                         permit_retention_s=60, min_output_tokens=min_out),
        # the plan's full estimate, rounded up to the micro-USD
        candidates=(HoldCandidate(tin * pin, pout, tout, True, "{}", (0,),
                                  -(-(tin * pin + tout * pout) // 1_000_000)),))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pin=st.integers(0, MAX_PRICE_PICO_PER_TOKEN),
    pout=st.integers(0, MAX_PRICE_PICO_PER_TOKEN),
    tin=st.integers(0, MAX_TOKENS),
    tout=st.integers(0, MAX_TOKENS),
    limit=st.one_of(st.integers(0, 10**7), st.integers(0, 10**15)),
    settled_frac=st.integers(0, 100),
    min_out=st.integers(0, 1000),
)
def test_hold_script_matches_python_reference(
        redis_url: str, pin: int, pout: int, tin: int, tout: int, limit: int,
        settled_frac: int, min_out: int) -> None:
    settled = limit * settled_frac // 100
    price = Price(pin, pin, pin, pout)

    async def run() -> HoldReply:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = BudgetStore(client, KeySpace("x"), timeout_s=2.0)
            r = _hold(pin, pout, tin, tout, limit, settled, min_out)
            await client.hset(r.shape.keys[0], "s", settled)
            return await store.hold(r)
        finally:
            await client.aclose()

    res = asyncio.run(run())
    headroom = limit - settled
    full = estimate_cost_micros(price, tin, tout)
    if full <= headroom:
        assert (res.decision, res.amount_micros, res.max_output_tokens) == ("ALLOW", full, tout)
        return
    k = min(max_output_tokens_within(price, tin, headroom), tout)
    if k >= min_out and k >= 0:
        assert res.decision == "CONSTRAIN", (res, k)
        assert res.max_output_tokens == k
        assert res.amount_micros == estimate_cost_micros(price, tin, k) <= headroom
    else:
        assert res.decision == "DENY", res
        assert res.amount_micros == full
