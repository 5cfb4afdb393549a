"""Reading provider usage from JSON bodies and SSE streams, in Keel's convention."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from keel_pdp.mesh.mockprovider import Plan, full_body, stream_events
from keel_pdp.mesh.request import Api
from keel_pdp.mesh.usage import ResponseMeter, consistent, normalise
from keel_pdp.pricing import TokenUsage


def plan(api: Api, include_usage: bool = True) -> Plan:
    anthropic = api is Api.MESSAGES
    return Plan(api, "m", True, include_usage, input_tokens=1000, cached=300,
                cache_write=100 if anthropic else 0, output_tokens=24,
                reasoning=0 if anthropic else 5)


def meter_for(api: Api, chunks: list[bytes], sse: bool = True, complete: bool = True,
              encoding: str = "") -> Any:
    m = ResponseMeter(api, "text/event-stream; charset=utf-8" if sse else "application/json",
                      encoding)
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


@pytest.mark.parametrize("api", list(Api))
def test_stream_usage_is_read_whatever_the_chunk_boundaries(api: Api) -> None:
    p = plan(api)
    data = b"".join(stream_events(p, 4))
    whole = meter_for(api, [data])
    bytewise = meter_for(api, [data[i:i + 1] for i in range(len(data))])
    crlf = meter_for(api, [data.replace(b"\n", b"\r\n")])
    expected = consistent(1000, 300, p.cache_write, 24, p.reasoning)
    assert whole.usage == bytewise.usage == crlf.usage == expected
    assert whole.text_bytes == 24 * 4
    assert not whole.error


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
    assert r.usage == consistent(1000, 300, p.cache_write, 24, p.reasoning)
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

