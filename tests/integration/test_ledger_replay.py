"""Policy replay: the period's recorded requests re-decided under a candidate bundle."""

from __future__ import annotations

import pathlib
from typing import Any

import redis.asyncio as aioredis

from keel_pdp.cli import main
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.periods import period_of_ms
from keel_pdp.ledger.replay import replay
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.policy.loader import load_bundle
from keel_pdp.pricing import Price, TokenUsage, usage_cost_micros
from tests.helpers import budget, make_engine, write_bundle
from tests.integration.conftest import drain, ledger_bundle, make_writer

MINI = Price(150_000, 75_000, 150_000, 600_000)


async def record_traffic(redis_url: str, store: LedgerStore, tmp_path: pathlib.Path) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    engine = make_engine(client, ledger_bundle(tmp_path / "a"))
    usages: dict[str, TokenUsage] = {}
    spend: dict[str, int] = {}

    async def call(rid: str, tenant: str, workload: str, model: str, *, run: str = "settle",
                   tin: int = 1000, tout: int = 200) -> None:
        out = await engine.authorize(AuthorizeInput(rid, tenant, workload, model, "openai",
                                                    tin, tout))
        if out.decision is DecisionKind.DENY:
            return
        if run == "settle":
            usage = TokenUsage(tin, tin // 2, 0, tout // 2)
            res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
            usages[rid] = usage
            spend[rid] = res.actual_cost_micros
        elif run == "void":
            await engine.void(out.permit_id, "")
            spend[rid] = 0
        else:
            spend[rid] = out.estimated_cost_micros

    for i in range(6):
        await call(f"acme-{i}", "acme", "chat", "gpt-4o-mini")
        await call(f"gx-chat-{i}", "globex", "chat", "gpt-4o-mini",
                   run=("settle", "void", "open")[i % 3])
        await call(f"gx-search-{i}", "globex", "search", "gpt-4.1")
    await call("gx-denied", "globex", "restricted", "gpt-4.1")  # denied by routing rule
    drain(make_writer(redis_url, store))
    await client.aclose()
    return usages, spend


async def test_replay_reports_denials_reroutes_and_spend_difference(
        store_url: str, redis_url: str, tmp_path: pathlib.Path) -> None:
    store = LedgerStore(store_url)
    store.migrate()
    usages, spend = await record_traffic(redis_url, store, tmp_path)
    # Candidate: acme gets a zero cap; globex search must fall back to the mini;
    # the routing rule that denied the restricted workload is gone.
    candidate = write_bundle(
        tmp_path / "b",
        [budget("org-monthly", "1000.00", window="monthly"),
         budget("acme-zero", "0", scope={"tenant": "acme"})],
        routes=[{"id": "search-cheap", "scope": {"workload": "search"},
                 "downgrade": ["openai/gpt-4.1", "openai/gpt-4o-mini"],
                 "mode": "prefer-cheap"}])
    period = period_of_ms(int(store.query("SELECT MAX(ts_ms) FROM ledger_events")[0][0]))
    result = replay(store, period, load_bundle(candidate))
    acme = result.groups[("acme", "chat")]
    assert acme.requests == 6 and acme.baseline["ALLOW"] == 6
    assert acme.candidate["DENY"] == 6 and acme.newly_denied == 6
    assert acme.candidate_spend == 0
    assert acme.baseline_spend == sum(v for k, v in spend.items() if k.startswith("acme"))
    assert acme.difference == -acme.baseline_spend
    chat = result.groups[("globex", "chat")]
    # Unchanged policy for this workload: same decisions, same cost, to the micro.
    assert chat.candidate == chat.baseline and chat.difference == 0
    assert chat.baseline_spend == sum(v for k, v in spend.items() if k.startswith("gx-chat"))
    search = result.groups[("globex", "search")]
    assert search.rerouted == 6 and search.candidate["CONSTRAIN"] == 6
    assert search.candidate_spend == sum(usage_cost_micros(MINI, usages[f"gx-search-{i}"])
                                         for i in range(6))
    assert search.difference < 0
    denied = result.groups[("globex", "restricted")]
    assert denied.baseline["DENY"] == 1 and denied.newly_allowed == 1
    assert denied.candidate_spend == (1000 * 2_000_000 + 200 * 8_000_000) // 1_000_000
    assert result.total.difference == sum(t.difference for t in result.groups.values())
    assert main(["policy", "replay", "--store", store_url, "--period", period, "--candidate",
                 str(candidate), "--format", "csv"]) == 0
    assert main(["replay", "--store", store_url, "--period", period, "--candidate",
                 str(tmp_path / "missing")]) == 1
    store.close()
