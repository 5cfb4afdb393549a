"""The settlement rule against a hostile provider, without Envoy: an error Envoy made
after an upstream reset, usage counts that are no counts, usage the store refuses."""

from __future__ import annotations

import pytest

from keel_pdp.mesh.apis import Api
from keel_pdp.mesh.settle import Permit, Stage, at_hold_fallback, request_sent_no_answer, settle
from keel_pdp.mesh.usage import Reading, ResponseMeter
from keel_pdp.mesh.usage_normalise import readable
from keel_pdp.pricing import TokenUsage

P = Permit("pmt_x", input_tokens=14, max_tokens=200)
HOLD = TokenUsage(input_tokens=14, output_tokens=200)


@pytest.mark.parametrize(("details", "sent"), [
    ("upstream_reset_before_response_started{connection_termination}", True),
    ("upstream_reset_before_response_started{remote_reset}", True),
    ("upstream_reset_before_response_started{protocol_error}", True),
    ("upstream_reset_before_response_started{remote_connection_failure|"
     "delayed_connect_error:_Connection_refused}", False),
    ("upstream_reset_before_response_started{local_connection_failure}", False),
    ("upstream_reset_before_response_started{connection_timeout}", False),
    ("upstream_reset_before_response_started{overflow}", False),
    ("upstream_reset_before_response_started{remote_refused_stream_reset}", False),
    ("via_upstream", False),
    ("no_healthy_upstream", False),
    ("", False),
])
def test_envoy_error_after_the_request_went_out_is_told_from_one_that_never_left(
        details: str, sent: bool) -> None:
    assert request_sent_no_answer(details) is sent
    s = settle(P, Stage.ENDED, 503, ResponseMeter(Api.CHAT).reading(),
               request_sent_no_answer=request_sent_no_answer(details))
    if sent:
        assert (s.kind, s.outcome, s.usage, s.estimated) == ("closeout", "FAILED", HOLD, True)
    else:
        assert s.kind == "void"


@pytest.mark.parametrize(("usage", "ok"), [
    ({"prompt_tokens": 10, "completion_tokens": 5}, True),
    ({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": None}, True),
    ({"prompt_tokens": "10", "completion_tokens": 5}, False),
    ({"prompt_tokens": 10, "completion_tokens": -5}, False),
    ({"prompt_tokens": 10.0, "completion_tokens": 5}, False),
    ({"prompt_tokens": True, "completion_tokens": 5}, False),
    ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": -1}}, False),
    ({"promptTokenCount": 10, "candidatesTokenCount": "x"}, False),
    ({"inputTokens": 10, "outputTokens": 5, "serviceTier": "standard"}, True),
])
def test_usage_with_a_count_that_is_no_count_is_unreadable(
        usage: dict[str, object], ok: bool) -> None:
    assert readable(usage) is ok


def test_a_json_answer_with_unreadable_usage_settles_on_the_estimate() -> None:
    body = b'{"choices":[],"usage":{"prompt_tokens":-900,"completion_tokens":"150"}}'
    m = ResponseMeter(Api.CHAT, "application/json")
    m.feed(body)
    r = m.reading()
    assert r.usage is None
    s = settle(P, Stage.ENDED, 200, r)
    assert s.usage == TokenUsage(input_tokens=14, output_tokens=-(-len(body) // 4))
    assert s.estimated


def test_chat_usage_followed_by_more_text_is_not_final() -> None:
    m = ResponseMeter(Api.CHAT, "text/event-stream")
    m.feed(b'data: {"choices":[],"usage":{"prompt_tokens":14,"completion_tokens":1}}\n\n')
    m.feed(b'data: {"choices":[{"delta":{"content":"' + b"tok " * 50 + b'"}}]}\n\n')
    r = m.reading()
    assert r.usage is None and r.partial_usage is not None
    s = settle(P, Stage.ENDED, 200, r)
    assert s.usage == TokenUsage(input_tokens=14, output_tokens=50)
    # A usage object that comes with the chunk's own text counts that text: still final.
    m = ResponseMeter(Api.CHAT, "text/event-stream")
    m.feed(b'data: {"choices":[{"delta":{"content":"tok tok "}}],'
           b'"usage":{"prompt_tokens":14,"completion_tokens":2}}\n\n')
    assert m.reading().usage == TokenUsage(input_tokens=14, output_tokens=2)


def test_usage_the_store_refuses_falls_back_to_the_hold_once() -> None:
    s = settle(P, Stage.ENDED, 200, _reading_with(TokenUsage(14, 0, 0, 10**6, 0)))
    fb = at_hold_fallback(P, s)
    assert fb is not None and (fb.kind, fb.outcome, fb.usage, fb.estimated) == (
        "closeout", "SUCCEEDED", HOLD, True)
    assert at_hold_fallback(P, fb) is None  # the hold itself has no further fallback
    assert at_hold_fallback(P, settle(P, Stage.REQUEST, 0, None)) is None  # a void


def _reading_with(usage: TokenUsage) -> Reading:
    return Reading(usage, None, 0, 0, False, False)
