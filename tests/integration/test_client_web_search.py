"""keel_pdp.client with the official openai and anthropic SDKs and web search: a real
``keel-pdp serve`` on a real Redis, the mock provider behind ``base_url``.

The call's tools (Anthropic's web search tool and its ``max_uses``, OpenAI's
web_search tool and ``max_tool_calls``, a search model) price its hold; the searches
the answer reports (Anthropic's ``server_tool_use.web_search_requests``, OpenAI's
``web_search_call`` items, one per search-model answer) are booked by its closeout.
Also: a prompt written to the cache with a one-hour lifetime is held at that rate.

Expected figures come from the providers' documented prices, written here as
integers (token prices in 1/10_000 USD per 1M tokens; sources in
tests/unit/test_web_search_fees.py and tests/unit/test_cache_write_holds.py):
claude-sonnet-4-5 3.00 / writes 3.75 (5m), 6.00 (1h) / 15.00 and $10 per 1,000
searches; gpt-5 1.25 / 10.00 and $10 per 1,000 web_search calls;
gpt-4o-mini-search-preview 0.15 / 0.60 and $25 per 1,000 calls.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import redis

from keel_pdp.client import AsyncKeelClient, KeelClient
from tests.conftest import RedisServer
from tests.helpers import budget
from tests.integration.client_stack import ClientStack, redis_reader, running
from tests.integration.envoy_fixture import events, permit_state

RATES = {"claude-sonnet-4-5": {"input": 30_000, "write_5m": 37_500, "write_1h": 60_000,
                               "output": 150_000},
         "gpt-5": {"input": 12_500, "output": 100_000},
         "gpt-4o-mini-search-preview": {"input": 1_500, "output": 6_000}}
FEE = {"claude-sonnet-4-5": 10_000, "gpt-5": 10_000, "gpt-4o-mini-search-preview": 25_000}
HOLD_CALLS = 6  # the bundle's web_search_hold_calls
IN, OUT, CAP = 3_000, 120, 400
PROMPT = "lorem " * 2_000


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(model: str, input_tokens: int, output_tokens: int, searches: int = 0,
         input_rate: str = "input") -> int:
    r = RATES[model]
    units = input_tokens * r[input_rate] + output_tokens * r["output"]
    return -(-(units + searches * FEE[model] * 10_000) // 10_000)


PRICES = {
    "anthropic": {"claude-sonnet-4-5": {
        "input": usd(30_000), "cache_write": usd(37_500), "cache_write_1h": usd(60_000),
        "output": usd(150_000), "max_output_tokens": 1000, "web_search_per_1k": "10"}},
    "openai": {
        "gpt-5": {"input": usd(12_500), "output": usd(100_000), "max_output_tokens": 1000,
                  "web_search_per_1k": "10"},
        "gpt-4o-mini-search-preview": {"input": usd(1_500), "output": usd(6_000),
                                       "max_output_tokens": 1000,
                                       "web_search_per_1k": "25"}},
}


class Stack(ClientStack):
    """The sidecar with this module's prices, and the mock provider."""

    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path) -> None:
        super().__init__(redis_server, workdir, [budget("all", "100.00")], prices=PRICES,
                         settings={"web_search_hold_calls": HOLD_CALLS})


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    with running(Stack, redis_server, "keel-client-web-search-") as s:
        yield s


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_reader(redis_server) as client:
        yield client


def mock(searches: int = 0, **more: str) -> dict[str, str]:
    return {"x-mock-input-tokens": str(IN), "x-mock-output-tokens": str(OUT),
            "x-mock-web-searches": str(searches), **more}


def booked(rdb: redis.Redis, permit: Any) -> tuple[dict[str, Any], dict[str, Any],
                                                   dict[str, Any]]:
    """(the decision event's data, the settlement event's data and res); the answer
    the sidecar gave the client agrees with the settlement event."""
    assert permit.settlement is not None, permit.settle_error
    assert permit_state(rdb, permit.permit_id)["state"] == "settled"
    (decision,) = events(rdb, permit.permit_id, "decision")
    (settlement,) = events(rdb, permit.permit_id, "settlement")
    assert settlement["res"]["act"] == permit.settlement.actual_cost_micros
    return decision["data"], settlement["data"], settlement["res"]


def ant(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test", base_url=stack.root, max_retries=0)


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=stack.root + "/v1", max_retries=0)


SEARCH: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 4}
MESSAGES: Any = [{"role": "user", "content": PROMPT}]


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_search_call_is_held_for_max_uses_and_books_what_it_made(
        stack: Stack, rdb: redis.Redis, stream: bool) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack), tenant="acme", workload="research")
        r = client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP,
                                   messages=MESSAGES, tools=[SEARCH], stream=stream,
                                   extra_headers=mock(3))
        if stream:
            items = list(r)
            assert [i.content_block.type for i in items if i.type == "content_block_start"] \
                .count("server_tool_use") == 3
        else:
            assert r.usage.server_tool_use is not None
            assert r.usage.server_tool_use.web_search_requests == 3
        decision, data, res = booked(rdb, client.last_permit)
    assert client.last_permit.web_search_calls == 4
    assert decision["web_search"] == {"max": 4, "held": 4, "fee": FEE["claude-sonnet-4-5"]
                                      * 1_000_000}
    assert decision["est"] == cost("claude-sonnet-4-5", decision["in_tok"], CAP, 4)
    assert data["usage"]["ws"] == 3
    assert res["act"] == cost("claude-sonnet-4-5", IN, OUT, 3)


