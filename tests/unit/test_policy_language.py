"""Budget hierarchies, several windows, thresholds, price history and tiers,
routing modes and exception grants, one body over fakeredis and real Redis."""

from __future__ import annotations

import json
import os
import pathlib
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp import grants
from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, InvalidRequest
from keel_pdp.decision import plan as _plan
from keel_pdp.engine import Engine
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import PRICES, budget, make_engine, read_stream, write_bundle


def req(rid: str = "r1", model: str = "gpt-4.1", tin: int = 1000, tout: int = 500,
        workload: str = "chat", tenant: str = "acme") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, model, "openai", tin, tout)


async def stream(engine: Engine) -> list[dict[str, Any]]:
    client: Any = engine.store.client
    raw = await read_stream(client, engine.store.keys.stream)
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]


def _ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp() * 1000)


async def test_several_windows_on_one_scope_each_hold_and_block(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [{
        "id": "acme", "scope": {"tenant": "acme"},
        "limits": [{"window": "hourly", "cap_usd": "0.010000"},
                   {"window": "daily", "cap_usd": "1.00"},
                   {"window": "monthly", "cap_usd": "30.00"}]}],
        settings={"allow_constrain": False})
    engine = make_engine(aio_client, d)
    first = await engine.authorize(req())  # 1000*2 + 500*8 = 6000 micros
    assert first.decision is DecisionKind.ALLOW
    assert [h.budget_id for h in first.holds] == ["acme.daily", "acme.hourly", "acme.monthly"]
    assert {h.window for h in first.holds} == {"hourly", "daily", "monthly"}
    second = await engine.authorize(req("r2"))
    assert second.decision is DecisionKind.DENY
    assert second.reasons[0].budget_id == "acme.hourly"


async def test_threshold_crossing_emits_one_alert_per_window(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("acme", "0.020000", scope={"tenant": "acme"},
                                       thresholds=[50, 80])])
    engine = make_engine(aio_client, d)
    codes = []
    for i in range(3):  # 6000 micros each: 30%, 60% (crosses 50), 90% (crosses 80)
        out = await engine.authorize(req(f"r{i}"))
        codes.append([r.code for r in out.reasons])
    assert codes == [[], [Code.BUDGET_THRESHOLD_CROSSED], [Code.BUDGET_THRESHOLD_CROSSED]]
    alerts = [json.loads(e["res"]) for e in await stream(engine) if e["type"] == "alert"]
    assert [a["pct"] for a in alerts] == [50, 80]
    # Falling back under a threshold (a void) and crossing again does not re-alert.
    assert engine.metrics.threshold_crossings._value.get() == 2
    last = await engine.authorize(req("r9", tout=1))
    await engine.void(last.permit_id)
    assert len([e for e in await stream(engine) if e["type"] == "alert"]) == 2


def test_price_history_prices_a_request_by_when_it_ran(tmp_path: pathlib.Path) -> None:
    prices = {"openai": {"gpt-4.1": [
        {"input": "2.00", "output": "8.00", "max_output_tokens": 100},
        {"input": "1.00", "output": "4.00", "max_output_tokens": 100,
         "effective_from": "2026-12-01"}]}}
    snap = load_bundle(write_bundle(tmp_path, [budget("b", "10")], prices=prices))
    before = _plan(snap, req(), _ms(2026, 11, 30, 23, 59), "pmt_a")
    after = _plan(snap, req(), _ms(2026, 12, 1, 0, 0), "pmt_b")
    assert before.estimate_micros == 1000 * 2 + 500 * 8
    assert after.estimate_micros == 1000 * 1 + 500 * 4


def test_price_history_must_be_dated_in_order(tmp_path: pathlib.Path) -> None:
    prices = {"openai": {"gpt-4.1": [
        {"input": "2.00", "output": "8.00", "effective_from": "2026-12-01"},
        {"input": "1.00", "output": "4.00", "effective_from": "2026-11-01"}]}}
    with pytest.raises(PolicyError, match=r"providers\.openai\.gpt-4\.1"):
        load_bundle(write_bundle(tmp_path, [budget("b", "10")], prices=prices))


