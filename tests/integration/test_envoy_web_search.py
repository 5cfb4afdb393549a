"""Web search through a real Envoy and a real Redis: the request's search tool prices
the hold, the searches the answer reports are booked, and a prompt marked for the
one-hour cache is held at that write rate.

Expected figures come from the documented prices, written here as integers (token
prices in 1/10_000 USD per 1M tokens; sources in tests/unit/test_web_search_fees.py
and tests/unit/test_cache_write_holds.py): claude-sonnet-4-5 input 3.00, one-hour
cache writes 6.00, output 15.00, $10 per 1,000 searches; gpt-5 1.25 / 10.00 and $10
per 1,000 web_search calls.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer
from tests.helpers import budget, write_bundle
from tests.integration.envoy_fixture import (
    MeshStack,
    events,
    mesh_stack,
    permit_state,
    redis_client,
)

SONNET = {"input": 30_000, "write_1h": 60_000, "output": 150_000}
GPT5 = {"input": 12_500, "output": 100_000}
SEARCH_MICROS = 10_000
IN, OUT, CAP = 1_500, 40, 200


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(rates: dict[str, int], input_tokens: int, output_tokens: int, searches: int = 0,
         input_rate: str = "input") -> int:
    units = input_tokens * rates[input_rate] + output_tokens * rates["output"]
    return -(-(units + searches * SEARCH_MICROS * 10_000) // 10_000)


@pytest.fixture(scope="module")
def mesh(redis_server: RedisServer) -> Iterator[MeshStack]:
    with tempfile.TemporaryDirectory(prefix="keel-search-") as d:
        policies = write_bundle(pathlib.Path(d), [budget("all", "100.00")], prices={
            "anthropic": {"claude-sonnet-4-5": {
                "input": usd(SONNET["input"]), "cache_write_1h": usd(SONNET["write_1h"]),
                "output": usd(SONNET["output"]), "max_output_tokens": 1000,
                "web_search_per_1k": "10"}},
            "openai": {"gpt-5": {**{k: usd(v) for k, v in GPT5.items()},
                                 "max_output_tokens": 1000, "web_search_per_1k": "10"}}},
            settings={"web_search_hold_calls": 5})
        yield from mesh_stack(redis_server, "split", policies=policies)


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


def mock(searches: int = 0, **more: str) -> dict[str, str]:
    return {"x-mock-input-tokens": str(IN), "x-mock-output-tokens": str(OUT),
            "x-mock-web-searches": str(searches), **more}


def booked(r: redis.Redis, pid: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    permit_state(r, pid)
    (decision,) = events(r, pid, "decision")
    (settlement,) = events(r, pid, "settlement")
    return decision["data"], settlement["data"], settlement["res"]


def messages(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": CAP,
            "messages": [{"role": "user", "content": "What happened today?"}], **extra}


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_search_call_is_held_for_max_uses_and_books_its_searches(
        mesh: MeshStack, rdb: redis.Redis, stream: bool) -> None:
    body = messages(stream=stream, tools=[{"type": "web_search_20250305",
                                           "name": "web_search", "max_uses": 4}])
    reply = mesh.call("/v1/messages", body, headers=mock(3))
    assert reply.status == 200, reply.body
    assert reply.body.count(b'"server_tool_use"') >= 3
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert decision["web_search"]["held"] == 4
    assert decision["est"] == cost(SONNET, decision["in_tok"], CAP, 4)
    assert data["usage"]["ws"] == 3
    assert res["act"] == cost(SONNET, IN, OUT, 3)


def test_a_responses_stream_without_a_bound_books_its_search_calls(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = {"model": "gpt-5", "max_output_tokens": CAP, "input": "What happened today?",
            "stream": True, "tools": [{"type": "web_search"}]}
    reply = mesh.call("/v1/responses", body,
                      headers=mock(2, **{"x-mock-web-search-opens": "1"}))
    assert reply.status == 200
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert decision["web_search"]["held"] == 5
    assert decision["est"] == cost(GPT5, decision["in_tok"], CAP, 5)
    assert data["usage"]["ws"] == 2
    assert res["act"] == cost(GPT5, IN, OUT, 2)


def test_a_prompt_marked_for_the_one_hour_cache_is_held_at_that_rate(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = messages(system=[{"type": "text", "text": "You answer briefly.",
                             "cache_control": {"type": "ephemeral", "ttl": "1h"}}])
    reply = mesh.call("/v1/messages", body, headers=mock())
    assert reply.status == 200
    decision, _, _ = booked(rdb, reply.headers["x-keel-permit-id"])
    assert decision["cache_ttl"] == "1h"
    assert decision["est"] == cost(SONNET, decision["in_tok"], CAP, input_rate="write_1h")
