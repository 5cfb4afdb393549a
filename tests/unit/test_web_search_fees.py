"""Web searches, billed per call, are held by Authorize and booked by Closeout.

The expected figures are worked out here from the providers' documented prices,
written as integers, with this file's own arithmetic (Keel's pricing code is never
used to compute an expectation):

* Anthropic's web search tool: $10 per 1,000 searches, plus tokens
  (docs.anthropic.com, tool use, web search tool, "Usage and pricing"): one search
  is 1 cent, 10_000 micro-USD. claude-sonnet-4-5: input 3.00, cache reads 0.30,
  five-minute cache writes 3.75, output 15.00 USD per 1M tokens.
* OpenAI's web_search tool: $10 per 1,000 calls on every model, plus search content
  tokens at the model's rates (platform.openai.com/docs/pricing, built-in tools):
  10_000 micro-USD a call. gpt-5: 1.25 / 0.125 / 10.00; priority 2.50 / 0.25 / 20.00.

Token prices are written in 1/10_000 USD per 1M tokens (3.00 USD = 30_000), i.e. a
cost is sum(tokens x units) / 10_000 micro-USD; a search adds its fee in micro-USD;
the sum is rounded up once.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.material import load_meta
from keel_pdp.decision import AuthorizeInput, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.ledger.events import EntryRow, derive, parse_entry
from keel_pdp.policy.commands import diff_snapshots, explain_lines
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.helpers import window_sum as window

SONNET = {"input": 30_000, "cached_input": 3_000, "cache_write": 37_500, "output": 150_000}
GPT5 = {"input": 12_500, "cached_input": 1_250, "output": 100_000}
GPT5_PRIORITY = {"input": 25_000, "cached_input": 2_500, "output": 200_000}
SEARCH_MICROS = 10_000  # $10 per 1,000 searches (Anthropic and OpenAI alike)


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


PRICES: dict[str, Any] = {
    "anthropic": {
        "claude-sonnet-4-5": {**{k: usd(v) for k, v in SONNET.items()},
                              "max_output_tokens": 4096, "web_search_per_1k": "10"},
        # A table that does not know the fee yet.
        "claude-haiku-4-5": {"input": "1.00", "output": "5.00", "max_output_tokens": 4096},
    },
    "openai": {
        "gpt-5": {**{k: usd(v) for k, v in GPT5.items()}, "max_output_tokens": 4096,
                  "web_search_per_1k": "10.00",
                  "service_tiers": {"priority": {k: usd(v) for k, v in
                                                 GPT5_PRIORITY.items()}}},
    },
}
IN, OUT = 2_000, 1_000


def cost(rates: dict[str, int], input_tokens: int, output_tokens: int, searches: int = 0,
         cached: int = 0) -> int:
    """Micro-USD, rounded up once."""
    units = ((input_tokens - cached) * rates["input"] + cached * rates.get("cached_input", 0)
             + output_tokens * rates["output"] + searches * SEARCH_MICROS * 10_000)
    return -(-units // 10_000)


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    return make_engine(aio_client, write_bundle(tmp_path / "b", [budget("all", "1000.00")],
                                                prices=PRICES))


def ask(rid: str, searches: int, model: str = "claude-sonnet-4-5",
        provider: str = "anthropic", out: int = OUT, **kw: Any) -> AuthorizeInput:
    return AuthorizeInput(rid, "acme", "chat", model, provider, IN, out,
                          max_web_search_calls=searches, **kw)



async def events(engine: Engine, kind: str, pid: str) -> list[dict[str, Any]]:
    client: Any = engine.store.client
    entries = await read_stream(client, engine.store.keys.stream)
    return [dict(json.loads(f[b"data"])) for _, f in entries
            if f[b"pid"].decode() == pid and f[b"type"] == kind.encode()]


# --------------------------------------------------------------------------- holds
async def test_a_search_tool_with_max_uses_holds_that_many_searches(engine: Engine) -> None:
    out = await engine.authorize(ask("bounded", 5))
    assert out.decision.value == "ALLOW"
    assert out.estimated_cost_micros == cost(SONNET, IN, OUT, searches=5) == 71_000
    assert out.web_search_calls == 5
    assert await window(engine) == 71_000


async def test_a_search_tool_without_a_bound_holds_the_bundle_default(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path, engine: Engine) -> None:
    out = await engine.authorize(ask("unbounded", -1))
    assert out.web_search_calls == 10  # web_search_hold_calls by default
    assert out.estimated_cost_micros == cost(SONNET, IN, OUT, searches=10) == 121_000
    three = make_engine(aio_client, write_bundle(
        tmp_path / "three", [budget("all", "1000.00")], prices=PRICES,
        settings={"web_search_hold_calls": 3}))
    out = await three.authorize(ask("unbounded-3", -1))
    assert out.web_search_calls == 3
    assert out.estimated_cost_micros == cost(SONNET, IN, OUT, searches=3)


async def test_a_call_without_a_search_tool_holds_no_fee(engine: Engine) -> None:
    out = await engine.authorize(ask("plain", 0))
    assert out.web_search_calls == 0
    assert out.estimated_cost_micros == cost(SONNET, IN, OUT) == 21_000


async def test_the_fee_is_the_same_at_every_service_tier(engine: Engine) -> None:
    """OpenAI bills a web search call the same at priority: the hold at the highest
    tier rate adds the same fee."""
    out = await engine.authorize(ask("pri", 2, "gpt-5", "openai", service_tier="priority"))
    assert out.estimated_cost_micros == cost(GPT5_PRIORITY, IN, OUT, searches=2) == 45_000
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 2),
                                "SUCCEEDED", None, service_tier="default")
    assert res.actual_cost_micros == cost(GPT5, IN, OUT, searches=2) == 32_500


async def test_a_budget_that_cannot_hold_the_searches_constrains_the_output(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    """The searches are part of the fixed cost the output cap must leave room for:
    $0.08 of headroom, 5 searches ($0.05) and 2,000 input tokens ($0.006) leave
    $0.024, 1,600 output tokens at $15 per 1M."""
    eng = make_engine(aio_client, write_bundle(tmp_path / "small", [budget("all", "0.08")],
                                               prices=PRICES))
    out = await eng.authorize(ask("tight", 5, out=4_000))
    assert out.decision.value == "CONSTRAIN"
    assert out.max_output_tokens == (80_000 - 50_000 - 6_000) * 10_000 // 150_000 == 1_600
    assert out.estimated_cost_micros == cost(SONNET, IN, 1_600, searches=5) == 80_000
    # Without room for the searches themselves the call is denied, not sent unheld.
    out = await eng.authorize(ask("none-left", 10, out=4_000))
    assert out.decision.value == "DENY"


# ------------------------------------------------------------------------ closeouts
async def test_closeout_books_the_searches_the_provider_reports(engine: Engine) -> None:
    out = await engine.authorize(ask("b", 5))
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, 800, 0, 0, 3),
                                "SUCCEEDED", None)
    assert res.status == "SETTLED"
    assert res.actual_cost_micros == cost(SONNET, IN, 800, searches=3) == 48_000
    assert res.correction_micros == 48_000 - 71_000
    assert res.flags == ()
    assert await window(engine) == 0
    assert await window(engine, "s") == 48_000
    data = (await events(engine, "settlement", out.permit_id))[0]
    assert data["usage"]["ws"] == 3
    assert data["ws_fee"] == SEARCH_MICROS * 1_000_000  # pico-USD a call
    assert data["exact_pico"] == 48_000 * 1_000_000


async def test_searches_beyond_the_hold_are_booked_and_flagged(engine: Engine) -> None:
    """A call held without a search tool (its tools were past a cut body, say) that
    reports searches books them all: a search is never free."""
    out = await engine.authorize(ask("none-held", 0))
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 4),
                                "SUCCEEDED", None)
    assert res.actual_cost_micros == cost(SONNET, IN, OUT, searches=4) == 61_000
    assert "COST_ABOVE_HOLD" in res.flags


async def test_a_replayed_authorize_and_a_repeated_closeout_book_the_fee_once(
        engine: Engine) -> None:
    first = await engine.authorize(ask("same", 5))
    again = await engine.authorize(ask("same", 5))
    assert again.replayed and again.permit_id == first.permit_id
    assert await window(engine) == cost(SONNET, IN, OUT, searches=5)
    usage = TokenUsage(IN, 0, 0, OUT, 0, 0, 5)
    one = await engine.closeout(first.permit_id, usage, "SUCCEEDED", None)
    two = await engine.closeout(first.permit_id, usage, "SUCCEEDED", None)
    assert (one.status, two.status) == ("SETTLED", "ALREADY_SETTLED")
    assert two.actual_cost_micros == one.actual_cost_micros == cost(SONNET, IN, OUT, 5)
    assert await window(engine, "s") == cost(SONNET, IN, OUT, searches=5)
    assert len(await events(engine, "settlement", first.permit_id)) == 1


async def test_a_model_without_a_fee_holds_and_books_nothing_for_searches_and_says_so(
        engine: Engine) -> None:
    out = await engine.authorize(ask("nofee", 3, "claude-haiku-4-5"))
    assert out.estimated_cost_micros == cost({"input": 10_000, "output": 50_000}, IN, OUT)
    assert "WEB_SEARCH_UNPRICED" in [str(r.code) for r in out.reasons]
    assert out.decision.value == "ALLOW"  # informational, not a block
    before = engine.metrics.closeout_unpriced_searches._value.get()
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 3),
                                "SUCCEEDED", None)
    assert res.actual_cost_micros == cost({"input": 10_000, "output": 50_000}, IN, OUT)
    assert res.flags == ("WEB_SEARCH_UNPRICED",)
    assert engine.metrics.closeout_unpriced_searches._value.get() - before == 3
    data = (await events(engine, "settlement", out.permit_id))[0]
    assert data["ws_unpriced"] is True and "ws_fee" not in data


# ------------------------------------------------------------------- hostile values
@pytest.mark.parametrize("bound", [-2, -10**12, 10_001, 10**12])
async def test_an_absurd_search_bound_is_refused_and_holds_nothing(
        engine: Engine, bound: int) -> None:
    with pytest.raises(InvalidRequest, match="max_web_search_calls"):
        await engine.authorize(ask(f"bad{bound}", bound))
    assert await window(engine) == 0


@pytest.mark.parametrize(("count", "why"), [
    (-1, "must not be negative"), (10**12, "implausibly large"),
    (10_001, "implausibly large")])
async def test_an_absurd_search_count_is_refused_and_books_nothing(
        engine: Engine, count: int, why: str) -> None:
    out = await engine.authorize(ask("c", 5))
    with pytest.raises(InvalidRequest, match=why):
        await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, count),
                              "SUCCEEDED", None)
    assert await window(engine, "s") == 0
    assert await window(engine) == cost(SONNET, IN, OUT, searches=5)  # still held
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 2),
                                "SUCCEEDED", None)
    assert res.actual_cost_micros == cost(SONNET, IN, OUT, searches=2)


async def test_a_plausible_count_too_dear_for_the_permit_is_refused_naming_it(
        engine: Engine) -> None:
    """10,000 searches ($100) on a permit held for $0.021: past the overrun ceiling
    (4 x estimate + $0.05), so nothing is booked and the permit stays held."""
    out = await engine.authorize(ask("dear", 0))
    with pytest.raises(InvalidRequest, match="impossible for permit"):
        await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 10_000),
                              "SUCCEEDED", None)
    assert await window(engine, "s") == 0


# ------------------------------------------------------- records across two versions
async def test_a_permit_record_keeps_what_the_previous_version_reads(engine: Engine) -> None:
    """The previous version reads ``price`` (four rates), ``tiers``, ``w1h``, ``ts`` and
    ``ein``: unchanged by the fee, which is a member of its own (``ws``, pico-USD per
    call) that it does not read; it books the usage at ``price`` and no fee."""
    out = await engine.authorize(ask("rec", 5))
    client: Any = engine.store.client
    meta = load_meta(await client.hget(engine.store.keys.permit(out.permit_id), "meta"))
    assert meta["price"] == [SONNET["input"] * 100, SONNET["cached_input"] * 100,
                             SONNET["cache_write"] * 100, SONNET["output"] * 100]
    assert meta["ws"] == SEARCH_MICROS * 1_000_000
    assert meta["ein"] == IN
    assert {"t", "w", "m", "p", "price", "ts", "ein", "ws"} <= meta.keys()


async def test_a_record_of_the_previous_version_books_no_fee_and_is_flagged(
        engine: Engine) -> None:
    """A permit held by the previous version has no fee in its record: its searches
    are booked at nothing and flagged, as a tier it does not know is."""
    out = await engine.authorize(ask("old", 0))
    client: Any = engine.store.client
    key = engine.store.keys.permit(out.permit_id)
    meta = json.loads(await client.hget(key, "meta"))
    meta.pop("ws")
    await client.hset(key, "meta", json.dumps(meta, separators=(",", ":")))
    engine._permits.forget(out.permit_id)  # another sidecar: from the store
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 2),
                                "SUCCEEDED", None)
    assert res.actual_cost_micros == cost(SONNET, IN, OUT)
    assert res.flags == ("WEB_SEARCH_UNPRICED",)


def test_the_api_fields_are_new_field_numbers_both_versions_skip() -> None:
    """A Closeout with web searches, read by the previous version's Usage (fields 1 to
    6), keeps every token count and drops the searches (it books no fee); an
    Authorize of the previous version's clients, read by this version, offers no
    search and marks no cache breakpoint."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

    old = descriptor_pb2.FileDescriptorProto(name="old_usage.proto", package="old")
    usage = old.message_type.add(name="Usage")
    for number, name in enumerate(("input_tokens", "cached_input_tokens",
                                   "cache_write_tokens", "output_tokens",
                                   "reasoning_tokens", "cache_write_1h_tokens"), start=1):
        usage.field.add(name=name, number=number, type=3, label=1)  # int64, optional
    pool = descriptor_pool.DescriptorPool()
    pool.Add(old)
    OldUsage = message_factory.GetMessageClass(pool.FindMessageTypeByName("old.Usage"))
    sent = pb.Usage(input_tokens=IN, cached_input_tokens=5, cache_write_tokens=7,
                    output_tokens=OUT, reasoning_tokens=3, cache_write_1h_tokens=2,
                    web_search_calls=4)
    read: Any = OldUsage.FromString(sent.SerializeToString())
    assert (read.input_tokens, read.output_tokens, read.cache_write_1h_tokens) == (IN, OUT, 2)
    assert pb.Usage.FromString(read.SerializeToString()).web_search_calls == 4  # kept unknown
    plain = pb.AuthorizeRequest(request_id="r", tenant="t", workload="w", model="m")
    assert (plain.max_web_search_calls, plain.cache_write_ttl) == (0, "")