async def test_context_tier_prices_long_inputs_at_the_higher_rate(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    prices = {"anthropic": {"claude-sonnet-4-5": {
        "input": "3.00", "output": "15.00", "cached_input": "0.30", "cache_write": "3.75",
        "max_output_tokens": 100,
        "tiers": [{"above_input_tokens": 200000, "input": "6.00", "output": "22.50",
                   "cached_input": "0.60", "cache_write": "7.50"}]}}}
    d = write_bundle(tmp_path, [budget("b", "100")], prices=prices)
    engine = make_engine(aio_client, d)
    short = await engine.authorize(AuthorizeInput("s", "acme", "w", "claude-sonnet-4-5",
                                                  "anthropic", 200_000, 100))
    long = await engine.authorize(AuthorizeInput("l", "acme", "w", "claude-sonnet-4-5",
                                                 "anthropic", 200_001, 100))
    assert short.estimated_cost_micros == 200_000 * 3 + 100 * 15
    assert long.estimated_cost_micros == 200_001 * 6 + 2_250  # 100 x $22.50/M
    # Closeout picks the tier from the reported usage.
    res = await engine.closeout(short.permit_id, TokenUsage(250_000, 50_000, 0, 10),
                                "SUCCEEDED", None)
    # fresh 200,000 x 6 + cached 50,000 x 0.6 + 10 x 22.5 = 1,230,225 (225 exactly)
    assert res.actual_cost_micros == 1_230_225


async def test_enforce_rule_reroutes_down_the_chain_when_the_budget_is_short(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [
        budget("premium", "0.001000", scope={"tenant": "acme", "model": "gpt-4.1"}),
        budget("tenant", "1.00", scope={"tenant": "acme"}),
    ], routes=[{"id": "chat", "scope": {"workload": "chat"},
                "allowed_models": ["openai/gpt-4.1", "openai/gpt-4o-mini"],
                "downgrade": ["openai/gpt-4.1", "openai/gpt-4o-mini"]}],
        settings={"allow_constrain": False})
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.CONSTRAIN
    assert (out.provider, out.model) == ("openai", "gpt-4o-mini")
    assert out.reasons[0].code is Code.MODEL_REROUTED
    assert out.estimated_cost_micros == 450  # 1000 x 0.15 + 500 x 0.60
    assert [h.budget_id for h in out.holds] == ["tenant"]  # premium does not apply to mini
    res = await engine.closeout(out.permit_id, TokenUsage(1000, 0, 0, 500), "SUCCEEDED", None)
    assert res.actual_cost_micros == 450  # priced as the model that ran
    data = json.loads((await stream(engine))[0]["data"])
    assert [c["m"] for c in data["cands"]] == ["gpt-4.1", "gpt-4o-mini"]


async def test_prefer_cheap_picks_the_cheapest_allowed_model_of_the_chain(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("t", "1")], routes=[
        {"id": "cheap", "scope": {"tenant": "acme"}, "mode": "prefer-cheap",
         "downgrade": ["openai/gpt-4.1", "openai/gpt-4o-mini"]}])
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.CONSTRAIN
    assert out.model == "gpt-4o-mini"
    assert out.reasons[0].code is Code.MODEL_REROUTED
    assert "prefers the cheapest" in out.reasons[0].message


async def test_observe_rule_never_blocks_and_records_what_would_have_happened(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("tiny", "0.000001", scope={"tenant": "acme"})],
                     routes=[{"id": "watch", "scope": {"tenant": "acme"}, "mode": "observe",
                              "allowed_models": ["openai/gpt-4o-mini"]}])
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.ALLOW
    codes = [r.code for r in out.reasons]
    assert Code.SHADOW_MODEL_NOT_ALLOWED in codes
    assert Code.SHADOW_BUDGET_EXCEEDED in codes
    assert out.holds[0].held_micros == 6000  # the spend is still counted


