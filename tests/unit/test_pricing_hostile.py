"""Hostile callers and providers against the prices of service tiers, web search
fees and cache-write holds: each test names the way money would be lost.

Expected figures are written as integers worked out here from OpenAI's documented
gpt-5 prices (never with Keel's pricing code): standard 1.25 / output 10.00 USD per
1M tokens, flex 0.625 / 5.00, priority 2.50 / 20.00; web search $10 per 1,000 calls
(10_000 micro-USD a call).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, InvalidRequest
from keel_pdp.decision.shape import fingerprint
from keel_pdp.engine import Engine
from keel_pdp.mesh.apis import Api
from keel_pdp.mesh.usage import ResponseMeter
from tests.helpers import budget, make_engine, write_bundle
from tests.helpers import window_sum as held

PRICES: dict[str, Any] = {"openai": {"gpt-5": {
    "input": "1.25", "output": "10.00", "max_output_tokens": 4096, "web_search_per_1k": "10",
    "service_tiers": {"flex": {"input": "0.625", "output": "5.00"},
                      "priority": {"input": "2.50", "output": "20.00"}}}}}
IN, OUT = 10_000, 1_000
# 10_000 x 0.625 + 1_000 x 5.00 = 6_250 + 5_000 micro-USD
FLEX_HOLD = 11_250


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    return make_engine(aio_client, write_bundle(tmp_path / "b", [budget("all", "1000.00")],
                                                prices=PRICES))


def ask(rid: str, **kw: Any) -> AuthorizeInput:
    return AuthorizeInput(rid, "acme", "chat", "gpt-5", "openai", IN, OUT, **kw)


# ------------------------------------------------------- one request_id, one request
@pytest.mark.parametrize("retry", [
    {"service_tier": "priority"},  # a priority call riding on a flex hold
    {"service_tier": "flex", "max_web_search_calls": 50},  # 50 searches held for none
    {"service_tier": "flex", "cache_write_ttl": "1h"},
    {},  # "auto": held at the highest rate, not at flex
])
async def test_a_retry_asking_for_a_dearer_call_is_refused_not_a_replay_of_the_cheap_hold(
        engine: Engine, retry: dict[str, Any]) -> None:
    """The same request_id with another tier, search bound or cache lifetime is
    another request (README: "the same id with different parameters is
    INVALID_ARGUMENT"), never answered replayed=true with the flex permit, whose
    hold does not cover what the retry will send the provider."""
    first = await engine.authorize(ask("r1", service_tier="flex"))
    assert first.estimated_cost_micros == FLEX_HOLD
    with pytest.raises(InvalidRequest, match="different parameters"):
        await engine.authorize(ask("r1", **retry))
    assert await held(engine) == FLEX_HOLD


async def test_a_true_retry_of_a_priced_request_is_still_a_replay(engine: Engine) -> None:
    kw: dict[str, Any] = {"service_tier": "priority", "max_web_search_calls": 2,
                          "cache_write_ttl": "5m"}
    first = await engine.authorize(ask("r2", **kw))
    again = await engine.authorize(ask("r2", **kw))
    assert again.replayed and again.permit_id == first.permit_id
    assert again.web_search_calls == 2
    # 10_000 x 2.50 + 1_000 x 20.00 + 2 searches = 25_000 + 20_000 + 20_000
    assert await held(engine) == first.estimated_cost_micros == 65_000


@pytest.mark.parametrize(("first", "retry"), [("", "auto"), ("auto", "")])
async def test_auto_and_no_tier_are_one_request(engine: Engine, first: str,
                                                retry: str) -> None:
    """OpenAI treats "auto" and no service_tier alike, and so does the hold (both at
    the bundle's auto_service_tier): a retry that spells it the other way is the same
    request, answered by replay, not refused."""
    a = await engine.authorize(ask("r3", service_tier=first))
    b = await engine.authorize(ask("r3", service_tier=retry))
    assert b.replayed and b.permit_id == a.permit_id
    assert await held(engine) == a.estimated_cost_micros


def test_an_auto_request_digests_as_a_request_of_the_previous_version() -> None:
    # The previous version's idempotency records know no tier: a retry of its
    # request that now says "auto" must still be recognised during a rolling upgrade.
    plain = ask("r4")
    assert fingerprint(replace(plain, service_tier="auto")) == fingerprint(plain)
    assert fingerprint(replace(plain, service_tier="priority")) != fingerprint(plain)


# ------------------------------------------------- counts that are no counts, in lists
@pytest.mark.parametrize(("api", "usage"), [
    (Api.MESSAGES, {"input_tokens": 900, "output_tokens": [1500]}),
    (Api.MESSAGES, {"input_tokens": [900], "output_tokens": 40}),
    (Api.CHAT, {"prompt_tokens": 900, "completion_tokens": [1500]}),
    (Api.RESPONSES, {"input_tokens": 900, "output_tokens": [1500]}),
    (Api.MESSAGES, {"input_tokens": 900, "output_tokens": 40,
                    "server_tool_use": {"web_search_requests": [3]}}),
])
def test_a_count_written_as_a_list_is_unreadable_never_zero(
        api: Api, usage: dict[str, Any]) -> None:
    """``"output_tokens": [1500]`` read as 0 tokens books the call's output at $0;
    it is no count, so the usage is unreadable and the call is settled on Keel's
    estimate (README "Server-tool fees": never as 0)."""
    body = {"model": "gpt-5", "usage": usage,
            "choices" if api is Api.CHAT else "content": []}
    m = ResponseMeter(api, "application/json")
    m.feed(json.dumps(body).encode())
    assert m.reading(complete=True).usage is None


def test_a_breakdown_list_beside_its_totals_is_still_read() -> None:
    """Gemini's per-modality lists sit beside the totals: the totals are booked."""
    usage = {"promptTokenCount": 900, "candidatesTokenCount": 40,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 900}]}
    m = ResponseMeter(Api.GENERATE_CONTENT, "application/json")
    m.feed(json.dumps({"usageMetadata": usage, "candidates": []}).encode())
    r = m.reading(complete=True).usage
    assert r is not None and (r.input_tokens, r.output_tokens) == (900, 40)


# --------------------------------------------- stream items whose id is no id
def sse(*objs: dict[str, Any]) -> bytes:
    return b"".join(f"event: {o['type']}\ndata: {json.dumps(o)}\n\n".encode() for o in objs)


@pytest.mark.parametrize("odd", [["ws_1"], {"id": "ws_1"}])
def test_a_search_item_whose_id_is_no_id_is_counted_and_the_usage_still_read(odd: Any) -> None:
    """An id (or index) that is a list or an object used to raise inside the reading
    of the answer: the stream to Envoy broke and the call was settled on an estimate
    instead of the usage the provider reported."""
    item = {"type": "web_search_call", "id": odd, "action": {"type": "search"}}
    body = sse(
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": {
            "service_tier": "default", "output": [item],
            "usage": {"input_tokens": 900, "output_tokens": 40}}})
    m = ResponseMeter(Api.RESPONSES, "text/event-stream")
    m.feed(body)
    r = m.reading(complete=True)
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.web_search_calls) == (900, 40, 1)

    block = {"type": "server_tool_use", "id": odd, "name": "web_search", "input": {}}
    body = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 900,
                                                        "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "content_block_start", "index": 1, "content_block": block},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 40}})
    m = ResponseMeter(Api.MESSAGES, "text/event-stream")
    m.feed(body)
    r = m.reading(complete=True)
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.web_search_calls) == (900, 40, 2)
