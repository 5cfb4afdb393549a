"""Stream events produced by the real engine and Lua scripts (over fakeredis and a
real Redis), parsed and turned into ledger entries."""

from __future__ import annotations

import json
import pathlib
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.store import StoreUnavailable
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.ledger.events import EntryRow, ParseError, as_int, derive, parse_entry
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle

STREAM = "t:{pdp}:events"
USAGE = TokenUsage(input_tokens=100, cached_input_tokens=20, output_tokens=50)


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    bundle = write_bundle(
        tmp_path / "b",
        [budget("acme-daily", "0.000100", scope={"tenant": "acme"}),
         budget("all-monthly", "100.00", window="monthly", mode="observe")],
        routes=[{"id": "only-mini", "scope": {"workload": "locked"},
                 "allowed_models": ["openai/gpt-4o-mini"]}])
    return make_engine(aio_client, bundle)


def ask(rid: str, tin: int = 100, tout: int = 100, tenant: str = "acme",
        workload: str = "chat", model: str = "gpt-4o-mini") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, model, "openai", tin, tout)


async def events(engine: Engine) -> list[tuple[str, dict[bytes, bytes]]]:
    raw: Any = await read_stream(engine.store.client, STREAM)
    return [(i.decode(), f) for i, f in raw]


async def rows_by_kind(engine: Engine) -> dict[str, list[EntryRow]]:
    out: dict[str, list[EntryRow]] = {}
    for eid, fields in await events(engine):
        for row in derive(parse_entry(eid, fields))[0]:
            out.setdefault(row.kind, []).append(row)
    return out


async def test_allow_and_settle_book_estimate_then_correction_to_actual(engine: Engine) -> None:
    out = await engine.authorize(ask("r1", tout=50))
    assert out.decision is DecisionKind.ALLOW
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None)
    (eid, fields), (sid, sfields) = await events(engine)
    rows, budgets = derive(parse_entry(eid, fields))
    (permit,) = rows
    assert (permit.kind, permit.decision, permit.status) == ("permit", "ALLOW", "HELD")
    assert permit.held_micros == permit.amount_micros == out.estimated_cost_micros
    assert (permit.dims.tenant, permit.dims.workload, permit.dims.model) == (
        "acme", "chat", "gpt-4o-mini")
    assert permit.policy_revision == out.policy_revision
    assert permit.price_revision == out.price_revision
    assert permit.price_pico == (150_000, 75_000, 150_000, 600_000)
    assert [b.budget_id for b in budgets] == ["acme-daily", "all-monthly"]
    assert budgets[0].held_micros == out.estimated_cost_micros and budgets[0].settled_micros == 0
    assert budgets[0].limit_micros == 100 and budgets[1].mode == "observe"
    settle, corr = derive(parse_entry(sid, sfields))[0]
    assert settle.kind == "settlement" and settle.amount_micros == 0
    assert settle.actual_micros == res.actual_cost_micros
    assert (settle.input_tokens, settle.cached_input_tokens, settle.output_tokens) == (
        100, 20, 50)
    assert corr.kind == "correction"
    assert corr.amount_micros == res.actual_cost_micros - out.estimated_cost_micros
    assert permit.amount_micros + corr.amount_micros == res.actual_cost_micros


async def test_constrain_and_budget_denial_carry_the_budget_state(engine: Engine) -> None:
    c = await engine.authorize(ask("r1", tout=500))
    assert c.decision is DecisionKind.CONSTRAIN
    d = await engine.authorize(ask("r2", tout=500))
    assert d.decision is DecisionKind.DENY
    kinds = await rows_by_kind(engine)
    (permit,) = kinds["permit"]
    assert permit.decision == "CONSTRAIN" and permit.max_output_tokens == c.max_output_tokens
    (denial,) = kinds["denial"]
    assert denial.reason == "BUDGET_EXHAUSTED" and denial.amount_micros == 0
    assert denial.detail["requested_micros"] == d.estimated_cost_micros
    eid, fields = next((i, f) for i, f in await events(engine)
                       if f[b"type"] == b"decision" and f[b"pid"] == d.permit_id.encode())
    _, budgets = derive(parse_entry(eid, fields))
    assert [b.failed for b in budgets] == [True, False]
    assert budgets[0].held_micros == c.estimated_cost_micros  # as read at the denial


async def test_policy_denial_names_the_rule(engine: Engine) -> None:
    out = await engine.authorize(ask("r1", workload="locked", model="gpt-4.1"))
    assert out.decision is DecisionKind.DENY
    (denial,) = (await rows_by_kind(engine))["denial"]
    assert denial.reason == "MODEL_NOT_ALLOWED"
    assert denial.detail["reasons"][0]["rule_id"] == "only-mini"


async def test_void_expiry_and_late_settlements_net_to_the_actual(engine: Engine) -> None:
    v = await engine.authorize(ask("v", tenant="globex"))
    await engine.void(v.permit_id, "not needed")
    x = await engine.authorize(ask("x", tenant="globex"))
    await engine.sweep_once(x.expires_at_ms + 1)
    late = await engine.closeout(x.permit_id, USAGE, "SUCCEEDED", 999)
    assert late.status == "SETTLED_AFTER_EXPIRY"
    kinds = await rows_by_kind(engine)
    (void,) = kinds["void"]
    (expiry,) = kinds["expiry"]
    assert void.amount_micros == -v.estimated_cost_micros and void.reason == "not needed"
    assert expiry.amount_micros == -x.estimated_cost_micros
    (corr,) = kinds["correction"]
    assert corr.amount_micros == 999 and corr.held_micros == 0
    per_permit: dict[str, int] = {}
    for rows in kinds.values():
        for r in rows:
            per_permit[r.permit_id] = per_permit.get(r.permit_id, 0) + r.amount_micros
    assert per_permit == {v.permit_id: 0, x.permit_id: 999}