# ------------------------------------------------------------------------------ ledger
async def test_the_ledger_keeps_the_searches_and_their_fee(engine: Engine) -> None:
    out = await engine.authorize(ask("l", -1))
    await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 3), "SUCCEEDED",
                          None)
    other = await engine.authorize(ask("l2", 2, "claude-haiku-4-5"))
    await engine.closeout(other.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 2), "SUCCEEDED",
                          None)
    client: Any = engine.store.client
    rows: dict[tuple[str, str], EntryRow] = {}
    for eid, fields in await read_stream(client, engine.store.keys.stream):
        for row in derive(parse_entry(eid.decode(), fields))[0]:
            rows.setdefault((row.permit_id, row.kind), row)
    priced = rows[(out.permit_id, "settlement")]
    assert priced.detail["web_search_calls"] == 3
    assert priced.detail["web_search_fee_pico"] == SEARCH_MICROS * 1_000_000
    assert priced.actual_micros == cost(SONNET, IN, OUT, searches=3)
    assert rows[(out.permit_id, "permit")].estimate_micros == cost(SONNET, IN, OUT, 10)
    unpriced = rows[(other.permit_id, "settlement")]
    assert unpriced.detail["web_search_calls"] == 2
    assert "WEB_SEARCH_UNPRICED" in unpriced.detail["flags"]
    decision = (await events(engine, "decision", out.permit_id))[0]
    assert decision["web_search"] == {"max": -1, "held": 10,
                                      "fee": SEARCH_MICROS * 1_000_000}


