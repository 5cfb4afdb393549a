"""A request that marks prompt-cache breakpoints is held at the cache-write rate.

The provider bills a prompt written to the cache at the write rate of its lifetime
(Anthropic, docs.anthropic.com prompt caching pricing: five-minute writes 1.25x the
base input price, one-hour writes 2x; claude-sonnet-4-5: input 3.00, five-minute
writes 3.75, one-hour writes 6.00, reads 0.30, output 15.00 USD per 1M tokens). A
hold at the plain input rate is then below what the call settles at
(COST_ABOVE_HOLD). Keel holds the whole estimated input at the write rate of the
longest lifetime the request marks; the closeout books the real split.

Prices are written in 1/10_000 USD per 1M tokens (3.00 USD = 30_000): a cost is
sum(tokens x units) / 10_000 micro-USD, rounded up once.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.mesh.request import Api, parse_body, parse_partial
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, write_bundle

SONNET = {"input": 30_000, "cached_input": 3_000, "write_5m": 37_500, "write_1h": 60_000,
          "output": 150_000}
GPT5 = {"input": 12_500, "output": 100_000}


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


PRICES: dict[str, Any] = {
    "anthropic": {"claude-sonnet-4-5": {
        "input": usd(SONNET["input"]), "cached_input": usd(SONNET["cached_input"]),
        "cache_write": usd(SONNET["write_5m"]), "cache_write_1h": usd(SONNET["write_1h"]),
        "output": usd(SONNET["output"]), "max_output_tokens": 4096}},
    # OpenAI bills no cache writes: cache_write defaults to the input rate.
    "openai": {"gpt-5": {"input": usd(GPT5["input"]), "output": usd(GPT5["output"]),
                         "max_output_tokens": 4096}},
}
IN, OUT = 8_000, 1_000


def micros(units: int) -> int:
    return -(-units // 10_000)


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    return make_engine(aio_client, write_bundle(tmp_path / "b", [budget("all", "1000.00")],
                                                prices=PRICES))


def ask(rid: str, ttl: str, model: str = "claude-sonnet-4-5", provider: str = "anthropic",
        out: int = OUT) -> AuthorizeInput:
    return AuthorizeInput(rid, "acme", "chat", model, provider, IN, out, cache_write_ttl=ttl)


@pytest.mark.parametrize(("ttl", "rate"), [("", "input"), ("5m", "write_5m"),
                                           ("1h", "write_1h")])
async def test_the_input_is_held_at_the_write_rate_of_the_marked_lifetime(
        engine: Engine, ttl: str, rate: str) -> None:
    out = await engine.authorize(ask(f"t{ttl}", ttl))
    assert out.estimated_cost_micros == micros(IN * SONNET[rate] + OUT * SONNET["output"])


@pytest.mark.parametrize(("ttl", "written_1h"), [("5m", 0), ("1h", IN - 500)])
async def test_a_call_that_writes_its_prompt_settles_within_its_hold(
        engine: Engine, ttl: str, written_1h: int) -> None:
    """The whole prompt but 500 tokens written to the cache: booked at the write
    rate, within the hold (no COST_ABOVE_HOLD)."""
    out = await engine.authorize(ask(f"w{ttl}", ttl))
    usage = TokenUsage(input_tokens=IN, cache_write_tokens=IN - 500, output_tokens=OUT,
                       cache_write_1h_tokens=written_1h)
    res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    write = SONNET["write_1h"] if written_1h else SONNET["write_5m"]
    assert res.actual_cost_micros == micros(500 * SONNET["input"] + (IN - 500) * write
                                            + OUT * SONNET["output"])
    assert res.actual_cost_micros <= out.estimated_cost_micros
    assert "COST_ABOVE_HOLD" not in res.flags


async def test_a_cache_read_settles_below_the_hold_and_gives_the_rest_back(
        engine: Engine) -> None:
    out = await engine.authorize(ask("read", "1h"))
    usage = TokenUsage(input_tokens=IN, cached_input_tokens=IN - 500, output_tokens=OUT)
    res = await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    assert res.actual_cost_micros == micros(500 * SONNET["input"] + (IN - 500)
                                            * SONNET["cached_input"] + OUT * SONNET["output"])
    assert res.correction_micros == res.actual_cost_micros - out.estimated_cost_micros < 0


async def test_a_model_without_a_write_rate_is_held_at_its_input_rate(engine: Engine) -> None:
    out = await engine.authorize(ask("oa", "1h", "gpt-5", "openai"))
    assert out.estimated_cost_micros == micros(IN * GPT5["input"] + OUT * GPT5["output"])


async def test_the_output_cap_leaves_room_for_the_input_at_the_write_rate(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    """$0.10 of headroom: 8,000 input tokens at the one-hour write rate ($0.048) leave
    $0.052, i.e. 3,466 output tokens at $15 per 1M (at the input rate it would have
    been 4,000 of them, a hold below the call's cost)."""
    eng = make_engine(aio_client, write_bundle(tmp_path / "small", [budget("all", "0.10")],
                                               prices=PRICES))
    out = await eng.authorize(ask("cap", "1h", out=4_096))
    assert out.decision.value == "CONSTRAIN"
    assert out.max_output_tokens == (100_000 * 10_000 - IN * SONNET["write_1h"]) \
        // SONNET["output"] == 3_466
    assert out.estimated_cost_micros == micros(IN * SONNET["write_1h"]
                                               + 3_466 * SONNET["output"])


@pytest.mark.parametrize("ttl", ["2h", "5M", "1 h", "x" * 100])
async def test_a_lifetime_that_is_no_cache_ttl_is_refused(engine: Engine, ttl: str) -> None:
    with pytest.raises(InvalidRequest, match="cache_write_ttl"):
        await engine.authorize(ask("bad", ttl))


# ------------------------------------------------------------------ reading the body
def anthropic(**body: Any) -> bytes:
    import json
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 100,
                       "messages": [{"role": "user", "content": "hi"}], **body}).encode()


