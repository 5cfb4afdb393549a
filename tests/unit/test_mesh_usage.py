"""Reading provider usage from JSON bodies and SSE streams, in Keel's convention."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from keel_pdp.mesh.request import Api
from keel_pdp.mesh.usage import ResponseMeter, consistent, normalise
from keel_pdp.mesh.usage_normalise import readable
from keel_pdp.pricing import TokenUsage
from tools.mockprovider import (
    Plan,
    frame,
    full_body,
    stream_content_type,
    stream_events,
)

CACHE_WRITERS = (Api.MESSAGES, Api.INVOKE_MESSAGES, Api.CONVERSE)
STREAMING = [a for a in Api if a is not Api.EMBEDDINGS]


def plan(api: Api, include_usage: bool = True, sse: bool = True) -> Plan:
    writes = api in CACHE_WRITERS
    if api is Api.EMBEDDINGS:
        return Plan(api, "m", False, False, 1000, 0, 0, 0, 0)
    return Plan(api, "m", True, include_usage, input_tokens=1000, cached=300,
                cache_write=100 if writes else 0, output_tokens=24,
                reasoning=0 if writes else 5, sse=sse)


def expected(p: Plan) -> TokenUsage:
    return consistent(p.input_tokens, p.cached, p.cache_write, p.output_tokens, p.reasoning)


def meter_for(api: Api, chunks: list[bytes], sse: bool = True, complete: bool = True,
              encoding: str = "", ctype: str = "") -> Any:
    m = ResponseMeter(api, ctype or ("text/event-stream; charset=utf-8" if sse
                                     else "application/json"), encoding)
    for c in chunks:
        m.feed(c)
    return m.reading(complete=complete)


def test_openai_chat_prompt_tokens_already_include_cached_tokens() -> None:
    u = normalise(Api.CHAT, {"prompt_tokens": 1000, "completion_tokens": 50,
                             "prompt_tokens_details": {"cached_tokens": 600},
                             "completion_tokens_details": {"reasoning_tokens": 20}})
    assert u == TokenUsage(1000, 600, 0, 50, 20)


def test_anthropic_input_is_uncached_plus_cache_reads_plus_cache_writes() -> None:
    u = normalise(Api.MESSAGES, {"input_tokens": 10, "cache_read_input_tokens": 900,
                                 "cache_creation_input_tokens": 90, "output_tokens": 7})
    assert u == TokenUsage(1000, 900, 90, 7, 0)


def test_openai_responses_usage() -> None:
    u = normalise(Api.RESPONSES, {"input_tokens": 500,
                                  "input_tokens_details": {"cached_tokens": 100},
                                  "output_tokens": 40,
                                  "output_tokens_details": {"reasoning_tokens": 30}})
    assert u == TokenUsage(500, 100, 0, 40, 30)


def test_nonsense_fields_are_ignored_and_parts_never_exceed_totals() -> None:
    u = normalise(Api.CHAT, {"prompt_tokens": "x", "completion_tokens": -4,
                             "prompt_tokens_details": {"cached_tokens": 12},
                             "completion_tokens_details": {"reasoning_tokens": 3}})
    assert u == TokenUsage(12, 12, 0, 3, 3)
    assert not u.problems()
    assert not consistent(1, 5, 5, 0, 9).problems()


@pytest.mark.parametrize("api", STREAMING)
def test_stream_usage_is_read_whatever_the_chunk_boundaries(api: Api) -> None:
    p = plan(api)
    ctype = stream_content_type(p)
    data = b"".join(stream_events(p, 4))
    whole = meter_for(api, [data], ctype=ctype)
    bytewise = meter_for(api, [data[i:i + 1] for i in range(len(data))], ctype=ctype)
    readings = [whole, bytewise]
    if "event-stream" in ctype and "amazon" not in ctype:
        readings.append(meter_for(api, [data.replace(b"\n", b"\r\n")], ctype=ctype))
    assert all(r.usage == expected(p) for r in readings), [r.usage for r in readings]
    assert whole.text_bytes == 24 * 4
    assert not whole.error


def test_gemini_json_array_stream_is_read_element_by_element() -> None:
    p = plan(Api.GENERATE_CONTENT, sse=False)
    events = stream_events(p, 4)
    data = b"".join(events)
    assert data.startswith(b"[") and data.endswith(b"]")
    r = meter_for(Api.GENERATE_CONTENT, [data[i:i + 3] for i in range(0, len(data), 3)],
                  sse=False)
    assert r.usage == expected(p) and r.text_bytes == 96
    broken = meter_for(Api.GENERATE_CONTENT, [b"".join(events[:3])[:-5]], sse=False,
                       complete=False)
    assert broken.usage is None
    assert broken.partial_usage is not None and broken.partial_usage.input_tokens == 1000
    assert broken.text_bytes == 2 * 16  # two whole elements of four tokens


def test_event_stream_frames_checked_by_crc() -> None:
    p = plan(Api.CONVERSE)
    frames = stream_events(p, 4)
    ctype = stream_content_type(p)
    bad = bytearray(b"".join(frames))
    bad[len(frames[0]) + 20] ^= 0xFF  # inside the second frame
    r = meter_for(Api.CONVERSE, [bytes(bad)], ctype=ctype)
    assert r.error and r.usage is None and r.text_bytes == 0
    # A frame cut by the end of the body is an error, not a silent loss.
    cut = b"".join(frames)[:-7]
    r = meter_for(Api.CONVERSE, [cut], ctype=ctype)
    assert r.error and r.usage is None
    # An exception frame is a provider error.
    exc = frame({":message-type": "exception", ":exception-type": "throttlingException"},
                b'{"message":"slow down"}')
    r = meter_for(Api.CONVERSE, [frames[0], exc], ctype=ctype)
    assert r.error


def test_frame_prelude_with_impossible_length_is_corrupt_not_a_hang() -> None:
    import struct
    import zlib

    prelude = struct.pack(">II", 1 << 30, 0)
    m = ResponseMeter(Api.CONVERSE, "application/vnd.amazon.eventstream")
    m.feed(prelude + struct.pack(">I", zlib.crc32(prelude)) + b"x" * 100)
    assert m.frames is not None and "impossible" in m.frames.corrupt


def test_gemini_usage_counts_thoughts_as_output_and_cache_inside_the_prompt() -> None:
    u = normalise(Api.GENERATE_CONTENT, {"promptTokenCount": 1200,
                                         "cachedContentTokenCount": 1000,
                                         "candidatesTokenCount": 50, "thoughtsTokenCount": 150,
                                         "toolUsePromptTokenCount": 10})
    assert u == TokenUsage(1210, 1000, 0, 200, 150)


def test_bedrock_converse_input_is_uncached_plus_cache_reads_and_writes() -> None:
    u = normalise(Api.CONVERSE, {"inputTokens": 10, "cacheReadInputTokens": 900,
                                 "cacheWriteInputTokens": 90, "outputTokens": 7})
    assert u == TokenUsage(1000, 900, 90, 7, 0)


def test_chat_stream_without_include_usage_has_no_usage_but_counts_text() -> None:
    r = meter_for(Api.CHAT, stream_events(plan(Api.CHAT, include_usage=False), 4))
    assert r.usage is None
    assert r.estimated_output_tokens() == 24


def test_broken_anthropic_stream_keeps_message_start_usage() -> None:
    events = stream_events(plan(Api.MESSAGES), 4)
    r = meter_for(Api.MESSAGES, events[: len(events) // 2], complete=False)
    assert r.usage is None
    assert r.partial_usage is not None
    assert (r.partial_usage.input_tokens, r.partial_usage.cached_input_tokens,
            r.partial_usage.cache_write_tokens) == (1000, 300, 100)
    assert 0 < r.estimated_output_tokens() < 24


def test_event_split_at_the_end_without_a_blank_line_is_still_read() -> None:
    u = {"prompt_tokens": 3, "completion_tokens": 2}
    r = meter_for(Api.CHAT, [b'data: {"choices":[],"usage":' + json.dumps(u).encode() + b"}"])
    assert r.usage == TokenUsage(3, 0, 0, 2, 0)
    r = meter_for(Api.CHAT, [b'data: {"choices":[],"usage":' + json.dumps(u).encode() + b"}"],
                  complete=False)
    assert r.usage is None  # a half-received event is not trusted


def test_sse_error_event_is_flagged() -> None:
    r = meter_for(Api.MESSAGES, [b'event: error\ndata: {"type":"error","error":{}}\n\n'])
    assert r.error
    r = meter_for(Api.CHAT, [b'data: {"error":{"message":"overloaded"}}\n\n'])
    assert r.error


@pytest.mark.parametrize("api", list(Api))
def test_json_body_usage(api: Api) -> None:
    p = plan(api)
    body = json.dumps(full_body(p)).encode()
    r = meter_for(api, [body[:10], body[10:]], sse=False)
    assert r.usage == expected(p)
    assert r.body_bytes == len(body)


def test_gzip_json_body_is_inflated_incrementally() -> None:
    body = gzip.compress(json.dumps(full_body(plan(Api.CHAT))).encode())
    r = meter_for(Api.CHAT, [body[i:i + 7] for i in range(0, len(body), 7)], sse=False,
                  encoding="gzip")
    assert r.usage == TokenUsage(1000, 300, 0, 24, 5)


def test_unknown_encoding_and_oversized_body_fall_back_to_size() -> None:
    r = meter_for(Api.CHAT, [b"\x00" * 100], sse=False, encoding="br")
    assert r.usage is None and r.body_bytes == 100
    m = ResponseMeter(Api.CHAT, "application/json", "", max_body_bytes=1024)
    m.feed(json.dumps(full_body(plan(Api.CHAT))).encode() + b" " * 2000)
    r = m.reading()
    assert r.usage is None and r.text_bytes == r.body_bytes > 1024


def test_json_error_and_truncation_flags() -> None:
    r = meter_for(Api.MESSAGES, [b'{"type":"error","error":{"type":"overloaded_error"}}'],
                  sse=False)
    assert r.error and r.usage is None
    r = meter_for(Api.MESSAGES, [json.dumps({"stop_reason": "max_tokens", "usage": {
        "input_tokens": 1, "output_tokens": 2}}).encode()], sse=False)
    assert r.incomplete and r.usage == TokenUsage(1, 0, 0, 2, 0)



@pytest.mark.parametrize("api", STREAMING)
def test_in_stream_error_is_flagged_and_never_taken_for_final_usage(api: Api) -> None:
    from tools.mockprovider import error_event

    for sse in ((True, False) if api is Api.GENERATE_CONTENT else (True,)):
        p = plan(api, sse=sse)
        events = stream_events(p, 4)
        data = b"".join(events[: len(events) // 2]) + error_event(p)
        r = meter_for(api, [data], ctype=stream_content_type(p))
        assert r.error, (api, sse)
        assert r.usage is None or r.usage.output_tokens < 24


# Gemini's usageMetadata as the API sends it (ai.google.dev, "UsageMetadata"):
# per-modality breakdowns are lists of {"modality", "tokenCount"}.
GEMINI_USAGE: dict[str, Any] = {
    "promptTokenCount": 1200, "cachedContentTokenCount": 1000, "candidatesTokenCount": 50,
    "thoughtsTokenCount": 150, "totalTokenCount": 1400,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1100},
                            {"modality": "IMAGE", "tokenCount": 100}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1000}],
    "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 50}],
}


def test_gemini_usage_with_modality_breakdowns_is_read_not_estimated() -> None:
    # Booked at the provider's figures (1,200 prompt, 1,000 of them cached; 50 + 150
    # thoughts out), not at the hold's estimate.
    assert readable(GEMINI_USAGE)
    body = json.dumps({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                       "usageMetadata": GEMINI_USAGE}).encode()
    r = meter_for(Api.GENERATE_CONTENT, [body], sse=False)
    assert r.usage == TokenUsage(1200, 1000, 0, 200, 150)


def test_a_bad_count_inside_a_breakdown_still_makes_the_usage_unreadable() -> None:
    bad = {**GEMINI_USAGE, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": -5}]}
    assert not readable(bad)
    worse = {**GEMINI_USAGE, "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": "9"}]}
    assert not readable(worse)