async def test_reconciliation_compares_token_costs_without_the_search_fee(
        engine: Engine) -> None:
    """The provider bills web search on lines of their own: the ledger's settlement
    goes to reconciliation with its token costs only (split at the token prices),
    not with the fee smeared over its token types."""
    from keel_pdp.reconcile.internal_ledger import _ledger_line

    out = await engine.authorize(ask("rec-fee", 5))
    await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, 3), "SUCCEEDED",
                          None)
    client: Any = engine.store.client
    row = None
    for eid, fields in await read_stream(client, engine.store.keys.stream):
        for r in derive(parse_entry(eid.decode(), fields))[0]:
            if r.kind == "settlement" and r.permit_id == out.permit_id:
                row = r
    assert row is not None and row.actual_micros == cost(SONNET, IN, OUT, searches=3)
    price = [SONNET["input"] * 100, SONNET["cached_input"] * 100, SONNET["cache_write"] * 100,
             SONNET["output"] * 100]
    line = _ledger_line((row.permit_id, row.ts_ms, "acme", "chat", "anthropic",
                         "claude-sonnet-4-5", row.input_tokens, row.cached_input_tokens,
                         row.cache_write_tokens, row.output_tokens, row.reasoning_tokens,
                         row.actual_micros, row.reason, json.dumps(row.detail),
                         row.actual_pico, *price))
    assert line.input_cost_micros == IN * SONNET["input"] // 10_000 == 6_000
    assert line.output_cost_micros == OUT * SONNET["output"] // 10_000 == 15_000
    assert line.cost_micros == cost(SONNET, IN, OUT)