async def test_decisions_taken_without_the_store_are_unheld_and_settle_in_full(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("test: store down")

    monkeypatch.setattr(engine.store, "hold", down)
    out = await engine.authorize(ask("r1", tenant="globex", tout=50))
    assert out.decision is DecisionKind.ALLOW and out.degraded
    monkeypatch.undo()
    assert await engine.flush_outbox() == 2  # the abort of the hold script, the decision
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None)
    kinds = await rows_by_kind(engine)
    (permit,) = kinds["permit"]
    assert permit.degraded and permit.held_micros == 0 and permit.status == "DEGRADED"
    assert permit.estimate_micros > 0
    (corr,) = kinds["correction"]
    assert corr.amount_micros == res.actual_cost_micros


def fields(**kw: Any) -> dict[bytes, bytes]:
    base = {"type": "void", "pid": "pmt_0000000000010000000000000000", "ts": "1000",
            "data": "{}", "res": json.dumps({"st": "RELEASED", "amt": 5, "state": "voided"})}
    base.update(kw)
    return {k.encode(): str(v).encode() for k, v in base.items()}


@pytest.mark.parametrize(("change", "reason"), [
    ({"type": "nope"}, "unknown event type"),
    ({"ts": "12.5"}, "not epoch milliseconds"),
    ({"res": "[]"}, "not a JSON object"),
    ({"res": '{"st":"RELEASED","amt":5.5}'}, "expected an integer"),
    ({"res": '{"st":"RELEASED","amt":true}'}, "boolean"),
    ({"res": '{"st":"RELEASED"}'}, "res.amt is missing"),
    ({"res": '{"st":"RELEASED","amt":5,"state":"expired"}'}, "does not match"),
    ({"type": "settlement", "res": '{"st":"SETTLED","act":1,"amt":1,"prior":"held"}'},
     "data.usage is missing"),
    ({"type": "decision", "data": '{"tenant":"a"}', "res": '{"d":"MAYBE","amt":0}'},
     "res.d"),
])
def test_entries_that_break_the_contract_are_rejected_with_a_reason(
        change: dict[str, str], reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse_entry("1-0", fields(**change))
    with pytest.raises(ParseError, match="no fields"):
        parse_entry("1-0", None)


def test_large_integers_written_in_exponent_form_stay_exact() -> None:
    # Lua's cjson prints numbers with 14 significant digits, e.g. 1e+14.
    ev = parse_entry("1-0", fields(res='{"st":"RELEASED","amt":1e+14,"state":"voided"}'))
    assert derive(ev)[0][0].held_micros == 100_000_000_000_000
    assert as_int(Decimal("120"), "x") == 120
    with pytest.raises(ParseError):
        as_int(Decimal("1.5e0"), "x")


def test_events_belong_to_the_month_their_permit_was_issued_in() -> None:
    # Permit issued 2026-01-31T23:59:59.999Z, voided on 2026-02-01.
    pid = f"pmt_{1_769_903_999_999:012x}" + "0" * 16
    ev = parse_entry("1-0", fields(pid=pid, ts="1769904500000"))
    assert ev.belongs_to == "2026-01"
    assert parse_entry("1-0", fields(pid="legacy", ts="1769904500000")).belongs_to == "2026-02"


async def test_reroute_alert_and_exception_grant(aio_client: aioredis.Redis,
                                                 tmp_path: pathlib.Path) -> None:
    from keel_pdp import grants

    bundle = write_bundle(
        tmp_path / "r",
        [budget("acme-daily", "0.001000", scope={"tenant": "acme"}, thresholds=[50],
                exception_path="finance-overage")],
        routes=[{"id": "chat-chain", "scope": {"workload": "chat"},
                 "downgrade": ["openai/gpt-4.1", "openai/gpt-4o-mini"]}],
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "1.00"}])
    engine = make_engine(aio_client, bundle)
    # gpt-4.1 would need 0.0072 USD: the hold falls down the chain to gpt-4o-mini
    # (0.00054 USD), which crosses the 50% threshold of the budget.
    out = await engine.authorize(ask("r1", tin=2000, tout=400, model="gpt-4.1"))
    assert out.decision is DecisionKind.CONSTRAIN and out.model == "gpt-4o-mini"
    snapshot = engine.policies.current
    assert snapshot is not None
    g = await grants.record(engine.store, snapshot, grants.GrantRequest(
        "finance-overage", "acme-daily", (), 500_000, 3600, "ann", "finance-owner",
        "quarter-end batch job"))
    kinds = await rows_by_kind(engine)
    (permit,) = kinds["permit"]
    assert (permit.dims.model, permit.dims.provider) == ("gpt-4o-mini", "openai")
    assert permit.detail["requested"] == {"model": "gpt-4.1", "provider": "openai"}
    assert permit.price_pico == (150_000, 75_000, 150_000, 600_000)  # the mini's prices
    assert permit.held_micros == out.estimated_cost_micros
    assert permit.detail["alerts"] == [[1, 50]]
    (grant,) = kinds["exception_grant"]
    assert grant.permit_id == g.grant_id and grant.amount_micros == 0
    assert grant.detail["budget"] == "acme-daily" and grant.detail["amount_micros"] == 500_000
    assert grant.reason == "quarter-end batch job" and grant.detail["approver"] == "ann"
    types = [f[b"type"] for _, f in await events(engine)]
    assert types == [b"decision", b"alert", b"grant"]
