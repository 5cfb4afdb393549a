"""The mesh and web search: the searches a request allows (its tools) are held by
ext_authz; the searches the answer reports (JSON, streams) are booked by ext_proc.

The end-to-end cases run ext_authz and ext_proc in process (no Envoy) over fakeredis.
Expected costs are worked out here from the providers' documented prices, written as
integers (token prices in 1/10_000 USD per 1M tokens; see
tests/unit/test_web_search_fees.py for the sources): Anthropic's web search and
OpenAI's web_search tool are $10 per 1,000 calls, 10_000 micro-USD a search; OpenAI's
search-preview models (non-reasoning) $25 per 1,000 calls, 25_000 micro-USD a call.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import fakeredis
import pytest

from keel_pdp.engine import Engine
from keel_pdp.mesh import config as c
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh.authz import AuthorizationServicer
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.extproc import ExternalProcessorServicer
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.request import Api, parse_body, parse_partial
from keel_pdp.mesh.settle import Permit, Stage, at_hold_fallback, settle
from keel_pdp.mesh.usage import ResponseMeter
from keel_pdp.metrics import Metrics
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.unit.test_mesh_extproc import body_msg, headers_msg, response_flow, run
from tools.mockprovider import Plan, full_body, stream_events

RATES = {"claude-sonnet-4-5": {"input": 30_000, "output": 150_000},
         "gpt-5": {"input": 12_500, "output": 100_000},
         "gpt-4o-mini-search-preview": {"input": 1_500, "output": 6_000}}
FEE = {"claude-sonnet-4-5": 10_000, "gpt-5": 10_000, "gpt-4o-mini-search-preview": 25_000}


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(model: str, input_tokens: int, output_tokens: int, searches: int) -> int:
    r = RATES[model]
    units = input_tokens * r["input"] + output_tokens * r["output"]
    return -(-(units + searches * FEE[model] * 10_000) // 10_000)


PRICES = {
    "anthropic": {"claude-sonnet-4-5": {**{k: usd(v) for k, v in RATES[
        "claude-sonnet-4-5"].items()}, "max_output_tokens": 1000, "web_search_per_1k": "10"}},
    "openai": {
        "gpt-5": {**{k: usd(v) for k, v in RATES["gpt-5"].items()},
                  "max_output_tokens": 1000, "web_search_per_1k": "10"},
        "gpt-4o-mini-search-preview": {
            **{k: usd(v) for k, v in RATES["gpt-4o-mini-search-preview"].items()},
            "max_output_tokens": 1000, "web_search_per_1k": "25"}},
}


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


SEARCH = {"type": "web_search_20250305", "name": "web_search"}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 300,
            "messages": [{"role": "user", "content": "what happened today?"}]}
RESPONSES = {"model": "gpt-5", "max_output_tokens": 300, "input": "what happened today?"}
CHAT = {"model": "gpt-4o-mini-search-preview", "max_completion_tokens": 300,
        "messages": [{"role": "user", "content": "what happened today?"}]}


# ----------------------------------------------------------------------- request body
@pytest.mark.parametrize(("tools", "bound"), [
    ([{**SEARCH, "max_uses": 5}], 5),
    ([SEARCH], -1),
    ([{**SEARCH, "type": "web_search_20260209", "max_uses": 2}], 2),
    ([{**SEARCH, "max_uses": 3}, {**SEARCH, "name": "second", "max_uses": 4}], 7),
    ([{**SEARCH, "max_uses": 3}, SEARCH], -1),
    ([{"name": "lookup", "input_schema": {"type": "object"}}], 0),
    ([{"type": "web_fetch_20250910", "name": "web_fetch"}], 0),  # billed as tokens only
    (None, 0),
    ("web_search", 0),
])
def test_anthropic_tools_bound_the_searches(tools: Any, bound: int) -> None:
    body = MESSAGES if tools is None else {**MESSAGES, "tools": tools}
    assert parse_body(Api.MESSAGES, "anthropic", raw(body)).max_web_search_calls == bound


@pytest.mark.parametrize(("max_uses", "bound"), [
    (0, -1), (-3, -1), (2.5, -1), (3.0, -1), ("5", -1), (True, -1), (None, -1),
    ({"n": 5}, -1), (10_000, 10_000), (10_001, 10_000), (10**12, 10_000),
    (10**100, 10_000)])
def test_a_hostile_max_uses_is_no_bound_or_is_clamped(max_uses: Any, bound: int) -> None:
    """No readable bound holds the bundle's default (-1 here); a huge one is held as
    10,000 searches. Never an error, never zero searches."""
    body = {**MESSAGES, "tools": [{**SEARCH, "max_uses": max_uses}]}
    assert parse_body(Api.MESSAGES, "anthropic", raw(body)).max_web_search_calls == bound


@pytest.mark.parametrize(("body", "bound"), [
    ({**RESPONSES, "tools": [{"type": "web_search"}]}, -1),
    ({**RESPONSES, "tools": [{"type": "web_search_preview"}], "max_tool_calls": 4}, 4),
    ({**RESPONSES, "tools": [{"type": "web_search_2025_08_26"}], "max_tool_calls": 0}, -1),
    ({**RESPONSES, "tools": [{"type": "function", "name": "f"}], "max_tool_calls": 4}, 0),
    (RESPONSES, 0),
])
def test_a_responses_request_is_bounded_by_max_tool_calls(body: dict[str, Any],
                                                           bound: int) -> None:
    assert parse_body(Api.RESPONSES, "openai", raw(body)).max_web_search_calls == bound


@pytest.mark.parametrize(("body", "bound"), [
    (CHAT, -1),
    ({**CHAT, "model": "gpt-4o-search-preview-2025-03-11"}, -1),
    ({**CHAT, "model": "gpt-5-search-api"}, -1),
    ({**CHAT, "model": "gpt-4o", "web_search_options": {}}, -1),
    ({**CHAT, "model": "gpt-4o"}, 0),
    ({**CHAT, "model": "research-assistant"}, 0),
])
def test_a_chat_call_to_a_search_model_searches(body: dict[str, Any], bound: int) -> None:
    assert parse_body(Api.CHAT, "openai", raw(body)).max_web_search_calls == bound


def test_a_cut_body_is_read_by_pattern() -> None:
    def cut(body: dict[str, Any]) -> bytes:
        return raw({**body, "messages": [{"role": "user", "content": "x" * 800}]})[:200]

    tools = {"model": "claude-sonnet-4-5", "tools": [{**SEARCH, "max_uses": 4}]}
    assert parse_partial(Api.MESSAGES, "anthropic", cut(tools), 5_000) \
        .max_web_search_calls == 4
    unbounded = {"model": "claude-sonnet-4-5", "tools": [SEARCH]}
    assert parse_partial(Api.MESSAGES, "anthropic", cut(unbounded), 5_000) \
        .max_web_search_calls == -1
    # tools past the cut are not seen: the closeout books what the answer reports
    late = raw({"model": "claude-sonnet-4-5", "messages": [
        {"role": "user", "content": "x" * 800}], "tools": [SEARCH]})[:200]
    assert parse_partial(Api.MESSAGES, "anthropic", late, 5_000).max_web_search_calls == 0
    resp = raw({"model": "gpt-5", "max_tool_calls": 2, "tools": [{"type": "web_search"}],
                "input": "x" * 800})[:120]
    assert parse_partial(Api.RESPONSES, "openai", resp, 5_000).max_web_search_calls == 2


# ------------------------------------------------------------------------- the answer
def answer(api: Api, model: str, stream: bool, searches: int = 0, opens: int = 0,
           told: Any = None) -> Plan:
    return Plan(api, model, stream, True, 900, 0, 0, 40, 0, True, None, None, searches,
                opens, told)


def reading_of(p: Plan, complete: bool = True, drop_last: int = 0) -> Any:
    if p.stream:
        body = b"".join(stream_events(p, 4)[:len(stream_events(p, 4)) - drop_last])
        m = ResponseMeter(p.api, "text/event-stream")
    else:
        body = raw(full_body(p))
        m = ResponseMeter(p.api, "application/json")
    for i in range(0, len(body), 7):
        m.feed(body[i:i + 7])
    return m.reading(complete=complete)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_answers_report_their_searches(stream: bool) -> None:
    r = reading_of(answer(Api.MESSAGES, "claude-sonnet-4-5", stream, 3))
    assert r.usage.web_search_calls == 3
    assert r.usage.output_tokens == 40
    assert reading_of(answer(Api.MESSAGES, "claude-sonnet-4-5", stream)) \
        .usage.web_search_calls == 0


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_reported_count_wins_over_the_blocks(stream: bool) -> None:
    """A search that failed has its block but is not billed: the reported count is."""
    r = reading_of(answer(Api.MESSAGES, "claude-sonnet-4-5", stream, 3, told=2))
    assert r.usage.web_search_calls == 2


def test_a_broken_anthropic_stream_keeps_the_searches_it_started() -> None:
    r = reading_of(answer(Api.MESSAGES, "claude-sonnet-4-5", True, 3), complete=False,
                   drop_last=2)  # no message_delta, no message_stop
    assert r.usage is None
    assert r.web_search_calls == 3
    assert r.partial_usage.web_search_calls == 3


@pytest.mark.parametrize("told", ["3", -1, 2.5, True, [3], {"n": 3}])
@pytest.mark.parametrize("stream", [False, True])
def test_an_unreadable_reported_count_is_no_usage_and_the_blocks_count(
        told: Any, stream: bool) -> None:
    """A count that is no count is never read as 0 searches: the usage is unreadable
    (the call is then estimated), and the search blocks the answer showed are booked."""
    r = reading_of(answer(Api.MESSAGES, "claude-sonnet-4-5", stream, 3, told=told))
    assert r.usage is None
    assert r.web_search_calls == 3


@pytest.mark.parametrize("stream", [False, True])
def test_responses_answers_count_search_actions_once(stream: bool) -> None:
    """Two searches and one page opened: two billed calls, each counted once although
    a stream shows it added, done, and again in the response it completes with."""
    r = reading_of(answer(Api.RESPONSES, "gpt-5", stream, 2, opens=1))
    assert r.usage.web_search_calls == 2


def test_a_broken_responses_stream_keeps_the_searches_it_saw() -> None:
    r = reading_of(answer(Api.RESPONSES, "gpt-5", True, 2, opens=1), complete=False,
                   drop_last=1)  # no response.completed
    assert r.usage is None
    assert r.web_search_calls == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_search_model_answer_is_one_search(stream: bool) -> None:
    r = reading_of(answer(Api.CHAT, "gpt-4o-mini-search-preview", stream))
    assert r.usage.web_search_calls == 1
    assert reading_of(answer(Api.CHAT, "gpt-4o-mini", stream)).usage.web_search_calls == 0


# ---------------------------------------------------------------- the settlement rule
def test_a_booking_at_the_hold_books_the_searches_held() -> None:
    p = Permit("pmt_x", 900, 300, 5)
    for s in (settle(p, Stage.SENT, 0, None),
              settle(p, Stage.RESPONDING, 504, reading_of(answer(Api.MESSAGES, "m", False)))):
        assert s.usage == TokenUsage(input_tokens=900, output_tokens=300, web_search_calls=5)
    refused = settle(p, Stage.ENDED, 200, reading_of(
        answer(Api.MESSAGES, "m", False, 3, told=10**12)))
    assert refused.usage.web_search_calls == 10**12
    fallback = at_hold_fallback(p, refused)
    assert fallback is not None and fallback.usage.web_search_calls == 5


# ------------------------------------------------------------------ ext_authz + ext_proc
class Stack:
    def __init__(self, tmp: pathlib.Path) -> None:
        bundle = write_bundle(tmp / "b", [budget("all", "100.00")], prices=PRICES,
                              settings={"web_search_hold_calls": 6})
        self.engine: Engine = make_engine(fakeredis.FakeAsyncRedis(), bundle, timeout_s=0.5)
        metrics = MeshMetrics(Metrics())
        self.authz = AuthorizationServicer(self.engine, metrics, MeshConfig())
        self.proc = ExternalProcessorServicer(self.engine, metrics, MeshConfig())
        self.n = 0

    async def check(self, body: bytes, path: str, extra: dict[str, str] | None = None) -> Any:
        self.n += 1
        req = et.auth.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "POST", path, "provider.test"
        http.headers.update({"x-keel-tenant": "acme", "x-keel-workload": "w",
                             "x-request-id": f"r{self.n}", **(extra or {})})
        http.raw_body = body
        return await self.authz.check(req, None)

    async def call(self, body: dict[str, Any], path: str, answer: Plan | None = None,
                   status: str = "200") -> tuple[dict[str, str], Any, dict[str, Any],
                                                 dict[str, Any]]:
        """One call: (the headers ext_authz set, its dynamic metadata, the settlement
        event's data and res)."""
        resp = await self.check(raw(body), path)
        assert resp.status.code == 0, resp
        hdrs = {o.header.key: o.header.value for o in resp.ok_response.headers}
        pid = hdrs["x-keel-permit-id"]
        msgs = [headers_msg("request_headers", {":path": path, ":method": "POST", **hdrs})]
        if "x-keel-enforce-max-tokens" in hdrs:
            msgs.append(body_msg("request_body", raw(body), end=True))
        if answer is None:
            msgs += response_flow(b'{"error": "gateway timeout"}', status=status)
        elif answer.stream:
            msgs += response_flow(b"".join(stream_events(answer, 4)),
                                  ctype="text/event-stream", chunk=13)
        else:
            msgs += response_flow(raw(full_body(answer)))
        await run(self.proc, msgs)
        client: Any = self.engine.store.client
        for _, f in await read_stream(client, self.engine.store.keys.stream):
            if f[b"pid"].decode() == pid and f[b"type"] == b"settlement":
                return hdrs, resp.dynamic_metadata, json.loads(f[b"data"]), \
                    json.loads(f[b"res"])
        raise AssertionError("no settlement")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_search_call_is_held_for_max_uses_and_books_what_it_made(
        tmp_path: pathlib.Path, stream: bool) -> None:
    s = Stack(tmp_path)
    body = {**MESSAGES, "stream": stream, "tools": [{**SEARCH, "max_uses": 5}]}
    hdrs, md, data, res = await s.call(body, "/v1/messages",
                                       answer(Api.MESSAGES, "claude-sonnet-4-5", stream, 3))
    est_in = int(hdrs["x-keel-input-tokens"])
    assert hdrs[c.H_WEB_SEARCHES] == "5" and md["web_search_calls"] == 5
    assert int(md["estimated_cost_micros"]) == cost("claude-sonnet-4-5", est_in, 300, 5)
    assert data["usage"]["ws"] == 3
    assert res["act"] == cost("claude-sonnet-4-5", 900, 40, 3)


async def test_a_search_tool_without_a_bound_is_held_at_the_bundle_default(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    hdrs, md, _, res = await s.call({**RESPONSES, "stream": True,
                                     "tools": [{"type": "web_search"}]}, "/v1/responses",
                                    answer(Api.RESPONSES, "gpt-5", True, 2, opens=1))
    est_in = int(hdrs["x-keel-input-tokens"])
    assert md["web_search_calls"] == 6
    assert int(md["estimated_cost_micros"]) == cost("gpt-5", est_in, 300, 6)
    assert res["act"] == cost("gpt-5", 900, 40, 2)


async def test_a_search_model_chat_call_books_one_search(tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    _, md, data, res = await s.call(CHAT, "/v1/chat/completions",
                                    answer(Api.CHAT, "gpt-4o-mini-search-preview", False))
    assert md["web_search_calls"] == 6
    assert data["usage"]["ws"] == 1
    assert res["act"] == cost("gpt-4o-mini-search-preview", 900, 40, 1)


async def test_a_call_booked_at_the_hold_books_the_searches_held(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    hdrs, _, data, res = await s.call({**MESSAGES, "tools": [{**SEARCH, "max_uses": 4}]},
                                      "/v1/messages", None, status="504")
    assert data["usage"]["ws"] == 4
    assert res["act"] == cost("claude-sonnet-4-5", int(hdrs["x-keel-input-tokens"]), 300, 4)


async def test_an_impossible_reported_count_is_booked_at_the_hold_with_its_searches(
        tmp_path: pathlib.Path) -> None:
    """10^12 searches reported: refused as impossible for the permit, then booked at
    the hold (its 4 searches included), never left unbooked and never free."""
    s = Stack(tmp_path)
    hdrs, _, data, res = await s.call(
        {**MESSAGES, "tools": [{**SEARCH, "max_uses": 4}]}, "/v1/messages",
        answer(Api.MESSAGES, "claude-sonnet-4-5", False, 3, told=10**12))
    assert data["usage"]["ws"] == 4
    assert res["act"] == cost("claude-sonnet-4-5", int(hdrs["x-keel-input-tokens"]), 300, 4)


async def test_a_caller_cannot_set_the_held_search_count(tmp_path: pathlib.Path) -> None:
    """The header ext_proc reads the held count from is Keel's: a copy the caller sends
    is removed (and overwritten on an allowed call)."""
    s = Stack(tmp_path)
    resp = await s.check(raw(MESSAGES), "/v1/messages", {c.H_WEB_SEARCHES: "0"})
    hdrs = {o.header.key: o.header.value for o in resp.ok_response.headers}
    assert hdrs[c.H_WEB_SEARCHES] == "0"
    resp = await s.check(raw({**MESSAGES, "tools": [SEARCH]}), "/v1/messages",
                         {c.H_WEB_SEARCHES: "0"})
    hdrs = {o.header.key: o.header.value for o in resp.ok_response.headers}
    assert hdrs[c.H_WEB_SEARCHES] == "6"
    assert c.H_WEB_SEARCHES in c.KEEL_SET_HEADERS


# ------------------------------------------------------------- the client, as the mesh
def test_the_client_reads_the_bound_from_the_sdk_call_as_the_mesh_reads_a_body() -> None:
    """The SDKs' NOT_GIVEN / omit sentinels are arguments not given: no search options,
    no bound."""
    from openai import NOT_GIVEN

    from keel_pdp.client.wrap import Call

    call = Call(Api.MESSAGES, "anthropic", {**MESSAGES, "tools": [{**SEARCH, "max_uses": 2}],
                                            "cache_control": {"type": "ephemeral",
                                                              "ttl": "1h"}})
    req = call.permit_request("acme", "w", {})
    assert (req.max_web_search_calls, req.cache_write_ttl) == (2, "1h")
    assert req.to_pb("r").max_web_search_calls == 2
    chat = Call(Api.CHAT, "openai", {**CHAT, "model": "gpt-4o",
                                     "web_search_options": NOT_GIVEN})
    assert chat.max_web_search_calls == 0
    bounded = Call(Api.RESPONSES, "openai", {**RESPONSES, "tools": [{"type": "web_search"}],
                                             "max_tool_calls": NOT_GIVEN})
    assert bounded.max_web_search_calls == -1


def test_the_client_counts_the_searches_of_a_finished_answer() -> None:
    from keel_pdp.client.usage import read_usage

    def searches(obj: object) -> int:
        usage = read_usage(obj)
        assert usage is not None
        return usage.web_search_calls

    message = full_body(answer(Api.MESSAGES, "claude-sonnet-4-5", False, 3))
    assert searches(message) == 3
    assert searches(message["usage"]) == 3  # the usage object alone
    assert searches(full_body(answer(Api.RESPONSES, "gpt-5", False, 2, opens=1))) == 2
    assert searches(full_body(answer(Api.CHAT, "gpt-4o-mini-search-preview", False))) == 1