async def test_exception_grant_raises_the_cap_until_it_expires(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(
        tmp_path, [budget("acme", "0.010000", per=["tenant"], exception_path="finance-overage")],
        exception_paths=[{"name": "finance-overage", "approver_role": "finance-owner",
                          "max_overage_usd": "5.00", "max_duration_hours": 24}],
        settings={"allow_constrain": False})
    engine = make_engine(aio_client, d)
    snap = engine.policies.current
    assert snap is not None
    assert (await engine.authorize(req("a"))).decision is DecisionKind.ALLOW
    denied = await engine.authorize(req("b"))
    assert denied.decision is DecisionKind.DENY
    assert denied.reasons[0].exception_path == "finance-overage"

    def g(**kw: Any) -> grants.GrantRequest:
        base: dict[str, Any] = dict(
            exception_path="finance-overage", budget_id="acme", scope=(("tenant", "acme"),),
            amount_micros=1_000_000, duration_seconds=3600, approver="Dana Finance",
            approver_role="finance-owner", justification="Quarter-end batch re-run approved")
        base.update(kw)
        return grants.GrantRequest(**base)

    with pytest.raises(InvalidRequest, match="maximum overage"):
        await grants.record(engine.store, snap, g(amount_micros=6_000_000))
    with pytest.raises(grants.GrantForbidden, match="finance-owner"):
        await grants.record(engine.store, snap, g(approver_role="platform-lead"))
    with pytest.raises(InvalidRequest, match="per-dimensions"):
        await grants.record(engine.store, snap, g(scope=()))
    # An already expired grant changes nothing.
    old = await grants.record(engine.store, snap, g(grant_id="old"),
                              now_ms=_ms(2020, 1, 1))
    assert old.created
    assert (await engine.authorize(req("c"))).decision is DecisionKind.DENY
    res = await grants.record(engine.store, snap, g(grant_id="q4"))
    assert res.created
    again = await grants.record(engine.store, snap, g(grant_id="q4"))
    assert not again.created
    ok = await engine.authorize(req("d"))
    assert ok.decision is DecisionKind.ALLOW
    assert Code.EXCEPTION_GRANT_APPLIED in [r.code for r in ok.reasons]
    assert ok.holds[0].limit_micros == 10_000 + 1_000_000
    # Another tenant's counter gets no raise from acme's grant.
    assert (await engine.authorize(req("e", tenant="globex"))).decision is DecisionKind.ALLOW
    assert (await engine.authorize(req("f", tenant="globex"))).decision is DecisionKind.DENY
    types = [e["type"] for e in await stream(engine)]
    assert types.count("grant") == 2


def test_parent_must_exist_contain_the_child_and_not_cycle(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [
        budget("org", "100"),
        budget("acme", "10", scope={"tenant": "acme"}, parent="org"),
        budget("acme-chat", "5", scope={"tenant": "acme", "workload": "chat"}, parent="acme"),
        budget("stray", "5", scope={"tenant": "globex"}, parent="acme"),
        budget("lost", "5", parent="nope"),
        budget("a", "5", parent="b"), budget("b", "5", parent="a"),
    ])
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path)
    text = "\n".join(str(p) for p in info.value.problems)
    assert "budgets.3.parent: scope is not inside the scope of parent 'acme'" in text
    assert "budgets.4.parent: parent budget 'nope' is not defined" in text
    assert "cycle" in text
    assert "budgets.1.parent" not in text and "budgets.2.parent" not in text


def test_reload_follows_a_configmap_symlink_swap_and_keeps_last_good(
        tmp_path: pathlib.Path) -> None:
    # Kubernetes mounts ConfigMaps as files that point through a ..data symlink
    # which is swapped atomically; mtimes of the visible files do not change.
    root = tmp_path / "cm"
    root.mkdir()
    v1 = write_bundle(root / "..v1", [budget("b", "1")], revision="r1")
    v2 = write_bundle(root / "..v2", [budget("b", "2")], revision="r2")
    bad = root / "..v3"
    bad.mkdir()
    (bad / "bundle.yaml").write_text("apiVersion: keel.pdp/v1\nkind: Bundle\n")
    os.symlink(v1.name, root / "..data")
    for name in ("bundle.yaml", "prices.yaml", "budgets.yaml"):
        os.symlink(f"..data/{name}", root / name)
    holder = PolicyHolder(root)
    assert holder.reload()
    assert holder.current is not None
    assert holder.current.revision == "r1"
    assert not holder.reload()  # same content: nothing to do

    def swap(target: pathlib.Path) -> None:
        os.symlink(target.name, root / "..tmp")
        os.replace(root / "..tmp", root / "..data")

    swap(v2)
    assert holder.reload()
    assert holder.current.revision == "r2"
    swap(bad)
    assert not holder.reload()
    assert holder.current.revision == "r2"
    assert holder.last_error is not None
    assert any("revision" in str(p) or "cannot read" in str(p) or "Field required" in str(p)
               for p in holder.last_error.problems)


def test_default_prices_fixture_is_valid() -> None:
    assert "openai" in PRICES
