"""A retry that receives a hold whose first answer was lost keeps that hold.

Sidecar A sends the hold script; the script runs in Redis, but its reply does not
come back in time. A answers by the budget's fail mode (fail-open: a degraded
permit) and journals an abort for the permit id it had sent. Before that abort
reaches Redis, the caller retries the same request on sidecar B, whose script
replays the hold: B's caller now holds that permit and will call the provider
under it. The abort must leave it held. Releasing it would let that provider
call run with nothing reserved for it (the budget's room handed to others), and
its Closeout would be booked "after void".

The other order, the abort first, still releases the hold and drops the
request's idempotency record, so the retry is decided afresh.
"""

from __future__ import annotations

import json
import pathlib
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import redis

from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import PRICES, budget, write_bundle

pytestmark = pytest.mark.redis


USAGE = TokenUsage(input_tokens=900, output_tokens=400)
# What USAGE costs by the fixture price table (USD per million tokens = micro-USD per
# token), worked out here, not by the pricing code: 900 x 0.15 + 400 x 0.60 = 375.
_P = PRICES["openai"]["gpt-4o-mini"]
COST = int((USAGE.input_tokens * Decimal(_P["input"]) + USAGE.output_tokens
            * Decimal(_P["output"])).to_integral_value(rounding=ROUND_CEILING))


def _engine(redis_url: str, bundle: pathlib.Path) -> Engine:
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, BudgetStore.from_url(redis_url, prefix="rb", timeout_s=2.0),
                  Metrics())


def _window(r: Any) -> tuple[int, int]:
    (key,) = list(r.scan_iter("rb:*:b:team:*"))
    s, h = r.hmget(key, "s", "h")
    return int(s or 0), int(h or 0)


@pytest.mark.parametrize("first", ["the retry", "the abort"])
async def test_a_hold_handed_out_by_a_replay_survives_the_late_abort(
        redis_url: str, tmp_path: pathlib.Path, first: str) -> None:
    bundle = write_bundle(tmp_path / "b", [budget("team", "10.00", per=["tenant"],
                                                  fail_mode="open")])
    a, b = _engine(redis_url, bundle), _engine(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    req = AuthorizeInput("retry-1", "acme", "chat", "gpt-4o-mini", "openai", 1000, 500)

    # A: the script runs in Redis, its reply is lost.
    real_eval = a.store.transport.eval_script

    async def lost_reply(*args: Any, **kw: Any) -> Any:
        await real_eval(*args, **kw)
        raise TimeoutError("the reply did not come back in time")

    a.store.transport.eval_script = lost_reply  # type: ignore[method-assign]
    # A's abort waits until the test lets it through (the store "slow" for it).
    gate = {"open": first == "the abort"}
    real_abort = a.store.abort

    async def gated_abort(*args: Any, **kw: Any) -> Any:
        if not gate["open"]:
            raise StoreUnavailable("not yet")
        return await real_abort(*args, **kw)

    a.store.abort = gated_abort  # type: ignore[method-assign]
    try:
        got_a = await a.authorize(req)
        assert got_a.degraded and got_a.decision is DecisionKind.ALLOW
        (held_key,) = [k for k in r.scan_iter("rb:*:permit:*")
                       if r.hget(k, "state") == b"held"]
        held_pid = held_key.decode().rsplit(":", 1)[1]
        assert held_pid != got_a.permit_id
        amount = int(r.hget(held_key, "amount"))
        assert _window(r) == (0, amount)

        if first == "the abort":
            await a.flush_outbox()
        got_b = await b.authorize(req)
        assert got_b.decision is DecisionKind.ALLOW and not got_b.degraded

        gate["open"] = True
        a.store.transport.eval_script = real_eval  # type: ignore[method-assign]
        await a.flush_outbox()
        assert a.outbox_len == 0

        usage = USAGE
        if first == "the retry":
            # B handed out the very hold A had made; the abort left it held.
            assert got_b.replayed and got_b.permit_id == held_pid
            assert r.hget(held_key, "state") == b"held"
            assert _window(r)[1] == amount
            done = await b.closeout(got_b.permit_id, usage, "SUCCEEDED", None)
            assert done.status == "SETTLED"
            settled, held = _window(r)
            assert held == 0 and settled == done.actual_cost_micros == COST
            types = [(f[b"type"], f[b"pid"].decode()) for _, f in r.xrange("rb:{pdp}:events")]
            assert (b"void", held_pid) not in types  # never released
            assert a.metrics.holds_aborted.labels("noop")._value.get() == 1
        else:
            # The abort came first: the hold was released, the retry decided afresh.
            assert not got_b.replayed and got_b.permit_id != held_pid
            assert r.hget(held_key, "state") == b"voided"
            voids = [json.loads(f[b"data"]) for _, f in r.xrange("rb:{pdp}:events")
                     if f[b"type"] == b"void" and f[b"pid"].decode() == held_pid]
            assert len(voids) == 1 and voids[0]["reason"].startswith("aborted")
            done = await b.closeout(got_b.permit_id, usage, "SUCCEEDED", None)
            assert done.status == "SETTLED"
            settled, held = _window(r)
            assert held == 0 and settled == done.actual_cost_micros == COST
    finally:
        await a.store.close()
        await b.store.close()