async def test_an_openai_responses_stream_without_a_bound_holds_the_default(
        stack: Stack, rdb: redis.Redis) -> None:
    aoai = openai.AsyncOpenAI(api_key="test", base_url=stack.root + "/v1", max_retries=0)
    async with AsyncKeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(aoai, tenant="acme", workload="research")
        stream = await client.responses.create(
            model="gpt-5", input=PROMPT, max_output_tokens=CAP, stream=True,
            tools=[{"type": "web_search"}],
            extra_headers=mock(2, **{"x-mock-web-search-opens": "1"}))
        items = [i async for i in stream]
        assert items[-1].type == "response.completed"
        decision, data, res = await asyncio.to_thread(booked, rdb, client.last_permit)
    assert decision["web_search"]["held"] == HOLD_CALLS
    assert decision["est"] == cost("gpt-5", decision["in_tok"], CAP, HOLD_CALLS)
    assert data["usage"]["ws"] == 2  # the page opened is no billed call
    assert res["act"] == cost("gpt-5", IN, OUT, 2)


def test_a_responses_call_bounded_by_max_tool_calls(stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="research")
        r = client.responses.create(model="gpt-5", input=PROMPT, max_output_tokens=CAP,
                                    tools=[{"type": "web_search"}], max_tool_calls=2,
                                    extra_headers=mock(5))
        assert [o.type for o in r.output].count("web_search_call") == 2
        decision, data, res = booked(rdb, client.last_permit)
    assert decision["web_search"]["held"] == 2
    assert data["usage"]["ws"] == 2
    assert res["act"] == cost("gpt-5", IN, OUT, 2)


def test_a_search_model_chat_call_books_one_search(stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="research")
        client.chat.completions.create(
            model="gpt-4o-mini-search-preview", messages=MESSAGES,
            max_completion_tokens=CAP, web_search_options={}, extra_headers=mock())
        decision, data, res = booked(rdb, client.last_permit)
    assert decision["web_search"]["held"] == HOLD_CALLS
    assert data["usage"]["ws"] == 1
    assert res["act"] == cost("gpt-4o-mini-search-preview", IN, OUT, 1)


def test_a_call_without_a_search_tool_holds_and_books_no_searches(
        stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack), tenant="acme", workload="research")
        client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP, messages=MESSAGES,
                               extra_headers=mock(3))  # no tool: the mock makes none
        decision, data, res = booked(rdb, client.last_permit)
    assert "web_search" not in decision and "ws" not in data["usage"]
    assert res["act"] == cost("claude-sonnet-4-5", IN, OUT)


def test_a_timed_out_search_call_is_booked_at_the_hold_with_its_searches(
        stack: Stack, rdb: redis.Redis) -> None:
    """The provider may have searched and billed a call that timed out: booked at the
    hold, the 4 searches it was held for included."""
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack).with_options(timeout=0.5), tenant="acme",
                           workload="research")
        with pytest.raises(anthropic.APITimeoutError):
            client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP,
                                   messages=MESSAGES, tools=[SEARCH],
                                   extra_headers=mock(3, **{"x-mock-mode": "hang"}))
        decision, data, res = booked(rdb, client.last_permit)
    assert data["outcome"] == "CANCELLED"
    assert data["usage"]["ws"] == 4
    assert res["act"] == decision["est"]


def test_a_broken_stream_books_the_searches_it_showed(stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack), tenant="acme", workload="research")
        with pytest.raises((anthropic.APIConnectionError, anthropic.APIError)):
            for _ in client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP,
                                            messages=MESSAGES, tools=[SEARCH], stream=True,
                                            extra_headers=mock(3, **{"x-mock-mode": "break"})):
                pass
        _, data, _ = booked(rdb, client.last_permit)
    assert data["outcome"] == "PARTIAL"
    assert data["usage"]["ws"] == 3


@pytest.mark.parametrize(("told", "ws"), [
    ("1000000000000", 4),  # impossible for the permit: booked at the hold, 4 searches
    ('"3"', 3),  # no count: the usage is unreadable, the 3 search blocks are booked
    ("-2", 3),
])
def test_a_hostile_search_count_never_books_free_searches(
        stack: Stack, rdb: redis.Redis, told: str, ws: int) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack), tenant="acme", workload="research")
        client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP, messages=MESSAGES,
                               tools=[SEARCH],
                               extra_headers=mock(3, **{"x-mock-web-searches-json": told}))
        _, data, res = booked(rdb, client.last_permit)
    assert data["usage"]["ws"] == ws
    assert res["act"] >= cost("claude-sonnet-4-5", 0, 0, ws)


def test_a_prompt_written_for_an_hour_is_held_at_the_one_hour_write_rate(
        stack: Stack, rdb: redis.Redis) -> None:
    system: Any = [{"type": "text", "text": PROMPT,
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant(stack), tenant="acme", workload="research")
        client.messages.create(
            model="claude-sonnet-4-5", max_tokens=CAP, system=system,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={**mock(), "x-mock-cache-write-tokens": str(IN - 100),
                           "x-mock-cache-write-1h-tokens": str(IN - 100)})
        decision, data, res = booked(rdb, client.last_permit)
    assert decision["cache_ttl"] == "1h"
    assert data["usage"]["cw"] == IN - 100
    assert decision["est"] == cost("claude-sonnet-4-5", decision["in_tok"], CAP,
                                   input_rate="write_1h")
    assert res["act"] == -(-(100 * 30_000 + (IN - 100) * 60_000 + OUT * 150_000) // 10_000)
    assert "COST_ABOVE_HOLD" not in res.get("flags", [])