# ------------------------------------------------------------------------ price tables
def load(tmp_path: pathlib.Path, prices: dict[str, Any],
         settings: dict[str, Any] | None = None) -> Any:
    d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    return load_bundle(write_bundle(d, [budget("all", "10.00")], prices=prices,
                                    settings=settings))


@pytest.mark.parametrize(("fee", "why"), [
    (10.0, "fees are decimal strings in USD per 1,000 calls"),
    (10, "fees are decimal strings in USD per 1,000 calls"),
    ("10.0000001", "more than 6 fractional digits"),
    ("100.000001", "exceeds the supported maximum of 100 USD per 1,000 calls"),
    ("1e30", "exceeds the supported maximum"),
    ("-0.01", "must be a finite, non-negative decimal"),
    ("NaN", "must be a finite, non-negative decimal"),
    ("ten", "is not a decimal number"),
])
def test_a_bad_fee_is_refused_naming_the_field(tmp_path: pathlib.Path, fee: Any,
                                               why: str) -> None:
    prices = {"anthropic": {"claude-sonnet-4-5": {"input": "3", "output": "15",
                                                  "web_search_per_1k": fee}}}
    with pytest.raises(PolicyError) as info:
        load(tmp_path, prices)
    text = "\n".join(str(p) for p in info.value.problems)
    assert "providers.anthropic.claude-sonnet-4-5.web_search_per_1k" in text
    assert why in text


