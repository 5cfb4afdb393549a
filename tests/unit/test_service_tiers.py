"""OpenAI service tiers: a call is held at the tier it asks for and settled at the tier
the provider reports, each at that tier's own rates.

The expected figures are worked out here from OpenAI's documented prices, written as
integers in ten-thousandths of a dollar per million tokens (1.25 USD = 12_500), with
this file's own arithmetic: a price in USD per million tokens is micro-USD per token,
so a cost is sum(tokens x units) / 10_000 micro-USD, rounded up once. Keel's pricing
code is never used to compute an expectation.

* gpt-5 standard 1.25 / cached 0.125 / output 10.00 (platform.openai.com/docs/pricing);
  priority 2.50 / 0.25 / 20.00 (openai.com/api-priority-processing); flex at Batch API
  rates, 0.625 / 0.0625 / 5.00 (platform.openai.com/docs/guides/flex-processing).
* o3 standard 2.00 / 0.50 / 8.00; flex 1.00 / 0.25 / 4.00; priority 3.50 / 0.875 / 14.00.
* gpt-4.1 standard 2.00 / 0.50 / 8.00 (no tier rates in these tables).

"auto" (or no tier) is the provider's choice: the project's configured tier, which may
be priority (OpenAI: "Project Service Tier"), and a response reports the tier it used
("default" when it ran at standard). Keel holds such a call at the highest rate the table
knows and books the tier reported.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.material import load_meta, meta_price
from keel_pdp.decision import AuthorizeInput, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.ledger.events import EntryRow, derive, parse_entry
from keel_pdp.policy.commands import diff_snapshots, explain_lines
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.helpers import window_sum as held

# USD per 1M tokens, in 1/10_000 USD.
GPT5 = {
    "default": {"input": 12_500, "cached_input": 1_250, "output": 100_000},
    "priority": {"input": 25_000, "cached_input": 2_500, "output": 200_000},
    "flex": {"input": 6_250, "cached_input": 625, "output": 50_000},
}
O3 = {
    "default": {"input": 20_000, "cached_input": 5_000, "output": 80_000},
    "priority": {"input": 35_000, "cached_input": 8_750, "output": 140_000},
    "flex": {"input": 10_000, "cached_input": 2_500, "output": 40_000},
}
GPT41 = {"default": {"input": 20_000, "cached_input": 5_000, "output": 80_000}}


def usd(units: int) -> str:
    """1/10_000 USD as the decimal string a price table holds."""
    return f"{units // 10_000}.{units % 10_000:04d}"


def spec(rates: dict[str, int]) -> dict[str, str]:
    return {k: usd(v) for k, v in rates.items()}


def table(model: dict[str, dict[str, int]], tiers: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {**spec(model["default"]), "max_output_tokens": 4096}
    if tiers:
        out["service_tiers"] = {t: spec(model[t]) for t in tiers}
    return out


def cost(rates: dict[str, int], input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """Micro-USD, rounded up once."""
    units = ((input_tokens - cached) * rates["input"] + cached * rates["cached_input"]
             + output_tokens * rates["output"])
    return -(-units // 10_000)


PRICES = {"openai": {
    "gpt-5": table(GPT5, ("flex", "priority")),
    "o3": table(O3, ("flex",)),  # a table that lacks priority
    "gpt-4.1": table(GPT41, ()),  # a table with no tier rates at all
}}
IN, OUT = 10_000, 2_000
USAGE = TokenUsage(input_tokens=9_000, cached_input_tokens=4_000, output_tokens=1_500)


def settled(rates: dict[str, int]) -> int:
    return cost(rates, USAGE.input_tokens, USAGE.output_tokens, USAGE.cached_input_tokens)


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    return make_engine(aio_client, write_bundle(tmp_path / "b", [budget("all", "1000.00")],
                                                prices=PRICES))


def ask(rid: str, tier: str, model: str = "gpt-5") -> AuthorizeInput:
    return AuthorizeInput(rid, "acme", "chat", model, "openai", IN, OUT, service_tier=tier)


async def settlement(engine: Engine, pid: str) -> dict[str, Any]:
    client: Any = engine.store.client
    for _, f in await read_stream(client, engine.store.keys.stream):
        if f[b"pid"].decode() == pid and f[b"type"] == b"settlement":
            return dict(json.loads(f[b"data"]))
    raise AssertionError("no settlement event")


async def hold_and_settle(engine: Engine, rid: str, asked: str, reported: str,
                          model: str = "gpt-5") -> tuple[int, Any, str]:
    """Authorize asking for ``asked``, close out reporting ``reported``: (estimate,
    closeout result, permit id); the hold is checked against the window on the way."""
    out = await engine.authorize(ask(rid, asked, model))
    assert out.permit_id and out.decision.value == "ALLOW", out
    assert await held(engine) == out.estimated_cost_micros
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None, service_tier=reported)
    assert res.status == "SETTLED"
    assert await held(engine) == 0
    return out.estimated_cost_micros, res, out.permit_id


# ------------------------------------------------------------- tiers the table prices
async def test_a_priority_call_is_held_and_settled_at_the_priority_rate(engine: Engine) -> None:
    estimate, res, pid = await hold_and_settle(engine, "p", "priority", "priority")
    assert estimate == cost(GPT5["priority"], IN, OUT) == 65_000
    assert res.actual_cost_micros == settled(GPT5["priority"]) == 43_500
    assert res.flags == ()
    data = await settlement(engine, pid)
    assert data["service_tier"] == "priority" and data["priced_tier"] == "priority"


async def test_a_flex_call_is_held_and_settled_at_the_flex_rate(engine: Engine) -> None:
    estimate, res, _ = await hold_and_settle(engine, "f", "flex", "flex")
    assert estimate == cost(GPT5["flex"], IN, OUT) == 16_250
    assert res.actual_cost_micros == settled(GPT5["flex"]) == 10_875
    assert res.correction_micros == settled(GPT5["flex"]) - estimate
    assert res.flags == ()


async def test_default_is_the_standard_rate(engine: Engine) -> None:
    estimate, res, _ = await hold_and_settle(engine, "d", "default", "default")
    assert estimate == cost(GPT5["default"], IN, OUT) == 32_500
    assert res.actual_cost_micros == settled(GPT5["default"]) == 21_750


async def test_auto_is_held_at_the_highest_rate_and_settles_at_the_reported_default(
        engine: Engine) -> None:
    """"auto" may run at priority (a project configured so): held at the highest rate,
    booked at the tier the answer reports; the difference is released."""
    estimate, res, _ = await hold_and_settle(engine, "a", "auto", "default")
    assert estimate == cost(GPT5["priority"], IN, OUT)
    assert res.actual_cost_micros == settled(GPT5["default"])
    assert res.correction_micros == settled(GPT5["default"]) - estimate < 0
    assert res.flags == ()


async def test_a_call_naming_no_tier_is_auto(engine: Engine) -> None:
    estimate, res, _ = await hold_and_settle(engine, "n", "", "priority")
    assert estimate == cost(GPT5["priority"], IN, OUT)
    assert res.actual_cost_micros == settled(GPT5["priority"])
    # the answer said nothing either: booked at the rate the permit was held at
    _, res, _ = await hold_and_settle(engine, "n2", "", "")
    assert res.actual_cost_micros == settled(GPT5["priority"])


async def test_a_reported_auto_is_no_tier_and_books_at_the_hold(engine: Engine) -> None:
    _, res, _ = await hold_and_settle(engine, "ra", "flex", "auto")
    assert res.actual_cost_micros == settled(GPT5["flex"])
    assert res.flags == ()


async def test_the_tier_reported_wins_over_the_tier_asked(engine: Engine) -> None:
    """A priority call the provider ran at standard (its ramp limit) books standard; a
    default call reported at priority books priority, above its hold, flagged."""
    _, res, _ = await hold_and_settle(engine, "down", "priority", "default")
    assert res.actual_cost_micros == settled(GPT5["default"])
    _, res, _ = await hold_and_settle(engine, "up", "default", "priority")
    assert res.actual_cost_micros == settled(GPT5["priority"])
    assert "COST_ABOVE_HOLD" in res.flags


async def test_the_bundle_may_hold_auto_at_the_standard_rate(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    """Projects whose configured tier is the standard one: auto_service_tier: default."""
    eng = make_engine(aio_client, write_bundle(
        tmp_path / "b", [budget("all", "1000.00")], prices=PRICES,
        settings={"auto_service_tier": "default"}))
    estimate, res, _ = await hold_and_settle(eng, "a", "auto", "default")
    assert estimate == cost(GPT5["default"], IN, OUT)
    assert res.actual_cost_micros == settled(GPT5["default"])
    estimate, res, _ = await hold_and_settle(eng, "p", "priority", "priority")
    assert estimate == cost(GPT5["priority"], IN, OUT)


# ------------------------------------------------------- tiers the table does not price
async def test_a_tier_the_table_lacks_is_held_and_booked_at_the_highest_rate_and_flagged(
        engine: Engine) -> None:
    """o3's table lists flex but not priority: a priority call is held and booked at the
    highest rate the table knows (standard here, never flex), flagged on both sides."""
    out = await engine.authorize(ask("p", "priority", "o3"))
    assert out.estimated_cost_micros == cost(O3["default"], IN, OUT)
    assert out.estimated_cost_micros > cost(O3["flex"], IN, OUT)
    assert [r.code.value for r in out.reasons] == ["SERVICE_TIER_UNPRICED"]
    before = engine.metrics.closeout_unpriced_tiers._value.get()
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None,
                                service_tier="priority")
    assert res.actual_cost_micros == settled(O3["default"])
    assert res.flags == ("SERVICE_TIER_UNPRICED",)
    assert engine.metrics.closeout_unpriced_tiers._value.get() == before + 1
    data = await settlement(engine, out.permit_id)
    assert data["priced_tier"] == "highest" and data["tier_unpriced"] is True


async def test_a_retried_closeout_keeps_the_first_answers_flags(engine: Engine) -> None:
    """Keel's own flags are kept with the settlement: a retry that reports no tier (or
    another one) is answered with the flags the first answer carried, and one that
    reports an unpriced tier after a plain settlement gets none."""
    _, res, pid = await hold_and_settle(engine, "k", "flex", "scale")
    assert res.flags == ("COST_ABOVE_HOLD", "SERVICE_TIER_UNPRICED")
    for reported in ("", "flex", "priority"):
        again = await engine.closeout(pid, USAGE, "SUCCEEDED", None, service_tier=reported)
        assert again.status == "ALREADY_SETTLED"
        assert again.flags == res.flags
        assert again.actual_cost_micros == res.actual_cost_micros
        assert again.priced_cost_micros == res.priced_cost_micros
    _, plain, pid2 = await hold_and_settle(engine, "l", "flex", "flex")
    assert plain.flags == ()
    again = await engine.closeout(pid2, USAGE, "SUCCEEDED", None, service_tier="turbo")
    assert (again.status, again.flags) == ("ALREADY_SETTLED", ())


async def test_an_unknown_tier_name_is_priced_at_the_highest_rate_never_the_cheapest(
        engine: Engine) -> None:
    estimate, res, _ = await hold_and_settle(engine, "t", "turbo", "turbo")
    assert estimate == cost(GPT5["priority"], IN, OUT)
    assert res.actual_cost_micros == settled(GPT5["priority"])
    assert res.flags == ("SERVICE_TIER_UNPRICED",)
    # a flex call whose answer names a tier no table has: the highest, not flex (above
    # the flex hold, so flagged as such too)
    _, res, _ = await hold_and_settle(engine, "f", "flex", "scale")
    assert res.actual_cost_micros == settled(GPT5["priority"])
    assert res.flags == ("COST_ABOVE_HOLD", "SERVICE_TIER_UNPRICED")
    # what the mesh and the client pass on for an answer whose tier cannot be read
    _, res, _ = await hold_and_settle(engine, "u", "flex", "unreadable")
    assert res.actual_cost_micros == settled(GPT5["priority"])
    assert res.flags == ("COST_ABOVE_HOLD", "SERVICE_TIER_UNPRICED")


async def test_a_model_without_tier_rates_books_its_own_rate_and_flags_other_tiers(
        engine: Engine) -> None:
    out = await engine.authorize(ask("p", "priority", "gpt-4.1"))
    assert out.estimated_cost_micros == cost(GPT41["default"], IN, OUT)
    assert [r.code.value for r in out.reasons] == ["SERVICE_TIER_UNPRICED"]
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None,
                                service_tier="priority")
    assert res.actual_cost_micros == settled(GPT41["default"])
    assert res.flags == ("SERVICE_TIER_UNPRICED",)
    _, res, _ = await hold_and_settle(engine, "d", "auto", "default", "gpt-4.1")
    assert res.actual_cost_micros == settled(GPT41["default"])
    assert res.flags == ()


# ---------------------------------------------------------------------- hostile values
@pytest.mark.parametrize("tier", ["p" * 100_000, "priority\x00", "prio rity", "ü", "a/b",
                                  "x" * 65])
async def test_a_tier_that_is_no_tier_name_is_refused_and_holds_nothing(
        engine: Engine, tier: str) -> None:
    with pytest.raises(InvalidRequest, match="service_tier"):
        await engine.authorize(ask("h", tier))
    assert await held(engine) == 0


async def test_a_closeout_naming_no_tier_name_is_refused_and_books_nothing(
        engine: Engine) -> None:
    out = await engine.authorize(ask("h", "flex"))
    for tier in ("x" * 10_000, "flex\n", "\u2028"):
        with pytest.raises(InvalidRequest, match="service_tier"):
            await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None, service_tier=tier)
    assert await held(engine) == out.estimated_cost_micros
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None, service_tier="flex")
    assert res.status == "SETTLED" and res.actual_cost_micros == settled(GPT5["flex"])


# ------------------------------------------------------- records across two versions
async def test_a_permit_record_keeps_the_held_rate_where_the_previous_version_reads_it(
        engine: Engine) -> None:
    """A sidecar of the previous version reads ``price`` (four rates) and books the
    usage at it: for a permit held at a tier, that is the tier's rate (the old reader is
    ``meta_price``, unchanged)."""
    for tier, rates in (("priority", GPT5["priority"]), ("flex", GPT5["flex"]),
                        ("auto", GPT5["priority"])):
        out = await engine.authorize(ask(f"v-{tier}", tier))
        client: Any = engine.store.client
        meta = load_meta(await client.hget(engine.store.keys.permit(out.permit_id), "meta"))
        pico = [rates["input"] * 100, rates["cached_input"] * 100, rates["input"] * 100,
                rates["output"] * 100]  # 1/10_000 USD per 1M tokens = 100 pico-USD/token
        assert meta["price"] == pico
        old = meta_price(meta, USAGE.input_tokens)
        assert (old.input, old.cached_input, old.output) == (pico[0], pico[1], pico[3])


async def test_a_record_of_the_previous_version_is_closed_out_at_its_own_rate(
        engine: Engine) -> None:
    """A permit the previous version held has no tier rates: its own rate is the only
    one known; a tier other than default reported for it is flagged."""
    out = await engine.authorize(ask("old", "", "gpt-5"))
    client: Any = engine.store.client
    key = engine.store.keys.permit(out.permit_id)
    meta = json.loads(await client.hget(key, "meta"))
    for member in ("st", "sth"):
        meta.pop(member)
    meta["price"] = [GPT5["default"][k] * 100
                     for k in ("input", "cached_input", "input", "output")]
    await client.hset(key, "meta", json.dumps(meta, separators=(",", ":")))
    engine._permits.forget(out.permit_id)  # another sidecar: from the store
    res = await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None,
                                service_tier="priority")
    assert res.actual_cost_micros == settled(GPT5["default"])
    assert res.flags == ("SERVICE_TIER_UNPRICED",)


# ------------------------------------------------------------------------------ ledger
async def test_the_ledger_splits_a_settlement_at_the_rates_it_was_priced_at(
        engine: Engine) -> None:
    """Held at the highest rate, settled at standard: the settlement entry carries the
    standard rates (the export's unit prices), the permit entry the priority ones."""
    out = await engine.authorize(ask("l", "auto"))
    await engine.closeout(out.permit_id, USAGE, "SUCCEEDED", None, service_tier="default")
    client: Any = engine.store.client
    rows: dict[str, EntryRow] = {}
    for eid, fields in await read_stream(client, engine.store.keys.stream):
        for row in derive(parse_entry(eid.decode(), fields))[0]:
            rows.setdefault(row.kind, row)
    std, pri = GPT5["default"], GPT5["priority"]
    assert rows["permit"].price_pico == (pri["input"] * 100, pri["cached_input"] * 100,
                                         pri["input"] * 100, pri["output"] * 100)
    assert rows["settlement"].price_pico == (std["input"] * 100, std["cached_input"] * 100,
                                             std["input"] * 100, std["output"] * 100)
    assert rows["settlement"].detail["service_tier"] == "default"
    assert rows["settlement"].actual_micros == settled(std)


# ------------------------------------------------------------------------ price tables
def load(tmp_path: pathlib.Path, prices: dict[str, Any],
         settings: dict[str, Any] | None = None) -> Any:
    d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    return load_bundle(write_bundle(d, [budget("all", "10.00")], prices=prices,
                                    settings=settings))


@pytest.mark.parametrize(("tiers", "where", "why"), [
    ({"priority": {"input": 2.5, "output": "20.00"}},
     "providers.openai.gpt-5.service_tiers.priority.input", "prices are decimal strings"),
    ({"flex": {"input": "0.6250001", "output": "5.00"}},
     "providers.openai.gpt-5.service_tiers.flex.input", "more than 6 fractional digits"),
    ({"flex": {"input": "-1", "output": "5.00"}},
     "providers.openai.gpt-5.service_tiers.flex.input", "non-negative"),
    ({"flex": {"output": "5.00"}},
     "providers.openai.gpt-5.service_tiers.flex.input", "Field required"),
    ({"default": {"input": "1.25", "output": "10.00"}},
     "providers.openai.gpt-5.service_tiers", "the model's own rates are the default tier"),
    ({"auto": {"input": "1.25", "output": "10.00"}},
     "providers.openai.gpt-5.service_tiers", "auto is the provider's choice"),
    ({"a/b": {"input": "1.25", "output": "10.00"}},
     "providers.openai.gpt-5.service_tiers.a/b", "String should match pattern"),
    ({"priority": {"input": "2.50", "output": "20.00", "tiers": [
        {"above_input_tokens": 5, "input": "1", "output": "1"},
        {"above_input_tokens": 5, "input": "1", "output": "1"}]}},
     "providers.openai.gpt-5.service_tiers.priority.tiers", "strictly ascending"),
])
def test_a_bad_tier_rate_is_refused_naming_the_field(
        tmp_path: pathlib.Path, tiers: dict[str, Any], where: str, why: str) -> None:
    gpt5 = {**spec(GPT5["default"]), "service_tiers": tiers}
    with pytest.raises(PolicyError) as info:
        load(tmp_path, {"openai": {"gpt-5": gpt5}})
    problems = [str(p) for p in info.value.problems]
    assert any(f"prices.yaml: {where}" in p and why in p for p in problems), problems


def test_auto_service_tier_names_a_tier_not_auto(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PolicyError, match=r'settings.auto_service_tier.*not "auto"'):
        load(tmp_path, PRICES, {"auto_service_tier": "auto"})
    assert load(tmp_path, PRICES, {"auto_service_tier": "priority"}).settings \
        .auto_service_tier == "priority"


def test_policy_check_warns_when_a_priority_call_would_be_booked_below_its_rate(
        tmp_path: pathlib.Path) -> None:
    """o3 lists flex, not priority: a priority call would book at o3's standard rate,
    below what OpenAI bills. A table with priority, or with no tiers at all, is quiet
    (the latter flags such calls at run time); so is a provider without OpenAI's tiers."""
    def tier_warnings(warnings: tuple[str, ...]) -> list[str]:
        # (These models can also search: web_search_per_1k warnings are tested on their own.)
        return [w for w in warnings if "service_tiers" in w]

    snap = load(tmp_path, PRICES)
    assert len(tier_warnings(snap.warnings)) == 1
    warned = tier_warnings(snap.warnings)[0]
    assert "providers.openai.o3" in warned and "priority" in warned
    quiet = {"openai": {"gpt-5": PRICES["openai"]["gpt-5"], "gpt-4.1": PRICES["openai"]
                        ["gpt-4.1"]},
             "anthropic": {"claude-x": {**spec(GPT5["default"]),
                                        "service_tiers": {"batch": spec(GPT5["flex"])}}}}
    assert tier_warnings(load(tmp_path, quiet).warnings) == []
    bundle = write_bundle(tmp_path / "cli", [budget("all", "10.00")], prices=PRICES)
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check", str(bundle)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "warning:" in res.stdout and "o3: service_tiers has no rate for priority" \
        in res.stdout


async def test_auto_at_long_context_holds_each_rate_at_its_highest(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    """Standard has a long-context tier (above 272k input tokens) that priority lacks:
    above it, "auto" holds input at the higher of the two and output at the higher."""
    long_ctx = {"input": 50_000, "cached_input": 5_000, "output": 225_000}
    model = {**table(GPT5, ("priority",)), "tiers": [
        {"above_input_tokens": 272_000, **spec(long_ctx)}]}
    eng = make_engine(aio_client, write_bundle(tmp_path / "b", [budget("all", "1000.00")],
                                               prices={"openai": {"gpt-5": model}}))
    big = AuthorizeInput("big", "acme", "chat", "gpt-5", "openai", 300_000, OUT)
    out = await eng.authorize(big)
    highest = {"input": max(long_ctx["input"], GPT5["priority"]["input"]),
               "cached_input": 0,
               "output": max(long_ctx["output"], GPT5["priority"]["output"])}
    assert out.estimated_cost_micros == cost(highest, 300_000, OUT)
    small = await eng.authorize(AuthorizeInput("s", "acme", "chat", "gpt-5", "openai", IN, OUT))
    assert small.estimated_cost_micros == cost(GPT5["priority"], IN, OUT)
    std = await eng.authorize(AuthorizeInput("d", "acme", "chat", "gpt-5", "openai", 300_000,
                                             OUT, service_tier="default"))
    assert std.estimated_cost_micros == cost(long_ctx, 300_000, OUT)


def test_policy_diff_and_explain_speak_of_service_tiers(tmp_path: pathlib.Path) -> None:
    old = load(tmp_path, PRICES)
    changed = {"openai": {**PRICES["openai"], "gpt-5": table(
        {**GPT5, "priority": {**GPT5["priority"], "output": 240_000}}, ("priority",))}}
    new = load(tmp_path, changed)
    lines = diff_snapshots(old, new)
    assert "Price of openai/gpt-5: service tier flex removed: calls at it are priced at the " \
        "highest rate the model has and flagged SERVICE_TIER_UNPRICED." in lines
    assert "Price of openai/gpt-5, service tier priority: output from 20 to 24 USD per 1M " \
        "tokens (+20.0%)." in lines
    text = "\n".join(explain_lines(old, "acme", "chat", "gpt-5", "openai", IN, OUT,
                                   service_tier="flex"))
    assert "Requested model openai/gpt-5: input 0.625, cached input 0.0625" in text
    assert "held at the flex tier's rates" in text
    text = "\n".join(explain_lines(old, "acme", "chat", "o3", "openai", IN, OUT,
                                   service_tier="priority"))
    assert "SERVICE_TIER_UNPRICED" in text and "input 2, " in text


# ----------------------------------------------------------------------------- client
def test_the_client_reads_the_tier_an_sdk_call_asks_for_and_the_one_it_reports() -> None:
    """``service_tier`` of an OpenAI create() call (the SDKs' NOT_GIVEN / omit sentinels
    are no tier), and the tier a finished answer or a stream reports."""
    import openai

    from keel_pdp.client.usage import UsageMeter, read_service_tier
    from keel_pdp.client.wrap import Call
    from keel_pdp.mesh.request import Api

    msgs = [{"role": "user", "content": "x"}]
    for given, want in (("flex", "flex"), (None, ""), (openai.NOT_GIVEN, ""),
                        (openai.omit, "")):
        call = Call(Api.CHAT, "openai", {"model": "gpt-5", "messages": msgs,
                                         "service_tier": given})
        assert call.permit_request("acme", "chat", {}).service_tier == want
    via_extra = Call(Api.RESPONSES, "openai", {"model": "gpt-5", "input": "x",
                                               "extra_body": {"service_tier": "priority"}})
    assert via_extra.permit_request("acme", "chat", {}).service_tier == "priority"
    for bad in (0, False, 2.5, {"t": 1}, "p" * 65):
        with pytest.raises(TypeError, match="service_tier"):
            Call(Api.CHAT, "openai", {"model": "gpt-5", "messages": msgs, "service_tier": bad})
    answer = {"object": "chat.completion", "service_tier": "priority", "choices": []}
    assert read_service_tier(answer) == "priority"
    assert read_service_tier({**answer, "service_tier": 7}) == "unreadable"
    assert read_service_tier({"type": "message", "usage": {}}) == ""
    meter = UsageMeter()
    for item in ({"object": "chat.completion.chunk", "service_tier": "flex", "choices": []},
                 {"object": "chat.completion.chunk", "service_tier": "flex", "choices": [],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 2}}):
        meter.feed(item)
    assert meter.reading().service_tier == "flex"


async def test_a_flex_hold_served_at_priority_with_more_input_is_booked_not_impossible(
        engine: Engine) -> None:
    # gpt-5's priority rates are four times its flex rates: the overrun ceiling (four
    # times the estimate + $0.05) would call a legitimate priority bill with 30% more
    # input than estimated impossible and book nothing.
    out = await engine.authorize(AuthorizeInput("fx", "acme", "chat", "gpt-5", "openai",
                                                100_000, 100, service_tier="flex"))
    assert out.estimated_cost_micros == cost(GPT5["flex"], 100_000, 100) == 63_000
    usage = TokenUsage(input_tokens=130_000, cached_input_tokens=0, output_tokens=100)
    res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None,
                                service_tier="priority")
    assert res.status == "SETTLED"
    assert res.actual_cost_micros == cost(GPT5["priority"], 130_000, 100) == 327_000
    assert "COST_ABOVE_HOLD" in res.flags and await held(engine) == 0
    # Still impossible: far above even the priority rate's ceiling.
    again = await engine.authorize(AuthorizeInput("fx2", "acme", "chat", "gpt-5", "openai",
                                                  100_000, 100, service_tier="flex"))
    with pytest.raises(InvalidRequest, match="impossible"):
        await engine.closeout(again.permit_id, TokenUsage(5_000_000, 0, 0, 100), "SUCCEEDED",
                              None, service_tier="priority")
