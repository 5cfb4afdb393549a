"""The budget store behaves the same over the RESP client and over redis-py.

One engine scenario (hold, replay, settle, settle again, void of an unknown
permit, expiry sweep, outbox record) runs over both clients of
``BudgetStore.from_url``; every answer must match.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import redis

from keel_pdp.budget.resp import RespClient
from keel_pdp.budget.store import BudgetStore, RedisPyTransport
from keel_pdp.decision import AuthorizeInput
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, write_bundle


async def scenario(redis_url: str, bundle: pathlib.Path, client: str) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushall()
    store = BudgetStore.from_url(redis_url, prefix="t", timeout_s=1.0, client=client)
    expected = RespClient if client == "resp" else RedisPyTransport
    assert isinstance(store.transport, expected)
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    engine = Engine(holder, store, Metrics())
    try:
        req = AuthorizeInput("r1", "acme", "chat", "gpt-4o-mini", "openai", 1000, 500)
        first = await engine.authorize(req)
        again = await engine.authorize(req)
        usage = TokenUsage(input_tokens=1000, cached_input_tokens=800, output_tokens=100)
        settled = await engine.closeout(first.permit_id, usage, "SUCCEEDED", None)
        twice = await engine.closeout(first.permit_id, usage, "SUCCEEDED", None)
        unknown = await engine.void("pmt_" + "0" * 28)
        swept = await engine.sweep_once()
        window_key = next(iter(redis.Redis.from_url(redis_url).scan_iter("t:*:b:*")))
        return {
            "decision": str(first.decision), "estimate": first.estimated_cost_micros,
            "holds": [(h.budget_id, h.held_micros, h.settled_micros) for h in first.holds],
            "replayed": (again.replayed, again.permit_id == first.permit_id),
            "settled": (settled.status, settled.actual_cost_micros, settled.correction_micros),
            "twice": twice.status, "unknown": unknown.status, "swept": swept,
            "window": await store.window(window_key.decode()),
            "ping": await store.ping(),
        }
    finally:
        await store.close()


async def test_both_clients_give_the_same_answers(redis_url: str,
                                                  tmp_path: pathlib.Path) -> None:
    bundle = write_bundle(tmp_path / "b", [budget("acme-daily", "1.00",
                                                  scope={"tenant": "acme"})])
    resp = await scenario(redis_url, bundle, "resp")
    redis_py = await scenario(redis_url, bundle, "redis-py")
    assert resp == redis_py
    assert resp["decision"] == "ALLOW"
    assert resp["replayed"] == (True, True)
    assert resp["settled"][0] == "SETTLED" and resp["twice"] == "ALREADY_SETTLED"
    assert resp["ping"] is True


def test_an_unknown_client_name_is_refused() -> None:
    with pytest.raises(ValueError, match="resp or redis-py"):
        BudgetStore.from_url("redis://127.0.0.1:1/0", client="hiredis")
