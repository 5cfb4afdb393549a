"""keel_pdp.client with the official openai SDK and its ``service_tier`` argument: a real
``keel-pdp serve`` on a real Redis, the mock provider behind ``base_url``.

The call's ``service_tier`` prices its hold; the tier the answer reports (the JSON
answer, the chat stream's chunks, the event a Responses stream completes with) prices
its closeout. Expected figures come from OpenAI's documented gpt-5 prices, written here
as integers in ten-thousandths of a dollar per million tokens (sources in
tests/unit/test_service_tiers.py), with this file's own arithmetic.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from keel_pdp.client import AsyncKeelClient, KeelClient
from tests.conftest import RedisServer
from tests.helpers import budget
from tests.integration.client_stack import ClientStack, redis_reader, running
from tests.integration.envoy_fixture import events, permit_state

GPT5 = {
    "default": {"input": 12_500, "cached_input": 1_250, "output": 100_000},
    "priority": {"input": 25_000, "cached_input": 2_500, "output": 200_000},
    "flex": {"input": 6_250, "cached_input": 625, "output": 50_000},
}
IN, CACHED, OUT, CAP = 3_000, 1_000, 120, 400
PROMPT = "lorem " * 2_000


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(tier: str, input_tokens: int, cached: int, output_tokens: int) -> int:
    r = GPT5[tier]
    units = ((input_tokens - cached) * r["input"] + cached * r["cached_input"]
             + output_tokens * r["output"])
    return -(-units // 10_000)


class Stack(ClientStack):
    """The sidecar with gpt-5 priced at its three tiers, and the mock provider."""

    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path) -> None:
        super().__init__(redis_server, workdir, [budget("all", "100.00")], prices={
            "openai": {"gpt-5": {
                **{k: usd(v) for k, v in GPT5["default"].items()}, "max_output_tokens": 1000,
                "service_tiers": {t: {k: usd(v) for k, v in GPT5[t].items()}
                                  for t in ("flex", "priority")}}}})

    @property
    def base_url(self) -> str:
        return self.root + "/v1"


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    with running(Stack, redis_server, "keel-client-tiers-") as s:
        yield s


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_reader(redis_server) as client:
        yield client


MOCK = {"x-mock-input-tokens": str(IN), "x-mock-cached-tokens": str(CACHED),
        "x-mock-output-tokens": str(OUT)}


def booked(rdb: redis.Redis, permit: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the decision event's data, the settlement event's data); the answer the
    sidecar gave the client agrees with the settlement event."""
    assert permit.settlement is not None, permit.settle_error
    assert permit_state(rdb, permit.permit_id)["state"] == "settled"
    (decision,) = events(rdb, permit.permit_id, "decision")
    (settlement,) = events(rdb, permit.permit_id, "settlement")
    assert settlement["res"]["act"] == permit.settlement.actual_cost_micros
    return decision["data"], settlement["data"]


def held_at(decision: dict[str, Any], tier: str) -> bool:
    return bool(decision["est"] == cost(tier, decision["in_tok"], 0, decision["out_tok"]))


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=stack.base_url, max_retries=0)


def test_a_priority_chat_call_is_held_and_settled_at_priority(
        stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="chat")
        r = client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP, service_tier="priority", extra_headers=MOCK)
        assert r.service_tier == "priority"
        decision, data = booked(rdb, client.last_permit)
    assert decision["service_tier"] == "priority" and held_at(decision, "priority")
    assert decision["out_tok"] == CAP
    assert client.last_permit.settlement.actual_cost_micros == cost("priority", IN, CACHED, OUT)
    assert data["priced_tier"] == "priority"


def test_a_flex_responses_stream_is_held_and_settled_at_flex(
        stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="chat")
        items = list(client.responses.create(model="gpt-5", input=PROMPT,
                                             max_output_tokens=CAP, stream=True,
                                             service_tier="flex", extra_headers=MOCK))
        assert items[-1].type == "response.completed"
        decision, data = booked(rdb, client.last_permit)
    assert data["priced_tier"] == "flex"
    assert held_at(decision, "flex")
    assert client.last_permit.settlement.actual_cost_micros == cost("flex", IN, CACHED, OUT)


async def test_an_auto_chat_stream_reported_default_settles_at_standard(
        stack: Stack, rdb: redis.Redis) -> None:
    aoai = openai.AsyncOpenAI(api_key="test", base_url=stack.base_url, max_retries=0)
    async with AsyncKeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(aoai, tenant="acme", workload="chat")
        stream = await client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP, stream=True, service_tier="auto", extra_headers=MOCK)
        chunks = [c async for c in stream]
        assert chunks[0].service_tier == "default"
        decision, data = await asyncio.to_thread(booked, rdb, client.last_permit)
    assert decision["held_tier"] == "highest" and held_at(decision, "priority")
    assert client.last_permit.settlement.actual_cost_micros == cost("default", IN, CACHED, OUT)
    assert data["service_tier"] == "default"


def test_a_call_without_a_tier_the_answer_names_is_booked_at_the_tier_named(
        stack: Stack, rdb: redis.Redis) -> None:
    """No service_tier argument: the provider's auto. The mock answers at priority
    (a project whose configured tier is priority)."""
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="chat")
        client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP,
            extra_headers={**MOCK, "x-mock-service-tier": "priority"})
        decision, data = booked(rdb, client.last_permit)
    assert data["service_tier"] == "priority"
    assert "service_tier" not in decision and held_at(decision, "priority")
    assert client.last_permit.settlement.actual_cost_micros == cost("priority", IN, CACHED, OUT)


def test_an_answer_whose_tier_is_no_tier_name_books_the_highest_rate_flagged(
        stack: Stack, rdb: redis.Redis) -> None:
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="chat")
        client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP, service_tier="flex",
            extra_headers={**MOCK, "x-mock-service-tier-json": '"' + "f" * 300 + '"'})
        decision, data = booked(rdb, client.last_permit)
    assert held_at(decision, "flex")
    assert client.last_permit.settlement.actual_cost_micros == cost("priority", IN, CACHED, OUT)
    assert data["service_tier"] == "unreadable" and data["tier_unpriced"] is True


@pytest.mark.parametrize("value", [3, ["flex"], "x" * 10_000, "fl ex"])
def test_a_service_tier_argument_that_is_no_tier_name_is_refused_before_any_permit(
        stack: Stack, rdb: redis.Redis, value: Any) -> None:
    before = len(stack.mock.stats.calls)
    decisions = rdb.xlen("keel:{pdp}:events")
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(oai(stack), tenant="acme", workload="chat")
        with pytest.raises(TypeError, match="service_tier"):
            client.chat.completions.create(
                model="gpt-5", messages=[{"role": "user", "content": "hi"}],
                max_completion_tokens=CAP, service_tier=value, extra_headers=MOCK)
    assert len(stack.mock.stats.calls) == before
    assert rdb.xlen("keel:{pdp}:events") == decisions
