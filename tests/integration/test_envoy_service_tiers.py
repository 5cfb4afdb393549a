"""OpenAI service tiers through a real Envoy and a real Redis: the tier the request body
asks for prices the hold, the tier the answer reports prices the closeout.

Expected figures come from OpenAI's documented gpt-5 prices, written here as integers in
ten-thousandths of a dollar per million tokens (sources in tests/unit/test_service_tiers.py),
with this file's own arithmetic.
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

GPT5 = {
    "default": {"input": 12_500, "cached_input": 1_250, "output": 100_000},
    "priority": {"input": 25_000, "cached_input": 2_500, "output": 200_000},
    "flex": {"input": 6_250, "cached_input": 625, "output": 50_000},
}
IN, CACHED, OUT, CAP = 1_500, 500, 40, 200


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(tier: str, input_tokens: int, cached: int, output_tokens: int) -> int:
    r = GPT5[tier]
    units = ((input_tokens - cached) * r["input"] + cached * r["cached_input"]
             + output_tokens * r["output"])
    return -(-units // 10_000)


@pytest.fixture(scope="module")
def mesh(redis_server: RedisServer) -> Iterator[MeshStack]:
    with tempfile.TemporaryDirectory(prefix="keel-tiers-") as d:
        policies = write_bundle(pathlib.Path(d), [budget("all", "100.00")], prices={"openai": {
            "gpt-5": {**{k: usd(v) for k, v in GPT5["default"].items()},
                      "max_output_tokens": 1000,
                      "service_tiers": {t: {k: usd(v) for k, v in GPT5[t].items()}
                                        for t in ("flex", "priority")}}}})
        yield from mesh_stack(redis_server, "split", policies=policies)


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


MOCK = {"x-mock-input-tokens": str(IN), "x-mock-cached-tokens": str(CACHED),
        "x-mock-output-tokens": str(OUT)}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5", "max_completion_tokens": CAP,
            "messages": [{"role": "user", "content": "What does a permit hold?"}], **extra}


def booked(r: redis.Redis, pid: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the decision's data, the settlement's data, its res)."""
    permit_state(r, pid)
    (decision,) = events(r, pid, "decision")
    (settlement,) = events(r, pid, "settlement")
    return decision["data"], settlement["data"], settlement["res"]


def held_at(decision: dict[str, Any], tier: str) -> bool:
    return bool(decision["est"] == cost(tier, decision["in_tok"], 0, decision["out_tok"]))


def test_a_priority_chat_call_is_held_and_settled_at_priority(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/chat/completions", chat(service_tier="priority"), headers=MOCK)
    assert reply.status == 200, reply.body
    assert reply.json()["service_tier"] == "priority"
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert decision["service_tier"] == "priority" and decision["held_tier"] == "priority"
    assert held_at(decision, "priority") and decision["out_tok"] == CAP
    assert res["act"] == cost("priority", IN, CACHED, OUT)
    assert data["priced_tier"] == "priority"


def test_an_auto_chat_stream_reported_default_is_held_high_and_settles_at_standard(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/chat/completions", chat(service_tier="auto", stream=True),
                      headers=MOCK)
    assert reply.status == 200
    assert b'"service_tier":"default"' in reply.body
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert decision["held_tier"] == "highest" and held_at(decision, "priority")
    assert res["act"] == cost("default", IN, CACHED, OUT)
    assert data["service_tier"] == "default"


def test_a_flex_responses_stream_settles_at_flex(mesh: MeshStack, rdb: redis.Redis) -> None:
    body = {"model": "gpt-5", "max_output_tokens": CAP, "input": "What does a permit hold?",
            "stream": True, "service_tier": "flex"}
    reply = mesh.call("/v1/responses", body, headers=MOCK)
    assert reply.status == 200
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert held_at(decision, "flex")
    assert res["act"] == cost("flex", IN, CACHED, OUT)
    assert data["priced_tier"] == "flex"


def test_an_answer_reporting_no_tier_name_books_the_highest_rate_flagged(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/chat/completions", chat(service_tier="flex"),
                      headers={**MOCK, "x-mock-service-tier-json": "[1, 2]"})
    assert reply.status == 200
    decision, data, res = booked(rdb, reply.headers["x-keel-permit-id"])
    assert held_at(decision, "flex")
    assert res["act"] == cost("priority", IN, CACHED, OUT)
    assert data["tier_unpriced"] is True


@pytest.mark.parametrize("value", [7, "x" * 5_000, {"tier": "flex"}])
def test_a_request_tier_that_is_no_tier_name_never_reaches_the_provider(
        mesh: MeshStack, value: object) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/chat/completions", chat(service_tier=value), headers=MOCK)
    assert reply.status == 400
    assert "service_tier" in reply.json()["error"]["message"]
    assert len(mesh.upstream_calls()) == before
