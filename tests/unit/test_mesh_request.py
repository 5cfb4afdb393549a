"""Reading an OpenAI- or Anthropic-style HTTP request the way Authorize needs it."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from keel_pdp.mesh.request import (
    FILE_TOKENS,
    IMAGE_TOKENS,
    Api,
    BadRequest,
    decode_body,
    estimate_input_tokens,
    match_path,
    parse_body,
    parse_partial,
    provider_for,
    request_id,
    rewrite_cap,
)

HOSTS = (("anthropic", "anthropic"), ("openai", "openai"))


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/v1/chat/completions", (Api.CHAT, "openai")),
    ("post", "/v1/chat/completions?x=1", (Api.CHAT, "openai")),
    ("POST", "/openai/deployments/d1/chat/completions?api-version=2024", (Api.CHAT, "azure")),
    ("POST", "/openai/deployments/d1/embeddings?api-version=2024", (Api.EMBEDDINGS, "azure")),
    ("POST", "/openai/deployments/d1/responses", (Api.RESPONSES, "azure")),
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent",
     (Api.GENERATE_CONTENT, "gemini")),
    ("POST", "/v1beta/models/gemini-2.5-pro%3AstreamGenerateContent?alt=sse",
     (Api.GENERATE_CONTENT, "gemini")),
    ("POST", "/v1/projects/p1/locations/us-central1/publishers/google/models/"
             "gemini-2.5-pro:generateContent", (Api.GENERATE_CONTENT, "vertex")),
    ("POST", "/model/anthropic.claude-sonnet-4-5-v1%3A0/converse", (Api.CONVERSE, "bedrock")),
    ("POST", "/model/m1/converse-stream", (Api.CONVERSE, "bedrock")),
    ("POST", "/model/anthropic.m1/invoke", (Api.INVOKE_MESSAGES, "bedrock")),
    ("POST", "/model/us.anthropic.m1/invoke-with-response-stream",
     (Api.INVOKE_MESSAGES, "bedrock")),
    ("POST", "/model/meta.llama3-70b-instruct-v1%3A0/invoke", None),
    ("POST", "/model/meta.llama3-70b-instruct-v1%3A0/converse", (Api.CONVERSE, "bedrock")),
    ("POST", "/v1beta/models/gemini-2.5-pro:countTokens", None),
    ("POST", "/v1beta/models/gemini-2.5-pro:embedContent", None),
    ("POST", "/model/m1/async-invoke", None),
    ("POST", "/v1/responses", (Api.RESPONSES, "openai")),
    ("POST", "/v1/messages/", (Api.MESSAGES, "anthropic")),
    ("POST", "/gateway/anthropic/v1/messages", (Api.MESSAGES, "anthropic")),
    ("GET", "/v1/chat/completions", None),
    ("POST", "/v1/embeddings", (Api.EMBEDDINGS, "openai")),
    ("POST", "/v1/completions", None),
    ("POST", "/v1/threads/t1/messages", None),
    ("POST", "/v1/responses/resp_1/cancel", None),
])
def test_metered_paths(method: str, path: str, expected: tuple[Api, str] | None) -> None:
    assert match_path(method, path) == expected


def test_provider_comes_from_header_then_host_then_path() -> None:
    assert provider_for("openai", "api.anthropic.com", "azure-openai", HOSTS) == "azure-openai"
    assert provider_for("openai", "api.anthropic.com:443", "", HOSTS) == "anthropic"
    assert provider_for("anthropic", "llm-gateway.internal", "", HOSTS) == "anthropic"


def test_estimate_is_bytes_over_four_plus_message_overhead() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    # ceil(11 / 4) + 4 per message + 3 priming
    assert estimate_input_tokens(Api.CHAT, body) == 3 + 4 + 3


def test_estimate_counts_utf8_bytes_parts_tools_and_system() -> None:
    text = "héllo"  # 6 bytes
    chat = {"messages": [
        {"role": "system", "content": "abcd"},
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image_url", "image_url": {"url": "https://x"}}]},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]}
    tools_bytes = len(json.dumps(chat["tools"], separators=(",", ":")))
    text_bytes = 4 + 6 + 1 + 2 + tools_bytes
    expected = -(-text_bytes // 4) + 4 * 3 + 3 + IMAGE_TOKENS
    assert estimate_input_tokens(Api.CHAT, chat) == expected

    anthropic = {"system": "abcdefgh", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "abcd"},
        {"type": "document", "source": {"type": "base64", "data": "QUJD" * 1000}}]}]}
    assert estimate_input_tokens(Api.MESSAGES, anthropic) == 3 + 4 * 2 + 3 + FILE_TOKENS

    responses = {"instructions": "abcd", "input": "abcdefgh"}
    assert estimate_input_tokens(Api.RESPONSES, responses) == 3 + 4 + 3


def test_base64_data_url_is_a_flat_figure_not_text() -> None:
    url = "data:image/png;base64," + "A" * 400_000
    body = {"messages": [{"role": "user", "content": url}]}
    assert estimate_input_tokens(Api.CHAT, body) == 4 + 3 + FILE_TOKENS


def test_estimate_is_deterministic() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 1001}]}
    assert {estimate_input_tokens(Api.CHAT, body) for _ in range(5)} == {251 + 4 + 3}


def test_parse_reads_model_cap_stream_and_estimate() -> None:
    r = parse_body(Api.CHAT, "openai", raw({
        "model": "gpt-4.1", "max_tokens": 50, "max_completion_tokens": 40, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}))
    assert (r.model, r.max_output_tokens, r.cap_field, r.stream) == (
        "gpt-4.1", 40, "max_completion_tokens", True)
    assert r.estimated_input_tokens == 1 + 4 + 3
    r = parse_body(Api.RESPONSES, "openai", raw({"model": "o3", "input": "x",
                                                 "max_output_tokens": 9}))
    assert (r.max_output_tokens, r.cap_field, r.stream) == (9, "max_output_tokens", False)
    r = parse_body(Api.MESSAGES, "anthropic", raw({"model": "claude", "messages": []}))
    assert (r.max_output_tokens, r.cap_field) == (0, "")


@pytest.mark.parametrize(("body", "message"), [
    (b"", "request body is empty"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (raw({"messages": []}), "model is required"),
    (raw({"model": ""}), "model is required"),
    (raw({"model": "m", "max_tokens": -1}), "max_tokens must be a positive integer"),
    (raw({"model": "m", "max_tokens": True}), "max_tokens must be a positive integer"),
    (raw({"model": "m", "max_tokens": "100"}), "max_tokens must be a positive integer"),
    (raw({"model": "m", "max_tokens": 10**9}), "at most"),
    (raw({"model": "m", "stream": "yes"}), "stream must be true or false"),
])
def test_unreadable_bodies_are_rejected_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        parse_body(Api.CHAT, "openai", body)
    assert info.value.status == 400


def test_compressed_body_is_decoded_and_unknown_encoding_refused() -> None:
    data = raw({"model": "m"})
    assert decode_body(gzip.compress(data), "gzip") == data
    assert decode_body(data, "identity") == data
    with pytest.raises(BadRequest) as info:
        decode_body(data, "br")
    assert info.value.status == 415
    with pytest.raises(BadRequest, match="not valid gzip"):
        decode_body(b"nope", "gzip")


def test_truncated_body_is_read_by_pattern_with_a_length_based_estimate() -> None:
    prefix = b'{"model": "claude-sonnet-4-5", "max_tokens": 300, "stream": true, "messages": [{"ro'
    r = parse_partial(Api.MESSAGES, "anthropic", prefix, content_length=4_000_000)
    assert (r.model, r.max_output_tokens, r.stream, r.partial) == (
        "claude-sonnet-4-5", 300, True, True)
    assert r.estimated_input_tokens == 1_000_000 + 3
    with pytest.raises(BadRequest) as info:
        parse_partial(Api.MESSAGES, "anthropic", b'{"messages": [', 10)
    assert info.value.status == 413


def test_request_id_prefers_header_then_envoy_id_then_a_stable_hash() -> None:
    assert request_id("rid-1", "envoy-1", [b"x"]) == "rid-1"
    assert request_id("", "envoy-1", [b"x"]) == "envoy-1"
    h = request_id("", "", [b"a", b"bc"])
    assert h.startswith("h-") and h == request_id("", "", [b"a", b"bc"])
    assert h != request_id("", "", [b"ab", b"c"])  # length-prefixed parts
    assert request_id("x" * 200, "", [b"a"]).startswith("h-")


def test_rewrite_lowers_every_named_cap_and_keeps_the_rest() -> None:
    body = {"model": "m", "max_tokens": 500, "messages": [], "max_completion_tokens": 400}
    out = rewrite_cap(Api.CHAT, raw(body), 100)
    assert out is not None
    new = json.loads(out)
    assert list(new) == list(body)
    assert (new["max_tokens"], new["max_completion_tokens"]) == (100, 100)
    assert rewrite_cap(Api.CHAT, raw({"model": "m", "max_tokens": 50}), 100) is None


@pytest.mark.parametrize(("api", "field"), [
    (Api.CHAT, "max_completion_tokens"), (Api.RESPONSES, "max_output_tokens"),
    (Api.MESSAGES, "max_tokens")])
def test_rewrite_adds_the_api_cap_field_when_missing(api: Api, field: str) -> None:
    out = rewrite_cap(api, raw({"model": "m", "text": "é"}), 77)
    assert out is not None
    assert json.loads(out)[field] == 77
    assert "é".encode() in out  # not re-escaped


def test_rewrite_leaves_unparseable_bodies_alone() -> None:
    assert rewrite_cap(Api.CHAT, b"{", 10) is None
    assert rewrite_cap(Api.CHAT, b"[]", 10) is None


def test_rewrite_for_a_reroute_replaces_the_model_and_keeps_the_rest() -> None:
    from keel_pdp.mesh.request import Api, rewrite_cap

    raw = b'{"model":"gpt-4.1","messages":[],"max_tokens":100}'
    new = rewrite_cap(Api.CHAT, raw, 500, "gpt-4.1-mini")
    assert new is not None
    assert json.loads(new) == {"model": "gpt-4.1-mini", "messages": [], "max_tokens": 100}
    assert rewrite_cap(Api.CHAT, raw, 500, "gpt-4.1") is None  # nothing to change


def test_usage_chunk_is_stripped_whatever_the_chunk_boundaries() -> None:
    from keel_pdp.mesh.request import UsageChunkStripper
    from tools.mockprovider import Plan, stream_events

    with_usage = b"".join(stream_events(Plan(Api.CHAT, "m", True, True, 10, 0, 0, 24, 0), 4))
    without = b"".join(stream_events(Plan(Api.CHAT, "m", True, False, 10, 0, 0, 24, 0), 4))
    for step in (1, 7, 64, len(with_usage)):
        for data in (with_usage, with_usage.replace(b"\n", b"\r\n")):
            s = UsageChunkStripper()
            pieces = [data[i:i + step] for i in range(0, len(data), step)]
            out = b"".join(s.feed(p, end=i == len(pieces) - 1) for i, p in enumerate(pieces))
            expected = without if b"\r\n" not in data else without.replace(b"\n", b"\r\n")
            assert out == expected, step
            assert s.stripped == 1
    # A chunk with choices and a usage field (include_usage on every chunk) stays.
    keep = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
    assert UsageChunkStripper().feed(keep, end=True) == keep


def test_rewrite_asks_a_chat_stream_for_usage_once() -> None:
    body = {"model": "m", "stream": True, "messages": [], "max_tokens": 10}
    out = rewrite_cap(Api.CHAT, raw(body), 10, request_usage=True)
    assert out is not None
    assert json.loads(out)["stream_options"] == {"include_usage": True}
    assert rewrite_cap(Api.CHAT, out, 10, request_usage=True) is None  # nothing left to do
    assert rewrite_cap(Api.CHAT, raw({**body, "stream": False}), 10, request_usage=True) is None


def test_nested_caps_of_gemini_and_converse_are_read_and_lowered() -> None:
    g = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 900,
                                                                        "temperature": 0}}
    llm = parse_body(Api.GENERATE_CONTENT, "gemini", raw(g), "gemini-2.5-pro", True)
    assert (llm.model, llm.max_output_tokens, llm.stream) == ("gemini-2.5-pro", 900, True)
    out = rewrite_cap(Api.GENERATE_CONTENT, raw(g), 100)
    assert out is not None
    assert json.loads(out)["generationConfig"] == {"maxOutputTokens": 100, "temperature": 0}
    added = rewrite_cap(Api.CONVERSE, raw({"messages": []}), 64)
    assert added is not None and json.loads(added) == {"messages": [],
                                                       "inferenceConfig": {"maxTokens": 64}}
    assert rewrite_cap(Api.EMBEDDINGS, raw({"model": "e", "input": "x"}), 5) is None
    with pytest.raises(BadRequest):
        parse_body(Api.CONVERSE, "bedrock", raw({"inferenceConfig": {"maxTokens": -1}}), "m")


def test_estimates_for_embeddings_gemini_and_converse() -> None:
    assert estimate_input_tokens(Api.EMBEDDINGS, {"input": "abcdefgh"}) == 2
    assert estimate_input_tokens(Api.EMBEDDINGS, {"input": ["abc", "abcde"]}) == 1 + 2
    assert estimate_input_tokens(Api.EMBEDDINGS, {"input": [[1, 2, 3], [4]]}) == 4
    gem = {"contents": [{"role": "user", "parts": [
        {"text": "abcd"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "AAAA"}}]}],
        "systemInstruction": {"parts": [{"text": "abcdefgh"}]}}
    assert estimate_input_tokens(Api.GENERATE_CONTENT, gem) == (
        3 + 4 * 2 + 3 + IMAGE_TOKENS + 1000)
    conv = {"messages": [{"role": "user", "content": [
        {"text": "abcd"}, {"image": {"format": "png", "source": {"bytes": "AAAA"}}}]}],
        "system": [{"text": "abcd"}]}
    assert estimate_input_tokens(Api.CONVERSE, conv) == 2 + 4 * 2 + 3 + IMAGE_TOKENS


def test_cli_mesh_route_names_api_provider_model_and_price(
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from keel_pdp.mesh import commands
    from tests.conftest import ROOT

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    policies = str(ROOT / "tests" / "fixtures" / "mesh_policies")
    ns = parser.parse_args(["mesh", "route", "--policies", policies, "/v1/projects/p/locations/"
                            "l/publishers/google/models/gemini-2.5-pro:streamGenerateContent"])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "api:      generate_content" in out and "provider: vertex" in out
    assert "model:    gemini-2.5-pro" in out and "generationConfig.maxOutputTokens" in out
    assert "input 1.25, cached_input 0.125" in out and "1 long-context tier" in out
    ns = parser.parse_args(["mesh", "route", "--host", "api.openai.com", "/v1/batches"])
    assert ns.func(ns) == 1
    assert "403 NOT_METERED (a provider host)" in capsys.readouterr().out


@pytest.mark.parametrize(("api", "body", "field"), [
    (Api.GENERATE_CONTENT, {"contents": "hi", "generationConfig": {"maxOutputTokens": "100"}},
     "generationConfig.maxOutputTokens"),
    (Api.CONVERSE, {"messages": "x", "inferenceConfig": {"maxTokens": 0}},
     "inferenceConfig.maxTokens"),
    (Api.INVOKE_MESSAGES, {"messages": [], "max_tokens": True}, "max_tokens"),
])
def test_bad_nested_caps_are_400_naming_the_field(api: Api, body: dict[str, Any],
                                                   field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
        parse_body(api, "p", raw(body), "m")


def test_odd_shapes_of_new_apis_still_estimate() -> None:
    assert estimate_input_tokens(Api.GENERATE_CONTENT, {"contents": "abcd"}) == 1 + 4 + 3
    assert estimate_input_tokens(Api.GENERATE_CONTENT, {"contents": {"parts": "x"}}) == 1 + 4 + 3
    assert estimate_input_tokens(Api.CONVERSE, {"messages": ["abcd", 5, None]}) == 1 + 12 + 3
    assert estimate_input_tokens(Api.EMBEDDINGS, {"input": {"odd": "shape"}}) == 0
    assert estimate_input_tokens(Api.EMBEDDINGS, {}) == 0


def test_model_named_by_path_wins_over_the_body_and_a_cut_body_keeps_it() -> None:
    body = raw({"model": "other", "messages": [{"role": "user", "content": "x" * 100}],
                "max_tokens": 50})
    assert parse_body(Api.INVOKE_MESSAGES, "bedrock", body, "anthropic.m").model == "anthropic.m"
    cut = parse_partial(Api.CONVERSE, "bedrock", b'{"messages": [{"role"', 5000, "a.m", True)
    assert (cut.model, cut.stream, cut.partial) == ("a.m", True, True)
    assert cut.estimated_input_tokens == 1250 + 3
