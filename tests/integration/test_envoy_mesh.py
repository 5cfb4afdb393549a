"""Keel as Envoy's ext_authz and ext_proc, proven with a real Envoy and a real Redis.

Each test names what it provokes: an allowed call settled at the provider's
cost, an over-budget call refused before the provider sees it, a constrained
call whose body reaches the provider with the reduced cap, a stream broken
half-way, an upstream error, a client that gives up, an unreadable body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from keel_pdp.mesh.request import Api, estimate_input_tokens
from keel_pdp.policy.loader import load_bundle
from keel_pdp.pricing import PICO_PER_MICRO, Price, TokenUsage, ceil_div, usage_cost_micros
from tests.conftest import RedisServer
from tests.integration.envoy_fixture import (
    MESH_POLICIES,
    MeshStack,
    events,
    mesh_stack,
    permit_state,
    redis_client,
    window_figures,
)
from tools.mockprovider import Options, plan_for, stream_events

SNAPSHOT = load_bundle(MESH_POLICIES)


@pytest.fixture(scope="module", params=["split", "split-ungated", "single"])
def mesh(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[MeshStack]:
    """Envoy in each shape Keel documents: cap + observability-mode closeout filters
    (cap gated by route, or on every call as under Istio), or one synchronous filter."""
    yield from mesh_stack(redis_server, request.param)


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The test run's Redis server, flushed for this test (by ``redis_url``)."""
    yield from redis_client(redis_server)


def price(provider: str, model: str) -> Price:
    mp = SNAPSHOT.price_for(provider, model)
    assert mp is not None
    return mp.price


def cost(provider: str, model: str, usage: TokenUsage) -> int:
    return usage_cost_micros(price(provider, model), usage)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1-mini",
            "messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Summarise the ledger rules."}],
            "max_tokens": 200, **extra}


def claude(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 200, "system": "Be brief.",
            "messages": [{"role": "user", "content": "What is a permit?"}], **extra}


def settled_usage(r: redis.Redis, pid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    permit_state(r, pid)
    (ev,) = events(r, pid, "settlement")
    return ev["data"], ev["res"]


def test_allowed_chat_call_reaches_upstream_and_settles_at_provider_cost(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/chat/completions", chat(), headers={
        "x-mock-input-tokens": "1200", "x-mock-cached-tokens": "400"})
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["prompt_tokens"] == 1200
    pid = reply.headers["x-keel-permit-id"]
    assert reply.headers["x-keel-decision"] == "ALLOW"
    calls = mesh.upstream_calls()[before:]
    assert len(calls) == 1
    assert calls[0]["keel"]["x-keel-permit-id"] == pid
    assert calls[0]["caps"] == {"max_tokens": 200}  # ALLOW within the request's cap: untouched

    data, res = settled_usage(rdb, pid)
    expected = cost("openai", "gpt-4.1-mini", TokenUsage(1200, 400, 0, 24, 0))
    assert data["usage"] == {"in": 1200, "cached": 400, "cw": 0, "out": 24, "rsn": 0}
    assert data["outcome"] == "SUCCEEDED"
    assert res["st"] == "SETTLED"
    assert res["act"] == expected
    assert window_figures(rdb, "tenant-daily") == (expected, 0)


def test_streamed_chat_settles_from_the_final_usage_chunk(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/chat/completions",
                      chat(stream=True, stream_options={"include_usage": True}),
                      headers={"x-mock-input-tokens": "900", "x-mock-cached-tokens": "100",
                               "x-mock-reasoning-tokens": "8", "x-mock-output-tokens": "40"})
    assert reply.status == 200
    assert reply.body.rstrip().endswith(b"data: [DONE]")
    data, res = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 900, "cached": 100, "cw": 0, "out": 40, "rsn": 8}
    assert res["act"] == cost("openai", "gpt-4.1-mini", TokenUsage(900, 100, 0, 40, 8))