@pytest.mark.parametrize(("calls", "why"), [
    (-1, "greater than or equal to 0"), (10_001, "less than or equal to 10000"),
    (1.5, "fractional part"), ("ten", "valid integer")])
def test_a_bad_default_search_count_is_refused(tmp_path: pathlib.Path, calls: Any,
                                               why: str) -> None:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, PRICES, {"web_search_hold_calls": calls})
    problem = str(info.value.problems[0])
    assert "bundle.yaml: settings.web_search_hold_calls" in problem and why in problem
    assert load(tmp_path, PRICES, {"web_search_hold_calls": 0}).settings \
        .web_search_hold_calls == 0


def test_the_fee_applies_at_every_context_length_and_dated_price(tmp_path: pathlib.Path) -> None:
    snap = load(tmp_path, {"anthropic": {"claude-sonnet-4-5": [
        {"input": "3", "output": "15", "web_search_per_1k": "10", "tiers": [
            {"above_input_tokens": 200_000, "input": "6", "output": "22.5"}]},
        {"input": "3", "output": "15", "web_search_per_1k": "12.5",
         "effective_from": "2030-01-01"}]}})
    first, later = snap.prices[("anthropic", "claude-sonnet-4-5")]
    assert first.for_input(300_000).web_search == first.for_input(10).web_search \
        == 10_000 * 1_000_000
    assert later.price.web_search == 12_500 * 1_000_000


