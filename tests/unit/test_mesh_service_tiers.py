"""The mesh and OpenAI's service_tier: read from the request body for Authorize, from the
answer (JSON, the chat stream's chunks, the Responses stream's last event) for Closeout.

The end-to-end cases run ext_authz and ext_proc in process (no Envoy) over fakeredis;
the expected costs are worked out here from OpenAI's documented gpt-5 prices, written
as integers in ten-thousandths of a dollar per million tokens (see
tests/unit/test_service_tiers.py for the sources).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import fakeredis
import pytest

from keel_pdp.engine import Engine
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh.authz import AuthorizationServicer
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.extproc import ExternalProcessorServicer
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.request import Api, BadRequest, parse_body, parse_partial
from keel_pdp.mesh.usage import ResponseMeter
from keel_pdp.metrics import Metrics
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.unit.test_mesh_extproc import body_msg, headers_msg, response_flow, run
from tools.mockprovider import Plan, full_body, stream_events

GPT5 = {
    "default": {"input": 12_500, "cached_input": 1_250, "output": 100_000},
    "priority": {"input": 25_000, "cached_input": 2_500, "output": 200_000},
    "flex": {"input": 6_250, "cached_input": 625, "output": 50_000},
}


def usd(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


def cost(tier: str, input_tokens: int, cached: int, output_tokens: int) -> int:
    r = GPT5[tier]
    units = ((input_tokens - cached) * r["input"] + cached * r["cached_input"]
             + output_tokens * r["output"])
    return -(-units // 10_000)


PRICES = {"openai": {"gpt-5": {
    **{k: usd(v) for k, v in GPT5["default"].items()}, "max_output_tokens": 1000,
    "service_tiers": {t: {k: usd(v) for k, v in GPT5[t].items()}
                      for t in ("flex", "priority")}}}}


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


CHAT = {"model": "gpt-5", "max_completion_tokens": 300,
        "messages": [{"role": "user", "content": "hello there"}]}
RESPONSES = {"model": "gpt-5", "max_output_tokens": 300, "input": "hello there"}


# ----------------------------------------------------------------------- request body
@pytest.mark.parametrize("api", [Api.CHAT, Api.RESPONSES])
def test_the_request_body_names_the_tier(api: Api) -> None:
    body = CHAT if api is Api.CHAT else RESPONSES
    assert parse_body(api, "openai", raw({**body, "service_tier": "flex"})).service_tier == "flex"
    assert parse_body(api, "openai", raw(body)).service_tier == ""
    assert parse_body(api, "openai", raw({**body, "service_tier": None})).service_tier == ""
    cut = raw({"model": "gpt-5", "service_tier": "priority", **body})[:60]
    assert parse_partial(api, "openai", cut, 4000).service_tier == "priority"
    assert parse_partial(api, "openai", raw({**body, "service_tier": "priority"})[:30],
                         4000).service_tier == ""  # past the cut: not set (held as auto)


@pytest.mark.parametrize("value", [42, 1.5, True, ["priority"], {"tier": "flex"}, "",
                                   "p" * 1_000_000, "prio\x00rity", "fle x"])
def test_a_request_tier_that_is_no_tier_name_is_a_bad_request(value: object) -> None:
    with pytest.raises(BadRequest, match="service_tier") as info:
        parse_body(Api.CHAT, "openai", raw({**CHAT, "service_tier": value}))
    assert info.value.status == 400
    assert len(str(info.value)) < 300


def test_other_apis_are_not_read_for_a_tier() -> None:
    body = {"model": "claude", "max_tokens": 10, "service_tier": "standard_only",
            "messages": [{"role": "user", "content": "x"}]}
    assert parse_body(Api.MESSAGES, "anthropic", raw(body)).service_tier == ""


# ------------------------------------------------------------------------- the answer
def reading_of(api: Api, body: bytes, ctype: str = "application/json") -> Any:
    m = ResponseMeter(api, ctype)
    for i in range(0, len(body), 5):
        m.feed(body[i:i + 5])
    return m.reading()


def plan(api: Api, stream: bool, tier: Any, asked: Any = None) -> Plan:
    return Plan(api, "gpt-5", stream, True, 1200, 400, 0, 24, 0, True, tier, asked)


@pytest.mark.parametrize("api", [Api.CHAT, Api.RESPONSES])
def test_the_answer_reports_the_tier_json_and_stream(api: Api) -> None:
    assert reading_of(api, raw(full_body(plan(api, False, "priority")))).service_tier \
        == "priority"
    stream = b"".join(stream_events(plan(api, True, "default", "auto"), 4))
    assert reading_of(api, stream, "text/event-stream").service_tier == "default"
    assert reading_of(api, raw(full_body(plan(api, False, None)))).service_tier == ""


def test_a_responses_stream_broken_before_it_completes_reports_no_tier() -> None:
    """The response a Responses stream is created with repeats the tier asked for
    ("auto"); only the one it ends with says which tier served it."""
    events = stream_events(plan(Api.RESPONSES, True, "priority", "auto"), 4)
    assert b'"service_tier":"auto"' in events[0]
    m = ResponseMeter(Api.RESPONSES, "text/event-stream")
    for ev in events[:-1]:
        m.feed(ev)
    assert m.reading(complete=False).service_tier == ""


@pytest.mark.parametrize("value", [42, None, ["flex"], "x" * 500, "fl\u00e9x"])
def test_an_answer_tier_that_is_no_tier_name_reads_as_unreadable(value: Any) -> None:
    body = raw(full_body(plan(Api.CHAT, False, "flex")) | {"service_tier": value})
    assert reading_of(Api.CHAT, body).service_tier == ("" if value is None else "unreadable")


# ------------------------------------------------------------------ ext_authz + ext_proc
class Stack:
    def __init__(self, tmp: pathlib.Path) -> None:
        bundle = write_bundle(tmp / "b", [budget("all", "100.00")], prices=PRICES)
        self.engine: Engine = make_engine(fakeredis.FakeAsyncRedis(), bundle, timeout_s=0.5)
        metrics = MeshMetrics(Metrics())
        self.authz = AuthorizationServicer(self.engine, metrics, MeshConfig())
        self.proc = ExternalProcessorServicer(self.engine, metrics, MeshConfig())
        self.n = 0

    async def check(self, body: bytes, path: str) -> Any:
        self.n += 1
        req = et.auth.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "POST", path, "provider.test"
        http.headers.update({"x-keel-tenant": "acme", "x-keel-workload": "w",
                             "x-request-id": f"r{self.n}"})
        http.raw_body = body
        return await self.authz.check(req, None)

    async def call(self, body: dict[str, Any], answer: Plan, path: str) -> tuple[int, dict[
            str, Any], dict[str, Any]]:
        """One call: (the hold, the settlement event's data, its res). The hold is
        checked to be the 300 output tokens asked for and the input Keel estimated,
        at some tier's rates (``self.held_at``)."""
        resp = await self.check(raw(body), path)
        assert resp.status.code == 0, resp
        hdrs = {o.header.key: o.header.value for o in resp.ok_response.headers}
        pid = hdrs["x-keel-permit-id"]
        estimate = int(resp.dynamic_metadata["estimated_cost_micros"])
        est_in = int(hdrs["x-keel-input-tokens"])
        assert hdrs["x-keel-max-tokens"] == "300"
        self.held_at = [t for t in GPT5 if cost(t, est_in, 0, 300) == estimate]
        req = {":path": path, ":method": "POST", **hdrs}
        msgs = [headers_msg("request_headers", req)]
        if "x-keel-enforce-max-tokens" in hdrs:
            msgs.append(body_msg("request_body", raw(body), end=True))
        if answer.stream:
            msgs += response_flow(b"".join(stream_events(answer, 4)),
                                  ctype="text/event-stream", chunk=11)
        else:
            msgs += response_flow(raw(full_body(answer)))
        await run(self.proc, msgs)
        client: Any = self.engine.store.client
        for _, f in await read_stream(client, self.engine.store.keys.stream):
            if f[b"pid"].decode() == pid and f[b"type"] == b"settlement":
                return estimate, json.loads(f[b"data"]), json.loads(f[b"res"])
        raise AssertionError("no settlement")


def answer(api: Api, stream: bool, tier: Any, asked: Any = None) -> Plan:
    return Plan(api, "gpt-5", stream, True, 900, 300, 0, 40, 0, True, tier, asked)


async def test_a_priority_chat_call_through_the_mesh_is_held_and_settled_at_priority(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    estimate, data, res = await s.call({**CHAT, "service_tier": "priority"},
                                       answer(Api.CHAT, False, "priority"),
                                       "/v1/chat/completions")
    assert s.held_at == ["priority"]
    assert res["act"] == cost("priority", 900, 300, 40)
    assert data["service_tier"] == "priority" and data["priced_tier"] == "priority"
    assert estimate > cost("default", 900, 0, 300)


async def test_a_flex_responses_stream_through_the_mesh_settles_at_flex(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    estimate, data, res = await s.call({**RESPONSES, "stream": True, "service_tier": "flex"},
                                       answer(Api.RESPONSES, True, "flex", "flex"),
                                       "/v1/responses")
    assert s.held_at == ["flex"]
    assert res["act"] == cost("flex", 900, 300, 40)
    assert data["priced_tier"] == "flex"
    assert estimate > res["act"]


async def test_an_auto_chat_stream_reported_default_settles_at_the_standard_rate(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    estimate, data, res = await s.call({**CHAT, "stream": True, "service_tier": "auto"},
                                       answer(Api.CHAT, True, "default", "auto"),
                                       "/v1/chat/completions")
    assert s.held_at == ["priority"]  # the highest rate the table knows
    assert res["act"] == cost("default", 900, 300, 40)
    assert estimate > cost("default", 900, 0, 300)
    assert data["service_tier"] == "default"
    assert "SERVICE_TIER_UNPRICED" not in res.get("flags", [])


async def test_an_answer_whose_tier_cannot_be_read_books_the_highest_rate_flagged(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    _, data, res = await s.call({**CHAT, "service_tier": "flex"},
                                answer(Api.CHAT, False, {"tier": "flex"}),
                                "/v1/chat/completions")
    assert s.held_at == ["flex"]
    assert res["act"] == cost("priority", 900, 300, 40)
    assert data["service_tier"] == "unreadable" and data["tier_unpriced"] is True


async def test_a_request_tier_that_is_no_tier_name_is_refused_before_the_provider(
        tmp_path: pathlib.Path) -> None:
    s = Stack(tmp_path)
    for value in (42, "x" * 100_000, {"a": 1}):
        resp = await s.check(raw({**CHAT, "service_tier": value}), "/v1/chat/completions")
        assert resp.denied_response.status.code == 400
        assert "service_tier" in json.loads(resp.denied_response.body)["error"]["message"]
    client: Any = s.engine.store.client
    assert await client.xlen(s.engine.store.keys.stream) == 0  # nothing decided, nothing held
