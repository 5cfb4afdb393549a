"""Provider coverage through a real Envoy: Azure OpenAI, OpenAI embeddings, Gemini API,
Vertex AI and Bedrock Runtime (issue 17).

Each test names what it provokes: an allowed call settled at the exact cost
from the provider's own usage (JSON, SSE, a JSON-array stream, AWS event-stream
frames split across chunks), an over-budget call refused before the upstream
sees it, a constrained call whose body reaches the upstream with the reduced
cap (or, for a SigV4-signed Bedrock body Envoy does not re-sign, refused), a
broken stream or a corrupt frame settled by the documented rule, and an
unknown endpoint on a provider host refused as NOT_METERED.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml

from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.request import Api, estimate_input_tokens
from keel_pdp.policy.loader import load_bundle
from keel_pdp.pricing import PICO_PER_MICRO, TokenUsage, usage_cost_micros
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

SNAPSHOT = load_bundle(MESH_POLICIES)
BEDROCK_MODEL = "anthropic.claude-sonnet-4-5-v1:0"
TEST_AKID = "AKIDKEELTEST0000"
GEMINI = "/v1beta/models/gemini-2.5-flash"
VERTEX = "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro"


@pytest.fixture(scope="module")
def mesh(redis_server: RedisServer) -> Iterator[MeshStack]:
    # The bundle's Deployments map (tests/fixtures/mesh_policies/deployments.yaml)
    # maps chat-prod and embed; the sidecar's fallback (KEEL_MESH_AZURE_DEPLOYMENTS)
    # says otherwise for chat-prod, which the bundle must win, and alone maps
    # legacy-chat.
    cfg = MeshConfig(unmetered_routes=(("*", "/healthz"),),
                     azure_deployments=(("chat-prod", "gpt-4o-mini"),
                                        ("legacy-chat", "gpt-4.1-mini")))
    yield from mesh_stack(redis_server, "split", cfg=cfg)


@pytest.fixture(scope="module")
def reload_mesh(redis_server: RedisServer,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshStack]:
    """A stack serving a copy of the mesh bundle that a test edits and reloads."""
    policies = tmp_path_factory.mktemp("policies")
    shutil.copytree(MESH_POLICIES, policies, dirs_exist_ok=True)
    yield from mesh_stack(redis_server, "split", policies=policies)


@pytest.fixture(scope="module")
def signed_mesh(redis_server: RedisServer) -> Iterator[MeshStack]:
    """Envoy re-signs (SigV4) after Keel's filters, and Keel is told so."""
    yield from mesh_stack(redis_server, "split", cfg=MeshConfig(resign_signed=True),
                          aws_sign_region="us-east-1",
                          envoy_env={"AWS_ACCESS_KEY_ID": TEST_AKID,
                                     "AWS_SECRET_ACCESS_KEY": "keel-test-secret"})


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


def cost(provider: str, model: str, usage: TokenUsage) -> int:
    mp = SNAPSHOT.price_for(provider, model)
    assert mp is not None, (provider, model)
    return usage_cost_micros(mp.price, usage)


def settled(r: redis.Redis, pid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    permit_state(r, pid)
    (ev,) = events(r, pid, "settlement")
    return ev["data"], ev["res"]


def as_usage(d: dict[str, int]) -> TokenUsage:
    return TokenUsage(d["in"], d["cached"], d["cw"], d["out"], d["rsn"])


def gemini_body(**gen: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": "What is a permit?"}]}],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "generationConfig": {"maxOutputTokens": 200, **gen}}


def converse_body(max_tokens: int = 200) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"text": "What is a hold?"}]}],
            "system": [{"text": "Be brief."}], "inferenceConfig": {"maxTokens": max_tokens}}


def invoke_body(max_tokens: int = 200) -> dict[str, Any]:
    return {"anthropic_version": "bedrock-2023-05-31", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "What is a hold?"}]}