@pytest.mark.parametrize(("body", "ttl"), [
    ({}, ""),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]},
     "5m"),
    ({"cache_control": {"type": "ephemeral", "ttl": "1h"}}, "1h"),  # automatic caching
    ({"tools": [{"name": "t", "input_schema": {"type": "object"},
                 "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}, "5m"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
        {"type": "tool_result", "tool_use_id": "x", "content": [
            {"type": "text", "text": "b",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}]}, "1h"),
    # A property of a tool's input schema named cache_control marks nothing.
    ({"tools": [{"name": "t", "input_schema": {"type": "object", "properties": {
        "cache_control": {"type": "object", "ttl": "1h"}}}}]}, ""),
])
def test_the_mesh_reads_the_longest_lifetime_an_anthropic_body_marks(
        body: dict[str, Any], ttl: str) -> None:
    assert parse_body(Api.MESSAGES, "anthropic", anthropic(**body)).cache_write_ttl == ttl


def test_bedrock_bodies_mark_breakpoints_their_own_ways() -> None:
    import json
    converse = json.dumps({"messages": [{"role": "user", "content": [
        {"text": "hi"}, {"cachePoint": {"type": "default"}}]}],
        "system": [{"text": "s"}, {"cachePoint": {"type": "default", "ttl": "1h"}}]})
    assert parse_body(Api.CONVERSE, "bedrock", converse.encode(),
                      path_model="anthropic.claude").cache_write_ttl == "1h"
    invoke = anthropic(system=[{"type": "text", "text": "s",
                                "cache_control": {"type": "ephemeral"}}])
    assert parse_body(Api.INVOKE_MESSAGES, "bedrock", invoke,
                      path_model="anthropic.claude").cache_write_ttl == "5m"
    # OpenAI bodies have no breakpoints: an unknown member is not read as one.
    chat = json.dumps({"model": "gpt-5", "messages": [], "cache_control": {"ttl": "1h"}})
    assert parse_body(Api.CHAT, "openai", chat.encode()).cache_write_ttl == ""


def test_a_cut_body_is_read_by_pattern() -> None:
    """Envoy cut the body: the marks in the prefix that arrived are read by pattern."""
    import json

    def cut(system: list[dict[str, Any]]) -> bytes:
        raw = json.dumps({"model": "claude-sonnet-4-5", "system": system,
                          "messages": [{"role": "user", "content": "x" * 500}]}).encode()
        return raw[:-100]

    one_hour = [{"type": "text", "text": "s",
                 "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    five = [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]
    for system, ttl in ((one_hour, "1h"), (five, "5m"), ([], "")):
        assert parse_partial(Api.MESSAGES, "anthropic", cut(system), 2_000) \
            .cache_write_ttl == ttl