def test_chat_stream_without_include_usage_is_asked_for_it_and_the_chunk_stripped(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    """A stream that did not ask for usage settles exactly (Keel asks the provider), and
    the client gets the stream it asked for: no extra usage chunk."""
    reply = mesh.call("/v1/chat/completions", chat(stream=True),
                      headers={"x-mock-input-tokens": "700", "x-mock-split": "23"})
    assert reply.status == 200
    call = mesh.upstream_calls()[-1]
    assert call["include_usage"] is True  # the body Keel released asked for it
    assert b'"usage":{' not in reply.body
    assert reply.body.rstrip().endswith(b"data: [DONE]")
    assert reply.body.count(b"tok ") == 24  # every content chunk arrived, in one piece
    data, res = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 700, "cached": 0, "cw": 0, "out": 24, "rsn": 0}
    assert res["act"] == cost("openai", "gpt-4.1-mini", TokenUsage(700, 0, 0, 24, 0))


def test_official_openai_sdk_reads_a_stream_keel_asked_usage_for(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{mesh.port}/v1", api_key="sk-test",
                           default_headers={"x-keel-tenant": "acme", "x-keel-workload": "chat"},
                           max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4.1-mini", stream=True, max_tokens=50,
        messages=[{"role": "user", "content": "Say tok."}])
    # The usual client loop indexes choices[0] on every chunk: a usage chunk
    # (choices == []) it did not ask for would raise IndexError here.
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "tok " * 24


def test_streamed_anthropic_counts_cache_reads_and_writes_as_input(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/messages", claude(stream=True), headers={
        "x-mock-input-tokens": "1000", "x-mock-cached-tokens": "300",
        "x-mock-cache-write-tokens": "100"})
    assert reply.status == 200
    assert b"event: message_stop" in reply.body
    data, res = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    # Anthropic reported input_tokens=600 (uncached only) + 300 read + 100 written.
    assert data["usage"] == {"in": 1000, "cached": 300, "cw": 100, "out": 24, "rsn": 0}
    expected = cost("anthropic", "claude-sonnet-4-5", TokenUsage(1000, 300, 100, 24, 0))
    assert expected == 600 * 3 + 90 + 375 + 24 * 15
    assert res["act"] == expected
    assert window_figures(rdb, "tenant-daily") == (expected, 0)


def test_responses_api_call_settles(mesh: MeshStack, rdb: redis.Redis) -> None:
    body = {"model": "gpt-4.1", "input": "Explain holds.", "max_output_tokens": 64}
    reply = mesh.call("/v1/responses", body, headers={"x-mock-cached-tokens": "2"})
    assert reply.status == 200
    inp = estimate_input_tokens(Api.RESPONSES, body)
    data, res = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": inp, "cached": 2, "cw": 0, "out": 24, "rsn": 0}
    assert res["act"] == cost("openai", "gpt-4.1", TokenUsage(inp, 2, 0, 24, 0))


