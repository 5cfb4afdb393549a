"""What a real provider call books, against what the provider documents it bills.

Each test hands Keel a provider's own usage object (as the mesh and the client
read it) and closes a permit out; the expected figure is computed here with
Decimal from the documented semantics and the price table's decimal strings,
never with Keel's pricing code:

* Anthropic Messages: ``input_tokens`` excludes cache reads and writes;
  ``cache_creation_input_tokens`` is the sum of ``cache_creation``'s
  ``ephemeral_5m_input_tokens`` (billed at 1.25x input) and
  ``ephemeral_1h_input_tokens`` (2x input); ``cache_read_input_tokens`` at 0.1x.
* Bedrock Converse ``usage``: ``inputTokens`` excludes cache reads and writes;
  ``cacheDetails`` splits ``cacheWriteInputTokens`` by TTL (``5m`` / ``1h``).
* OpenAI: ``prompt_tokens_details.cached_tokens`` is part of ``prompt_tokens``,
  ``completion_tokens_details.reasoning_tokens`` part of ``completion_tokens``.
* Gemini ``usageMetadata``: ``cachedContentTokenCount`` is part of
  ``promptTokenCount``; ``thoughtsTokenCount`` is billed as output, apart from
  ``candidatesTokenCount``; above 200k prompt tokens the whole request is
  priced at the long-context rates.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.material import load_meta, meta_head, meta_price, meta_stamp
from keel_pdp.client._core import usage_pb
from keel_pdp.client.usage import read_usage
from keel_pdp.decision import AuthorizeInput
from keel_pdp.engine import Engine
from keel_pdp.mesh.apis import Api
from keel_pdp.mesh.usage import ResponseMeter, normalise
from keel_pdp.permits import PermitIds
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price, TokenUsage
from keel_pdp.server.convert import usage as usage_from_pb
from tests.helpers import budget, make_engine, write_bundle

SONNET = {"input": "3.00", "cached_input": "0.30", "cache_write": "3.75",
          "output": "15.00", "max_output_tokens": 4096}
SONNET_1H = {**SONNET, "cache_write_1h": "6.00"}
BEDROCK_SONNET = "anthropic.claude-sonnet-4-5-20250929-v1:0"
PRICES: dict[str, Any] = {
    "anthropic": {"claude-sonnet-4-5": SONNET},
    "bedrock": {BEDROCK_SONNET: SONNET},
    "openai": {
        "gpt-4.1": {"input": "2.00", "cached_input": "0.50", "output": "8.00",
                    "max_output_tokens": 4096},
        "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60",
                        "max_output_tokens": 4096},
    },
    "gemini": {
        "gemini-2.5-flash": {"input": "0.30", "cached_input": "0.03", "output": "2.50",
                             "max_output_tokens": 8192},
        "gemini-2.5-pro": {"input": "1.25", "cached_input": "0.125", "output": "10.00",
                           "max_output_tokens": 8192,
                           "tiers": [{"above_input_tokens": 200000, "input": "2.50",
                                      "cached_input": "0.25", "output": "15.00"}]},
    },
}


def expected_micros(*parts: tuple[int, str]) -> int:
    """sum(tokens x USD per million tokens), which is micro-USD, rounded up once."""
    exact = sum((Decimal(n) * Decimal(price) for n, price in parts), Decimal(0))
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


async def _engine(tmp_path: pathlib.Path, prices: dict[str, Any]) -> AsyncIterator[Engine]:
    import fakeredis

    client: aioredis.Redis = fakeredis.FakeAsyncRedis()
    try:
        yield make_engine(client, write_bundle(tmp_path, [budget("b", "1000")], prices=prices))
    finally:
        await client.aclose()


@pytest.fixture
async def engine(tmp_path: pathlib.Path) -> AsyncIterator[Engine]:
    async for eng in _engine(tmp_path, PRICES):
        yield eng


@pytest.fixture
async def engine_1h(tmp_path: pathlib.Path) -> AsyncIterator[Engine]:
    """Anthropic and Bedrock Sonnet with their one-hour cache-write rate (2x input)."""
    prices = {**PRICES, "anthropic": {"claude-sonnet-4-5": SONNET_1H},
              "bedrock": {BEDROCK_SONNET: SONNET_1H}}
    async for eng in _engine(tmp_path, prices):
        yield eng


async def settle(engine: Engine, provider: str, model: str, usage: TokenUsage,
                 ) -> int:
    """Authorize the call for its real input and output, then close it out."""
    out = await engine.authorize(AuthorizeInput(
        f"r-{provider}-{model}-{usage.input_tokens}", "acme", "chat", model, provider,
        usage.input_tokens, usage.output_tokens))
    assert out.permit_id
    res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    assert res.status == "SETTLED"
    return res.actual_cost_micros


# --------------------------------------------------------------- cache writes
ANTHROPIC_USAGE = {
    "input_tokens": 1_000, "cache_read_input_tokens": 50_000,
    "cache_creation_input_tokens": 30_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 10_000, "ephemeral_1h_input_tokens": 20_000},
    "output_tokens": 700,
}
ANTHROPIC_EXPECTED = expected_micros(
    (1_000, "3.00"), (50_000, "0.30"), (10_000, "3.75"), (20_000, "6.00"), (700, "15.00"))


async def test_anthropic_one_hour_cache_writes_are_booked_at_the_one_hour_rate(
        engine_1h: Engine) -> None:
    """Every token once, at its own rate: 20,000 one-hour writes at $6/M, not at the
    five-minute $3.75/M (which books $0.045 too little on this call)."""
    usage = normalise(Api.MESSAGES, ANTHROPIC_USAGE)
    assert usage.input_tokens == 81_000
    assert await settle(engine_1h, "anthropic", "claude-sonnet-4-5", usage) == ANTHROPIC_EXPECTED
    assert ANTHROPIC_EXPECTED == 186_000


async def test_anthropic_stream_keeps_the_one_hour_writes_of_message_start(
        engine_1h: Engine) -> None:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 700}}
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
                   for e in (start, delta, {"type": "message_stop"}))
    meter = ResponseMeter(Api.MESSAGES, "text/event-stream")
    meter.feed(body.encode())
    reading = meter.reading()
    assert reading.usage is not None
    assert await settle(engine_1h, "anthropic", "claude-sonnet-4-5", reading.usage) \
        == ANTHROPIC_EXPECTED


async def test_client_reader_and_closeout_api_carry_the_one_hour_writes(
        engine_1h: Engine) -> None:
    """The in-process client reads the SDK's answer and sends it over the Closeout
    API: the one-hour writes survive the protobuf round trip."""
    usage = read_usage({"id": "msg_1", "type": "message", "usage": ANTHROPIC_USAGE})
    assert usage is not None
    wire = usage_from_pb(usage_pb(usage))
    assert wire == usage
    assert await settle(engine_1h, "anthropic", "claude-sonnet-4-5", wire) == ANTHROPIC_EXPECTED


async def test_bedrock_converse_cache_details_split_writes_by_ttl(engine_1h: Engine) -> None:
    usage = normalise(Api.CONVERSE, {
        "inputTokens": 1_000, "outputTokens": 700, "totalTokens": 81_700,
        "cacheReadInputTokens": 50_000, "cacheWriteInputTokens": 30_000,
        "cacheDetails": [{"ttl": "1h", "inputTokens": 20_000},
                         {"ttl": "5m", "inputTokens": 10_000}]})
    assert await settle(engine_1h, "bedrock", BEDROCK_SONNET, usage) == ANTHROPIC_EXPECTED


def test_a_bundle_without_a_one_hour_rate_stays_valid(tmp_path: pathlib.Path) -> None:
    """Older price tables name no one-hour rate: they load, and price one-hour
    writes as they always did (at cache_write)."""
    snap = load_bundle(write_bundle(tmp_path, [budget("b", "10")],
                                    prices={"anthropic": {"claude-sonnet-4-5": SONNET}}))
    mp = snap.price_for("anthropic", "claude-sonnet-4-5")
    assert mp is not None and mp.price.cache_write == 3_750_000


def test_one_hour_writes_are_part_of_the_cache_writes() -> None:
    bad = TokenUsage(100, 0, 10, 5, 0, cache_write_1h_tokens=11)
    assert any("cache_write_1h_tokens" in p for p in bad.problems())


# ----------------------------------------------------------- held up: parts
async def test_openai_cached_and_reasoning_tokens_are_not_counted_twice(
        engine: Engine) -> None:
    chat = normalise(Api.CHAT, {
        "prompt_tokens": 10_000, "completion_tokens": 2_000, "total_tokens": 12_000,
        "prompt_tokens_details": {"cached_tokens": 6_000},
        "completion_tokens_details": {"reasoning_tokens": 1_500}})
    responses = normalise(Api.RESPONSES, {
        "input_tokens": 10_000, "output_tokens": 2_000, "total_tokens": 12_000,
        "input_tokens_details": {"cached_tokens": 6_000},
        "output_tokens_details": {"reasoning_tokens": 1_500}})
    want = expected_micros((4_000, "2.00"), (6_000, "0.50"), (2_000, "8.00"))
    assert chat == responses
    assert await settle(engine, "openai", "gpt-4.1", chat) == want == 27_000


async def test_gemini_thoughts_are_billed_as_output(engine: Engine) -> None:
    usage = normalise(Api.GENERATE_CONTENT, {
        "promptTokenCount": 12_000, "cachedContentTokenCount": 4_000,
        "candidatesTokenCount": 500, "thoughtsTokenCount": 1_500, "totalTokenCount": 14_000})
    want = expected_micros((8_000, "0.30"), (4_000, "0.03"), (2_000, "2.50"))
    assert await settle(engine, "gemini", "gemini-2.5-flash", usage) == want == 7_520


# ------------------------------------------------------ held up: long context
async def test_gemini_long_context_tier_at_the_hold_and_at_the_closeout(
        engine: Engine) -> None:
    at = await engine.authorize(AuthorizeInput(
        "t200", "acme", "chat", "gemini-2.5-pro", "gemini", 200_000, 1_000))
    above = await engine.authorize(AuthorizeInput(
        "t200k1", "acme", "chat", "gemini-2.5-pro", "gemini", 200_001, 1_000))
    assert at.estimated_cost_micros == expected_micros((200_000, "1.25"), (1_000, "10.00"))
    assert above.estimated_cost_micros == expected_micros((200_001, "2.50"), (1_000, "15.00"))
    # Held at the base rate, the call's real prompt crossed the threshold: the whole
    # request (cached part included) settles at the tier.
    usage = normalise(Api.GENERATE_CONTENT, {
        "promptTokenCount": 250_000, "cachedContentTokenCount": 100_000,
        "candidatesTokenCount": 800, "thoughtsTokenCount": 200})
    res = await engine.closeout(at.permit_id, usage, "SUCCEEDED", None)
    assert res.actual_cost_micros == expected_micros(
        (150_000, "2.50"), (100_000, "0.25"), (1_000, "15.00"))


@pytest.mark.parametrize(("provider", "model", "tokens"), [
    ("openai", "gpt-4.1", 12_345), ("openai", "gpt-4o-mini", 7),
    ("anthropic", "claude-sonnet-4-5", 99_999), ("gemini", "gemini-2.5-pro", 200_000),
    ("gemini", "gemini-2.5-pro", 200_001), ("bedrock", BEDROCK_SONNET, 3),
])
async def test_the_hold_covers_what_the_same_usage_settles_at(
        engine: Engine, provider: str, model: str, tokens: int) -> None:
    out = await engine.authorize(AuthorizeInput(
        f"h-{model}-{tokens}", "acme", "chat", model, provider, tokens, 333))
    res = await engine.closeout(out.permit_id, TokenUsage(tokens, 0, 0, 333), "SUCCEEDED",
                                None)
    assert res.actual_cost_micros == out.estimated_cost_micros
    assert res.correction_micros == 0


# ------------------------------------------------------------ held up: rounding
async def test_a_call_is_rounded_once_not_per_token_type(engine: Engine) -> None:
    """One fresh, one cached and one output token of gpt-4o-mini: $0.825 per million,
    0.825 micro-USD, one micro-USD; rounding each type would book three."""
    usage = TokenUsage(2, 1, 0, 1)
    want = expected_micros((1, "0.15"), (1, "0.075"), (1, "0.60"))
    assert await settle(engine, "openai", "gpt-4o-mini", usage) == want == 1


# --------------------------------------------------------- held up: price dates
def _ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


async def test_a_call_held_before_a_price_change_settles_at_the_price_it_ran_at(
        tmp_path: pathlib.Path) -> None:
    import fakeredis

    prices = {"openai": {"gpt-4.1": [
        {"input": "2.00", "cached_input": "0.50", "output": "8.00", "max_output_tokens": 100},
        {"input": "1.00", "cached_input": "0.25", "output": "4.00", "max_output_tokens": 100,
         "effective_from": "2030-12-01"}]}}
    client: aioredis.Redis = fakeredis.FakeAsyncRedis()
    try:
        eng = make_engine(client, write_bundle(tmp_path, [budget("b", "10")], prices=prices))
        now = [_ms(2030, 11, 30, 23, 59, 50)]
        eng.ids = PermitIds(clock_ms=lambda: now[0])
        out = await eng.authorize(AuthorizeInput("p", "acme", "chat", "gpt-4.1", "openai",
                                                 1_000, 100))
        assert out.estimated_cost_micros == expected_micros((1_000, "2.00"), (100, "8.00"))
        now[0] = _ms(2030, 12, 1, 0, 0, 20)
        res = await eng.closeout(out.permit_id, TokenUsage(1_000, 400, 0, 90), "SUCCEEDED",
                                 None)
        assert res.actual_cost_micros == expected_micros(
            (600, "2.00"), (400, "0.50"), (90, "8.00"))
        later = await eng.authorize(AuthorizeInput("q", "acme", "chat", "gpt-4.1", "openai",
                                                   1_000, 100))
        assert later.estimated_cost_micros == expected_micros((1_000, "1.00"), (100, "4.00"))
    finally:
        await client.aclose()


def test_a_permit_record_keeps_price_rows_of_four_for_the_previous_version() -> None:
    """During a rolling upgrade a sidecar of the previous version may close out a
    permit this one issued: it reads each price row as exactly four rates. The
    one-hour rate travels in a member of its own, which that reader ignores."""
    base = Price(3_000_000, 300_000, 3_750_000, 15_000_000, cache_write_1h=6_000_000)
    tier = Price(6_000_000, 600_000, 7_500_000, 22_500_000, cache_write_1h=12_000_000)
    mp = ModelPrice("anthropic", "claude-sonnet-4-5", base, 0, tiers=((200_000, tier),))
    meta = load_meta(meta_head("acme", "chat", mp) + meta_stamp(1, 10))
    assert meta["price"] == [3_000_000, 300_000, 3_750_000, 15_000_000]
    assert [t[1:] for t in meta["tiers"]] == [[6_000_000, 600_000, 7_500_000, 22_500_000]]
    assert meta["w1h"] == [6_000_000, 12_000_000]
    # this version reads the one-hour rates back, below and above the tier
    assert meta_price(meta, 10).cache_write_1h == 6_000_000
    assert meta_price(meta, 300_000).cache_write_1h == 12_000_000
    # a record without them (the previous version's) prices one-hour writes at cache_write
    del meta["w1h"]
    old = meta_price(meta, 10)
    assert old.cache_write_1h is None and old.cache_write == 3_750_000
    # no member at all when no rate differs from cache_write
    plain = ModelPrice("openai", "gpt-4o-mini", Price(150_000, 75_000, 150_000, 600_000), 0)
    assert "w1h" not in load_meta(meta_head("acme", "chat", plain) + meta_stamp(1, 10))


def test_a_claude_price_without_a_one_hour_write_rate_is_served_with_a_warning(
        tmp_path: pathlib.Path) -> None:
    """A bundle written before one-hour cache writes had a rate of their own still
    loads (it prices them at cache_write), but ``policy check`` and the load log say
    that the provider bills them at their own rate."""
    def snapshot(claude: dict[str, str]) -> Any:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        write_bundle(d, [budget("b", "10.00")])
        (d / "prices.yaml").write_text(json.dumps({
            "apiVersion": "keel.pdp/v1", "kind": "PriceTable", "revision": "p1",
            "providers": {
                "anthropic": {"claude-sonnet-4-5": claude},
                "openai": {"gpt-4o-mini": {"input": "0.15", "cache_write": "0.15",
                                           "output": "0.60"}}}}))
        return load_bundle(d)

    def one_hour(warnings: tuple[str, ...]) -> list[str]:
        # (Both models can also search: web_search_per_1k warnings are tested on their own.)
        return [w for w in warnings if "cache_write_1h" in w]

    base = {"input": "3.00", "cached_input": "0.30", "cache_write": "3.75", "output": "15.00"}
    warned = one_hour(snapshot(base).warnings)
    assert len(warned) == 1
    assert "anthropic.claude-sonnet-4-5" in warned[0] and "cache_write_1h" in warned[0]
    assert one_hour(snapshot({**base, "cache_write_1h": "6.00"}).warnings) == []