# --------------------------------------------------------------- embeddings, Azure
def test_openai_embeddings_settle_input_only_and_are_never_rewritten(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = {"model": "text-embedding-3-small", "input": ["hello world", "a second text"]}
    reply = mesh.call("/v1/embeddings", body)
    assert reply.status == 200, reply.body
    call = mesh.upstream_calls()[-1]
    assert "x-keel-enforce-max-tokens" not in call["keel"]
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    inp = -(-len("hello world") // 4) + -(-len("a second text") // 4)
    assert estimate_input_tokens(Api.EMBEDDINGS, body) == inp
    assert data["usage"] == {"in": inp, "cached": 0, "cw": 0, "out": 0, "rsn": 0}
    assert res["act"] == cost("openai", "text-embedding-3-small", TokenUsage(inp, 0, 0, 0, 0))


def test_azure_deployment_names_the_model_and_settles_at_azure_prices(
        mesh: MeshStack, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from keel_pdp.mesh import authz

    seen: list[dict[str, str]] = []
    real = authz.request_headers

    def spy(check: Any) -> dict[str, str]:
        headers = real(check)
        seen.append(headers)
        return headers

    monkeypatch.setattr(authz, "request_headers", spy)
    body = {"messages": [{"role": "user", "content": "Summarise."}], "max_tokens": 100}
    reply = mesh.call("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
                      body, headers={"api-key": "azure-secret", "x-mock-cached-tokens": "3"})
    assert reply.status == 200, reply.body
    call = mesh.upstream_calls()[-1]
    assert call["keel"]["x-keel-model"] == "gpt-4.1-mini"
    assert call["keel"]["x-keel-provider"] == "azure"
    assert call["headers"]["api-key"] == "azure-secret"  # reaches the provider untouched
    assert seen and all("api-key" not in h for h in seen)  # never the sidecar
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    inp = estimate_input_tokens(Api.CHAT, body)
    assert data["usage"] == {"in": inp, "cached": 3, "cw": 0, "out": 24, "rsn": 0}
    assert res["act"] == cost("azure", "gpt-4.1-mini", TokenUsage(inp, 3, 0, 24, 0))
    assert window_figures(rdb, "tenant-daily") == (res["act"], 0)


def test_azure_embeddings_and_streamed_chat(mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/openai/deployments/embed/embeddings?api-version=2024-10-21",
                      {"input": [[1, 2, 3, 4, 5], [6, 7]]})
    assert reply.status == 200, reply.body
    data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"]["in"] == 7  # token arrays are counted, not measured
    reply = mesh.call("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
                      {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                       "stream_options": {"include_usage": True}},
                      headers={"x-mock-input-tokens": "50", "x-mock-split": "9"})
    assert reply.status == 200
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 50, "cached": 0, "cw": 0, "out": 24, "rsn": 0}
    assert res["act"] == cost("azure", "gpt-4.1-mini", TokenUsage(50, 0, 0, 24, 0))


AZURE_CHAT = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"


def bundle_deployments() -> dict[str, str]:
    """The fixture's Azure map, read from its YAML here (not through the loader)."""
    doc = yaml.safe_load((MESH_POLICIES / "deployments.yaml").read_text())
    assert doc["provider"] == "azure"
    return {d["name"]: d["model"] for d in doc["deployments"]}


def test_azure_body_without_a_model_is_priced_through_the_bundle_map(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    model = bundle_deployments()["chat-prod"]
    assert dict(mesh.cfg.azure_deployments)["chat-prod"] != model  # the fallback disagrees
    raw = json.dumps({"messages": [{"role": "user", "content": "Which model am I?"}],
                      "max_tokens": 60}).encode()
    reply = mesh.call(AZURE_CHAT.format("chat-prod"), raw,
                      headers={"x-mock-input-tokens": "40"})
    assert reply.status == 200, reply.body
    call = mesh.upstream_calls()[-1]
    assert call["keel"]["x-keel-model"] == model
    assert call["body_sha256"] == hashlib.sha256(raw).hexdigest()  # no model written in
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 40, "cached": 0, "cw": 0, "out": 24, "rsn": 0}
    assert res["act"] == cost("azure", model, TokenUsage(40, 0, 0, 24, 0))
    assert (ev := events(rdb, reply.headers["x-keel-permit-id"], "decision"))
    assert (ev[0]["data"]["model"], ev[0]["data"]["provider"]) == (model, "azure")


def test_azure_body_naming_another_model_is_still_priced_as_the_deployment(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    model = bundle_deployments()["chat-prod"]
    reply = mesh.call(AZURE_CHAT.format("chat-prod"),
                      {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 60})
    assert reply.status == 200, reply.body
    assert mesh.upstream_calls()[-1]["keel"]["x-keel-model"] == model
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert res["act"] == cost("azure", model, as_usage(data["usage"]))


def test_azure_deployment_only_the_sidecar_fallback_maps(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    assert "legacy-chat" not in bundle_deployments()
    reply = mesh.call(AZURE_CHAT.format("legacy-chat"),
                      {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60})
    assert reply.status == 200, reply.body
    assert mesh.upstream_calls()[-1]["keel"]["x-keel-model"] == "gpt-4.1-mini"
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert res["act"] == cost("azure", "gpt-4.1-mini", as_usage(data["usage"]))


def test_azure_deployment_nothing_maps_or_prices_is_refused_before_the_upstream(
        mesh: MeshStack) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call(AZURE_CHAT.format("team-x-experiment"),
                      {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60})
    assert reply.status == 403, reply.body
    err = reply.json()["error"]
    assert (err["code"], err["provider"], err["model"]) == (
        "UNKNOWN_MODEL_PRICE", "azure", "team-x-experiment")
    assert len(mesh.upstream_calls()) == before


def test_a_reloaded_bundle_remaps_a_deployment_and_a_bad_map_is_not_served(
        reload_mesh: MeshStack, rdb: redis.Redis) -> None:
    holder = reload_mesh.holder
    assert holder is not None and holder.directory is not None
    path = holder.directory / "deployments.yaml"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60}

    def model_of_a_call() -> str:
        reply = reload_mesh.call(AZURE_CHAT.format("chat-prod"), body)
        assert reply.status == 200, reply.body
        model = str(reload_mesh.upstream_calls()[-1]["keel"]["x-keel-model"])
        data, res = settled(rdb, reply.headers["x-keel-permit-id"])
        assert res["act"] == cost("azure", model, as_usage(data["usage"]))
        return model

    assert model_of_a_call() == bundle_deployments()["chat-prod"]
    doc = yaml.safe_load(path.read_text())
    doc["deployments"][0]["model"] = "gpt-4o-mini"
    path.write_text(yaml.safe_dump(doc))
    assert holder.reload()
    assert model_of_a_call() == "gpt-4o-mini"
    doc["deployments"][0]["model"] = "gpt-5-unpriced"
    path.write_text(yaml.safe_dump(doc))
    assert not holder.reload()
    assert "deployments.0.model: unknown model 'gpt-5-unpriced'" in str(holder.last_error)
    assert model_of_a_call() == "gpt-4o-mini"  # the last good map keeps serving


# ---------------------------------------------------------------- Gemini, Vertex
@pytest.mark.parametrize("suffix", [":generateContent?key=K",
                                    ":streamGenerateContent?alt=sse&key=K",
                                    ":streamGenerateContent?key=K"],
                         ids=["json", "sse", "json-array"])
def test_gemini_settles_from_usage_metadata_with_thoughts_and_cache(
        mesh: MeshStack, rdb: redis.Redis, suffix: str) -> None:
    reply = mesh.call(GEMINI + suffix, gemini_body(), headers={
        "x-mock-input-tokens": "900", "x-mock-cached-tokens": "600",
        "x-mock-reasoning-tokens": "10", "x-mock-split": "11"})
    assert reply.status == 200, reply.body
    call = mesh.upstream_calls()[-1]
    assert call["keel"]["x-keel-provider"] == "gemini"
    assert call["keel"]["x-keel-model"] == "gemini-2.5-flash"
    assert call["caps"] == {"generationConfig.maxOutputTokens": 200}
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 900, "cached": 600, "cw": 0, "out": 24, "rsn": 10}
    # The ledger's decision event names the provider, the model and the API.
    (dec,) = events(rdb, reply.headers["x-keel-permit-id"], "decision")
    assert (dec["data"]["provider"], dec["data"]["model"]) == ("gemini", "gemini-2.5-flash")
    assert dec["data"]["labels"]["api"] == "generate_content"
    assert res["act"] == cost("gemini", "gemini-2.5-flash", TokenUsage(900, 600, 0, 24, 10))
    assert data["outcome"] == "SUCCEEDED"


def test_vertex_stream_is_priced_at_the_long_context_tier(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = gemini_body()
    body["contents"][0]["parts"][0]["text"] = "word " * 200_000  # about 250k tokens
    inp = estimate_input_tokens(Api.GENERATE_CONTENT, body)
    assert inp > 200_000
    reply = mesh.call(VERTEX + ":streamGenerateContent?alt=sse", body,
                      headers={"x-mock-split": "5"})
    assert reply.status == 200, reply.body
    assert mesh.upstream_calls()[-1]["keel"]["x-keel-provider"] == "vertex"
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"]["in"] == inp
    # Above 200k input tokens the whole request is priced at the tier's rates.
    assert res["act"] == -(-(inp * 2_500_000 + 24 * 15_000_000) // PICO_PER_MICRO)
    assert res["act"] > cost("vertex", "gemini-2.5-pro", TokenUsage(inp, 0, 0, 24, 0))  # base


def test_gemini_constrained_call_reaches_upstream_with_the_reduced_cap(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    body = gemini_body(maxOutputTokens=1000)
    reply = mesh.call(GEMINI + ":generateContent", body, tenant="tight")
    assert reply.status == 200, reply.body
    assert reply.headers["x-keel-decision"] == "CONSTRAIN"
    k = int(mesh.upstream_calls()[-1]["keel"]["x-keel-max-tokens"])
    assert 16 <= k < 1000
    assert mesh.upstream_calls()[-1]["caps"] == {"generationConfig.maxOutputTokens": k}


@pytest.mark.parametrize(("path", "body"), [
    (GEMINI + ":generateContent", gemini_body()),
    (VERTEX + ":streamGenerateContent?alt=sse", gemini_body()),
    ("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
     {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi " * 1000}),
    (f"/model/{BEDROCK_MODEL}/converse-stream", converse_body()),
    (f"/model/{BEDROCK_MODEL}/invoke", invoke_body())],
    ids=["gemini", "vertex", "azure", "embeddings", "converse", "invoke"])
def test_over_budget_is_refused_before_the_upstream(
        mesh: MeshStack, rdb: redis.Redis, path: str, body: dict[str, Any]) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call(path, body, tenant="broke")
    assert reply.status == 429, reply.body
    err = reply.json()["error"]
    assert err["code"] == "BUDGET_EXHAUSTED"
    # The refusal names where the call was going.
    assert err["provider"] == reply.headers["x-keel-provider"]
    assert err["provider"] in ("gemini", "vertex", "azure", "openai", "bedrock")
    assert err["model"] and err["api"]
    assert len(mesh.upstream_calls()) == before
    assert window_figures(rdb, "broke-daily") == (0, 0)


def test_azure_constrained_call_reaches_upstream_with_the_reduced_cap(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
                      tenant="tight")
    assert reply.status == 200, reply.body
    assert reply.headers["x-keel-decision"] == "CONSTRAIN"
    call = mesh.upstream_calls()[-1]
    k = int(call["keel"]["x-keel-max-tokens"])
    assert 16 <= k < 5000
    assert call["caps"] == {"max_tokens": k}


def test_gemini_stream_broken_half_way_keeps_the_reported_prompt(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call(GEMINI + ":streamGenerateContent?alt=sse", gemini_body(),
                      headers={"x-mock-mode": "break", "x-mock-input-tokens": "777"})
    data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["outcome"] == "PARTIAL"
    assert data["usage"]["in"] == 777  # from the usageMetadata seen so far
    assert 0 < data["usage"]["out"] < 24


# ----------------------------------------------------------------------- Bedrock
@pytest.mark.parametrize(("op", "body"), [
    ("converse", converse_body()), ("converse-stream", converse_body()),
    ("invoke", invoke_body()), ("invoke-with-response-stream", invoke_body())])
def test_bedrock_settles_from_its_usage_frames_split_across_chunks(
        mesh: MeshStack, rdb: redis.Redis, op: str, body: dict[str, Any]) -> None:
    reply = mesh.call(f"/model/{BEDROCK_MODEL}/{op}", body, headers={
        "authorization": "AWS4-HMAC-SHA256 Credential=x", "x-mock-input-tokens": "1000",
        "x-mock-cached-tokens": "300", "x-mock-cache-write-tokens": "100",
        "x-mock-split": "13"})
    assert reply.status == 200, reply.body
    call = mesh.upstream_calls()[-1]
    assert call["keel"]["x-keel-provider"] == "bedrock"
    assert call["keel"]["x-keel-model"] == BEDROCK_MODEL
    assert call["headers"]["authorization"].startswith("AWS4-HMAC-SHA256")
    data, res = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["usage"] == {"in": 1000, "cached": 300, "cw": 100, "out": 24, "rsn": 0}
    assert res["act"] == cost("bedrock", BEDROCK_MODEL, TokenUsage(1000, 300, 100, 24, 0))
    assert data["outcome"] == "SUCCEEDED"


@pytest.mark.parametrize("op", ["converse-stream", "invoke-with-response-stream"])
def test_bedrock_stream_broken_half_way_settles_partial(
        mesh: MeshStack, rdb: redis.Redis, op: str) -> None:
    body = converse_body() if op.startswith("converse") else invoke_body()
    reply = mesh.call(f"/model/{BEDROCK_MODEL}/{op}", body, headers={
        "x-mock-mode": "break", "x-mock-input-tokens": "555", "x-mock-split": "17"})
    data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["outcome"] == "PARTIAL"
    assert 0 < data["usage"]["out"] < 24
    if op.startswith("invoke"):
        assert data["usage"]["in"] == 555  # message_start arrived before the break
    else:
        # ConverseStream reports usage only at the end: Keel's estimate.
        assert data["usage"]["in"] == estimate_input_tokens(Api.CONVERSE, body)


@pytest.mark.parametrize(("path", "body"), [
    (f"/model/{BEDROCK_MODEL}/converse-stream", converse_body()),
    (f"/model/{BEDROCK_MODEL}/invoke-with-response-stream", invoke_body()),
    (GEMINI + ":streamGenerateContent?alt=sse", gemini_body()),
    (VERTEX + ":streamGenerateContent", gemini_body()),
    ("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
     {"messages": [{"role": "user", "content": "hi"}], "stream": True})],
    ids=["converse", "invoke", "gemini-sse", "vertex-array", "azure"])
def test_in_stream_provider_error_settles_failed_with_what_was_seen(
        mesh: MeshStack, rdb: redis.Redis, path: str, body: dict[str, Any]) -> None:
    reply = mesh.call(path, body, headers={"x-mock-mode": "stream-error", "x-mock-split": "19"})
    assert reply.status == 200
    data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
    assert data["outcome"] == "FAILED"
    assert 0 < data["usage"]["out"] < 24  # the half of the answer that arrived


def test_bedrock_frame_with_a_bad_crc_is_not_trusted(mesh: MeshStack, rdb: redis.Redis) -> None:
    reply = mesh.call(f"/model/{BEDROCK_MODEL}/converse-stream", converse_body(),
                      headers={"x-mock-bad-crc": "1", "x-mock-input-tokens": "1000"})
    assert reply.status == 200
    data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
    # Nothing after the corrupt frame is read: no usage, estimated, flagged FAILED.
    assert data["outcome"] == "FAILED"
    assert data["usage"]["in"] == estimate_input_tokens(Api.CONVERSE, converse_body())


def test_bedrock_constrain_without_resigning_is_refused_and_the_hold_released(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call(f"/model/{BEDROCK_MODEL}/converse", converse_body(1000), tenant="tight")
    assert reply.status == 403, reply.body
    err = reply.json()["error"]
    assert err["code"] == "SIGNED_BODY_NOT_REWRITABLE"
    assert "KEEL_MESH_RESIGN_SIGNED" in err["message"]
    assert len(mesh.upstream_calls()) == before
    assert permit_state(rdb, reply.headers["x-keel-permit-id"])["state"] == "voided"
    assert window_figures(rdb, "tight-hourly") == (0, 0)


def test_bedrock_constrained_call_is_re_signed_by_envoy_with_the_reduced_cap(
        signed_mesh: MeshStack, rdb: redis.Redis) -> None:
    for op, body in (("converse", converse_body(1000)), ("invoke", invoke_body(1000))):
        reply = signed_mesh.call(f"/model/{BEDROCK_MODEL}/{op}", body, tenant="tight",
                                 headers={"authorization": "AWS4-HMAC-SHA256 Credential=app"})
        assert reply.status == 200, reply.body
        assert reply.headers["x-keel-decision"] == "CONSTRAIN"
        call = signed_mesh.upstream_calls()[-1]
        k = int(call["keel"]["x-keel-max-tokens"])
        assert 16 <= k < 1000
        field = "inferenceConfig.maxTokens" if op == "converse" else "max_tokens"
        assert call["caps"] == {field: k}
        # Signed by Envoy after the rewrite, with the pod's credentials, over the new body.
        auth = call["headers"]["authorization"]
        assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={TEST_AKID}/")
        assert "/us-east-1/bedrock/aws4_request" in auth
        assert call["body_sha256"] == call["headers"]["x-amz-content-sha256"]
        data, _ = settled(rdb, reply.headers["x-keel-permit-id"])
        assert data["usage"]["out"] == min(24, k)


# -------------------------------------------------------------------- not metered
@pytest.mark.parametrize(("host", "path"), [
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:countTokens"),
    ("us-central1-aiplatform.googleapis.com", VERTEX + ":predict"),
    ("bedrock-runtime.us-east-1.amazonaws.com", "/model/m/async-invoke"),
    ("bedrock-runtime.us-east-1.amazonaws.com", "/model/meta.llama3-70b-instruct-v1%3A0/invoke"),
    ("my.openai.azure.com", "/openai/deployments/d/audio/speech"),
    ("api.openai.com", "/v1/images/generations")])
def test_unknown_endpoint_on_a_provider_host_is_refused(
        mesh: MeshStack, rdb: redis.Redis, host: str, path: str) -> None:
    before = len(mesh.upstream_calls())
    reply = mesh.call(path, {"x": 1}, headers={"host": host})
    assert reply.status == 403, reply.body
    assert reply.json()["error"]["code"] == "NOT_METERED"
    assert len(mesh.upstream_calls()) == before