def test_over_budget_call_is_refused_with_429_before_the_upstream_sees_it(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/chat/completions", chat(), tenant="broke")
    assert reply.status == 429
    assert len(mesh.upstream_calls()) == before
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.headers["x-keel-decision"] == "DENY"
    err = reply.json()["error"]
    assert err["code"] == "BUDGET_EXHAUSTED"
    (reason,) = err["block_reasons"]
    assert reason["budget_id"] == "broke-daily"
    assert reason["limit_micros"] == 1
    assert reason["exception_path"] == "finance-overage"
    assert window_figures(rdb, "broke-daily") == (0, 0)


def test_model_outside_the_routing_rule_is_refused_with_403(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/messages", claude(), workload="restricted")
    assert reply.status == 403
    assert reply.json()["error"]["code"] == "MODEL_NOT_ALLOWED"
    assert "retry-after" not in reply.headers
    assert len(mesh.upstream_calls()) == before


def test_constrained_call_reaches_upstream_with_the_reduced_max_tokens(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = claude(max_tokens=1000)
    reply = mesh.call("/v1/messages", body, tenant="tight")
    assert reply.status == 200, reply.body
    assert reply.headers["x-keel-decision"] == "CONSTRAIN"
    p = price("anthropic", "claude-sonnet-4-5")
    inp = estimate_input_tokens(Api.MESSAGES, body)
    # tight-hourly holds $0.002: the largest cap whose estimate fits.
    k = (2000 * PICO_PER_MICRO - inp * p.input) // p.output
    assert 16 <= k < 1000
    call = mesh.upstream_calls()[-1]
    assert call["caps"] == {"max_tokens": k}
    assert call["keel"]["x-keel-max-tokens"] == str(k)
    data, res = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"]["out"] == min(24, k)
    assert res["est"] == ceil_div(inp * p.input + k * p.output, PICO_PER_MICRO)


def test_uncapped_request_gets_the_held_cap_written_into_its_body(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = chat()
    del body["max_tokens"]
    reply = mesh.call("/v1/chat/completions", body)
    assert reply.status == 200
    # The hold assumed the price table's max_output_tokens (1024); the provider is told so.
    assert mesh.upstream_calls()[-1]["caps"] == {"max_completion_tokens": 1024}


def test_stream_broken_half_way_is_settled_with_usage_seen_and_estimated_output(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    reply = mesh.call("/v1/chat/completions", body, headers={"x-mock-mode": "break"})
    assert reply.broken or not reply.body.rstrip().endswith(b"[DONE]")
    pid = reply.headers["x-keel-permit-id"]
    rec = permit_state(rdb, pid)
    assert rec["state"] == "settled"
    data, _ = settled_usage(rdb, pid)
    # The mock sent the first half of its events; each output token is 4 bytes of text.
    plan = plan_for(Api.CHAT, body, {}, Options())
    sent = stream_events(plan, Options().tokens_per_chunk)[: len(stream_events(plan, 4)) // 2]
    streamed_tokens = sum(e.count(b"tok ") for e in sent)
    assert streamed_tokens > 0
    assert data["outcome"] == "PARTIAL"
    assert data["usage"]["out"] == streamed_tokens
    assert data["usage"]["in"] == estimate_input_tokens(Api.CHAT, body)  # Keel's estimate


def test_anthropic_stream_broken_half_way_keeps_the_reported_input(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/messages", claude(stream=True),
                      headers={"x-mock-mode": "break", "x-mock-input-tokens": "777",
                               "x-mock-cached-tokens": "7"})
    data, _ = settled_usage(rdb, reply.headers["x-keel-permit-id"])
    assert data["outcome"] == "PARTIAL"
    assert data["usage"]["in"] == 777  # from message_start, not Keel's estimate
    assert data["usage"]["cached"] == 7
    assert 0 < data["usage"]["out"] < 24


def test_upstream_500_voids_the_permit(mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/v1/messages", claude(), headers={"x-mock-mode": "error500"})
    assert reply.status == 500
    pid = reply.headers["x-keel-permit-id"]
    assert permit_state(rdb, pid)["state"] == "voided"
    assert len(events(rdb, pid, "void")) == 1
    assert window_figures(rdb, "tenant-daily") == (0, 0)


def test_client_giving_up_before_any_response_books_the_hold(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    with pytest.raises(TimeoutError):
        mesh.call("/v1/messages", claude(), headers={"x-mock-mode": "hang"}, timeout=0.5)
    pid = mesh.upstream_calls()[-1]["keel"]["x-keel-permit-id"]
    rec = permit_state(rdb, pid)
    assert rec["state"] == "settled"
    assert int(rec["act"]) == int(rec["amount"])  # booked at the hold
    data, _ = settled_usage(rdb, pid)
    assert data["outcome"] == "CANCELLED"
    assert window_figures(rdb, "tenant-daily") == (int(rec["act"]), 0)


def test_unreadable_body_is_refused_with_400_and_a_reason(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/chat/completions", b'{"messages": [}')
    assert reply.status == 400
    assert "not valid JSON" in reply.json()["error"]["message"]
    reply = mesh.call("/v1/chat/completions", {"messages": []})
    assert reply.status == 400
    assert "model is required" in reply.json()["error"]["message"]
    reply = mesh.call("/v1/chat/completions", chat(), tenant="")
    assert reply.status == 400
    assert "x-keel-tenant" in reply.json()["error"]["message"]
    assert len(mesh.upstream_calls()) == before


def test_listed_unmetered_call_passes_and_a_forged_permit_header_is_dropped(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    forged = "pmt_0000000000000000000000000000"
    reply = mesh.call("/v1/files", {"purpose": "batch"}, headers={"x-keel-permit-id": forged})
    assert reply.status == 404  # the mock does not serve it; Keel let it through (listed)
    call = mesh.upstream_calls()[-1]
    assert call["path"] == "/v1/files"
    assert "x-keel-permit-id" not in call["keel"]


def test_unlisted_call_keel_cannot_meter_is_refused(mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call("/v1/batches", {"input_file_id": "f"})
    assert reply.status == 403
    assert reply.json()["error"]["code"] == "NOT_METERED"
    assert len(mesh.upstream_calls()) == before
