"""Engine + Lua scripts, one body over fakeredis and a real Redis server."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.pricing import Price, TokenUsage, estimate_cost_micros, max_output_tokens_within
from tests.helpers import budget, make_engine, read_stream, write_bundle

MINI = Price(150_000, 75_000, 150_000, 600_000)  # gpt-4o-mini, pico-USD per token


def req(rid: str = "r1", tenant: str = "acme", workload: str = "chat",
        model: str = "gpt-4o-mini", tin: int = 1000, tout: int = 500,
        provider: str = "openai") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, model, provider, tin, tout)


async def window(engine: Engine, budget_id: str, split: tuple[str, ...] = ()) -> tuple[int, int]:
    client: Any = engine.store.client
    keys = [k.decode() for k in await client.keys(f"*:b:{budget_id}:*")]
    matching = [k for k in keys if engine.store.keys.window(budget_id, split, 0).rsplit(":", 1)[0]
                in k]
    assert len(matching) == 1, keys
    return await engine.store.window(matching[0])


async def events(engine: Engine) -> list[dict[str, str]]:
    client: Any = engine.store.client
    raw = await read_stream(client, engine.store.keys.stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


@pytest.fixture
def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "b", [budget("acme-daily", "1.00", scope={"tenant": "acme"})])


async def test_allow_holds_then_closeout_settles_and_books_the_correction(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.ALLOW
    est = estimate_cost_micros(MINI, 1000, 500)
    assert out.estimated_cost_micros == est == 450
    assert out.holds[0].held_micros == est and out.holds[0].remaining_micros == 1_000_000 - est
    assert await window(engine, "acme-daily") == (0, est)

    usage = TokenUsage(input_tokens=1000, cached_input_tokens=800, output_tokens=100)
    res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    actual = (200 * 150_000 + 800 * 75_000 + 100 * 600_000 + 999_999) // 1_000_000
    assert res.status == "SETTLED"
    assert res.actual_cost_micros == actual
    assert res.correction_micros == actual - est
    assert await window(engine, "acme-daily") == (actual, 0)
    types = [e["type"] for e in await events(engine)]
    assert types == ["decision", "settlement"]

    again = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    assert again.status == "ALREADY_SETTLED" and again.actual_cost_micros == actual
    assert await window(engine, "acme-daily") == (actual, 0)
    assert len(await events(engine)) == 2


async def test_provider_reported_cost_is_booked_instead_of_keel_price(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    out = await engine.authorize(req())
    res = await engine.closeout(out.permit_id, TokenUsage(1000, 0, 0, 100), "SUCCEEDED", 777)
    assert res.actual_cost_micros == 777 and res.priced_cost_micros == 210
    assert (await window(engine, "acme-daily"))[0] == 777


async def test_a_retried_closeout_is_answered_as_the_first_whoever_answers_it(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    """A caller whose Closeout answer was lost retries, maybe with a different report and
    to another sidecar: it gets the first answer's figures (Keel's own price included),
    and nothing more is booked."""
    engine = make_engine(aio_client, bundle)
    out = await engine.authorize(req())
    first = await engine.closeout(out.permit_id, TokenUsage(1000, 0, 0, 100), "SUCCEEDED", 777)
    assert (first.status, first.actual_cost_micros, first.priced_cost_micros) == (
        "SETTLED", 777, 210)
    other = make_engine(aio_client, bundle)  # another sidecar: no cached permit
    for eng, usage, cost in ((engine, TokenUsage(1000, 0, 0, 100), 777),
                             (other, TokenUsage(5, 0, 0, 1), None)):
        again = await eng.closeout(out.permit_id, usage, "SUCCEEDED", cost)
        assert again.status == "ALREADY_SETTLED"
        assert (again.actual_cost_micros, again.priced_cost_micros, again.estimated_cost_micros,
                again.correction_micros, again.held_micros) == (
            777, 210, first.estimated_cost_micros, first.correction_micros, first.held_micros)
    assert (await window(engine, "acme-daily"))[0] == 777
    # A permit settled by the previous release (no price or flags kept with it) is
    # answered with the actual cost as its price, as before.
    client: Any = engine.store.client
    await client.hdel(engine.store.keys.permit(out.permit_id), "pk")
    old = await other.closeout(out.permit_id, TokenUsage(5, 0, 0, 1), "SUCCEEDED", None)
    assert (old.status, old.actual_cost_micros, old.priced_cost_micros) == (
        "ALREADY_SETTLED", 777, 777)


async def test_retry_with_same_request_id_returns_same_permit_without_second_hold(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    first = await engine.authorize(req())
    second = await engine.authorize(req())
    assert second.permit_id == first.permit_id and second.replayed
    assert await window(engine, "acme-daily") == (0, first.estimated_cost_micros)
    with pytest.raises(InvalidRequest, match="different parameters"):
        await engine.authorize(req(tout=900))
    # Another tenant may use the same request id independently.
    other = await engine.authorize(req(tenant="globex"))
    assert other.permit_id != first.permit_id


async def test_second_budget_full_means_nothing_is_held_in_the_first(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [
        budget("a-wide", "100.00", scope={"tenant": "acme"}),
        budget("b-narrow", "0.000100", scope={"tenant": "acme", "workload": "chat"}),
    ], settings={"allow_constrain": False})
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.DENY
    reason = out.reasons[0]
    assert reason.code is Code.BUDGET_EXHAUSTED and reason.budget_id == "b-narrow"
    assert reason.limit_micros == 100 and reason.requested_micros == 450
    assert reason.exception_path == "" and reason.retry_after_seconds > 0
    keys: Any = await aio_client.keys("*:b:a-wide:*")
    assert keys == [] or await engine.store.window(keys[0].decode()) == (0, 0)
    ev = await events(engine)
    assert len(ev) == 1 and json.loads(ev[0]["res"])["d"] == "DENY"


async def test_constrain_caps_output_tokens_to_exactly_what_fits(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("tiny", "0.000300", scope={"tenant": "acme"})])
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req(tin=1000, tout=500))  # full estimate 450 > 300
    assert out.decision is DecisionKind.CONSTRAIN
    k = max_output_tokens_within(MINI, 1000, 300)
    assert out.max_output_tokens == k == 250
    assert out.estimated_cost_micros == estimate_cost_micros(MINI, 1000, k) <= 300
    assert out.reasons[0].code is Code.OUTPUT_TOKENS_CAPPED
    assert await window(engine, "tiny") == (0, out.estimated_cost_micros)
    # Nothing useful left now: below min_output_tokens (10) -> DENY.
    denied = await engine.authorize(req(rid="r2", tin=1000, tout=500))
    assert denied.decision is DecisionKind.DENY


async def test_observe_budget_never_blocks_but_records_shadow_reason(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("watch", "0.000001", mode="observe")])
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req())
    assert out.decision is DecisionKind.ALLOW
    codes = [r.code for r in out.reasons]
    # 80% of a 1-micro cap is 0, already reached before; 100% is crossed now.
    assert codes == [Code.SHADOW_BUDGET_EXCEEDED, Code.BUDGET_THRESHOLD_CROSSED]


async def test_expiry_then_late_closeout_still_books_actual_cost(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    out = await engine.authorize(req())
    assert await engine.sweep_once(now_ms=out.expires_at_ms - 1) == 0
    assert await engine.sweep_once(now_ms=out.expires_at_ms + 1) == 1
    assert await engine.sweep_once(now_ms=out.expires_at_ms + 2) == 0  # idempotent
    assert await window(engine, "acme-daily") == (0, 0)
    res = await engine.closeout(out.permit_id, TokenUsage(1000, 0, 0, 100), "SUCCEEDED", None)
    assert res.status == "SETTLED_AFTER_EXPIRY"
    assert await window(engine, "acme-daily") == (res.actual_cost_micros, 0)
    assert [e["type"] for e in await events(engine)] == ["decision", "expiry", "settlement"]


async def test_void_is_idempotent_and_a_settled_permit_cannot_be_voided(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    engine = make_engine(aio_client, bundle)
    a = await engine.authorize(req("a"))
    assert (await engine.void(a.permit_id)).status == "VOIDED"
    assert (await engine.void(a.permit_id)).status == "ALREADY_VOIDED"
    b = await engine.authorize(req("b"))
    await engine.closeout(b.permit_id, TokenUsage(10, 0, 0, 10), "SUCCEEDED", None)
    assert (await engine.void(b.permit_id)).status == "NOT_VOIDABLE"
    # A call that happened after all is still booked.
    late = await engine.closeout(a.permit_id, TokenUsage(10, 0, 0, 10), "SUCCEEDED", None)
    assert late.status == "SETTLED_AFTER_VOID"
    s, h = await window(engine, "acme-daily")
    assert h == 0 and s == late.actual_cost_micros * 2


async def test_closeout_from_another_sidecar_reads_the_permit_record(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    issuer = make_engine(aio_client, bundle)
    other = make_engine(aio_client, bundle)
    out = await issuer.authorize(req())
    res = await other.closeout(out.permit_id, TokenUsage(1000, 0, 0, 500), "SUCCEEDED", None)
    assert res.status == "SETTLED" and res.correction_micros == 0
    unknown = await other.closeout("pmt_" + "0" * 28, TokenUsage(), "SUCCEEDED", None)
    assert unknown.status == "UNKNOWN_PERMIT"


async def test_policy_denials_are_recorded_in_the_stream(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("x", "1")], routes=[
        {"id": "chat-models", "scope": {"workload": "chat"},
         "allowed_models": ["openai/gpt-4o-mini"]}])
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req(model="gpt-4.1"))
    assert out.decision is DecisionKind.DENY
    assert out.reasons[0].code is Code.MODEL_NOT_ALLOWED
    assert out.reasons[0].rule_id == "chat-models"
    unknown = await engine.authorize(req(rid="r2", workload="batch", model="mystery"))
    assert unknown.reasons[0].code is Code.UNKNOWN_MODEL_PRICE
    ev = await events(engine)
    assert len(ev) == 2
    assert json.loads(ev[0]["data"])["reasons"][0]["code"] == "MODEL_NOT_ALLOWED"


async def test_fallback_price_prices_unknown_models_and_still_holds(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("x", "1")], settings={
        "fallback_price": {"input": "10.00", "output": "30.00", "max_output_tokens": 100}})
    engine = make_engine(aio_client, d)
    out = await engine.authorize(req(model="mystery", tin=100, tout=0))
    assert out.decision is DecisionKind.ALLOW
    assert out.estimated_cost_micros == 100 * 10 + 100 * 30
    assert Code.FALLBACK_PRICE_USED in [r.code for r in out.reasons]
    assert await window(engine, "x") == (0, 4000)


async def test_hostile_names_get_their_own_counters(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("per-tenant", "0.000500", per=["tenant"])],
                     settings={"allow_constrain": False})
    engine = make_engine(aio_client, d)
    names = ["a:b", "a%3Ab", "{pdp}", "a b", "ü" * 40, "x" * 128, "*x", "a\\b"]
    for i, name in enumerate(names):
        out = await engine.authorize(req(rid=f"r{i}", tenant=name))
        assert out.decision is DecisionKind.ALLOW, name
    for name in names:
        assert await window(engine, "per-tenant", (name,)) == (0, 450)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tenant", "", "tenant is required"),
    ("model", "", "model is required"),
    ("tenant", "*", "wildcard"),
    ("tenant", "t" * 200, "longer than 128"),
    ("estimated_input_tokens", -1, "must not be negative"),
    ("max_output_tokens", 10**9, "exceeds the maximum"),
    ("request_id", "", "request_id is required"),
])
async def test_invalid_requests_name_the_field(
        aio_client: aioredis.Redis, bundle: pathlib.Path, field: str, value: object,
        message: str) -> None:
    import dataclasses

    engine = make_engine(aio_client, bundle)
    changes: dict[str, Any] = {field: value}
    bad = dataclasses.replace(req(), **changes)
    with pytest.raises(InvalidRequest, match=message):
        await engine.authorize(bad)
    assert await events(engine) == []


async def test_permit_cache_is_bounded_and_invisible_to_the_garbage_collector(
        aio_client: aioredis.Redis, bundle: pathlib.Path) -> None:
    import gc

    engine = make_engine(aio_client, bundle)
    engine._permits.size = 3
    outs = [await engine.authorize(req(f"g{i}", tout=1)) for i in range(5)]
    assert list(engine._permits._entries) == [o.permit_id for o in outs[2:]]  # oldest evicted
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in engine._permits._entries.values())
    # An evicted permit still closes out (one extra read of its record).
    res = await engine.closeout(outs[0].permit_id, TokenUsage(10, 0, 0, 1), "SUCCEEDED", None)
    assert res.status == "SETTLED"