def test_policy_check_warns_about_a_model_that_can_search_without_a_fee(
        tmp_path: pathlib.Path) -> None:
    prices = {
        "anthropic": {"claude-sonnet-4-5": {"input": "3", "output": "15"},
                      "claude-opus-4-1": {"input": "15", "output": "75",
                                          "web_search_per_1k": "10"}},
        "openai": {"gpt-4o": {"input": "2.5", "output": "10"},
                   "gpt-4o-mini-search-preview": {"input": "0.15", "output": "0.6"},
                   "gpt-4o-mini-transcribe": {"input": "1.25", "output": "5"},
                   "text-embedding-3-small": {"input": "0.02", "output": "0"},
                   "gpt-5": {"input": "1.25", "output": "10", "web_search_per_1k": "0"}},
        "gemini": {"gemini-2.5-flash": {"input": "0.3", "output": "2.5"}},
    }
    warned = [w for w in load(tmp_path, prices).warnings if "web_search_per_1k" in w]
    assert sorted(w.split(":")[1].strip() for w in warned) == [
        "providers.anthropic.claude-sonnet-4-5", "providers.openai.gpt-4o",
        "providers.openai.gpt-4o-mini-search-preview"]
    bundle = write_bundle(tmp_path / "cli", [budget("all", "10.00")], prices=prices)
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check", str(bundle)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "claude-sonnet-4-5: web_search_per_1k is not set" in res.stdout


def test_policy_diff_and_explain_speak_of_the_fee(tmp_path: pathlib.Path) -> None:
    old = load(tmp_path, PRICES)
    raised = json.loads(json.dumps(PRICES))
    raised["anthropic"]["claude-sonnet-4-5"]["web_search_per_1k"] = "12.5"
    lines = diff_snapshots(old, load(tmp_path, raised))
    assert ("Price of anthropic/claude-sonnet-4-5: web search from 10 USD per 1,000 web "
            "search calls to 12.5 USD per 1,000 web search calls.") in lines
    text = "\n".join(explain_lines(old, "acme", "chat", "claude-sonnet-4-5", "anthropic",
                                   IN, OUT))
    assert "10 USD per 1,000 web search calls" in text
