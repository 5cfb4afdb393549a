"""ext_proc: cap rewrite on the way out, closeout or void on the way back (no Envoy)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from keel_pdp.engine import Engine
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh.authz import AuthorizationServicer
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.extproc import ExternalProcessorServicer
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.request import Api
from keel_pdp.mesh.watch import PermitWatch
from keel_pdp.metrics import Metrics
from tests.conftest import ROOT
from tests.helpers import make_engine, read_stream
from tools.mockprovider import Plan, full_body, stream_events

POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
CHAT = {"model": "gpt-4.1-mini", "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello there"}]}


class Stack:
    def __init__(self, connected: bool = True) -> None:
        self.server = fakeredis.FakeServer()
        self.engine: Engine = make_engine(fakeredis.FakeAsyncRedis(server=self.server), POLICIES,
                                          timeout_s=0.2)
        self.metrics = MeshMetrics(Metrics())
        cfg = MeshConfig(closeout_attempts=3)
        self.authz = AuthorizationServicer(self.engine, self.metrics, cfg)
        self.proc = ExternalProcessorServicer(self.engine, self.metrics, cfg)
        self.n = 0

    async def authorize(self, body: dict[str, Any] = CHAT, tenant: str = "acme",
                        path: str = "/v1/chat/completions") -> dict[str, str]:
        """The request headers after ext_authz let the call through."""
        self.n += 1
        req = et.auth.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "POST", path, "provider.test"
        http.headers.update({"x-keel-tenant": tenant, "x-keel-workload": "w",
                             "x-request-id": f"r{self.n}"})
        http.raw_body = json.dumps(body).encode()
        resp = await self.authz.check(req, None)
        assert resp.status.code == 0, resp
        hdrs = {o.header.key: o.header.value for o in resp.ok_response.headers}
        return {":path": path, ":method": "POST", "accept-encoding": "gzip", **hdrs}

    async def state(self, pid: str) -> str:
        rec = await self.engine.store.permit(pid)
        assert rec is not None
        return rec.state

    async def settlement(self, pid: str) -> dict[str, Any]:
        client: Any = self.engine.store.client
        for _, f in await read_stream(client, self.engine.store.keys.stream):
            if f[b"pid"].decode() == pid and f[b"type"] == b"settlement":
                return dict(json.loads(f[b"data"]))
        raise AssertionError("no settlement event")


def headers_msg(kind: str, headers: dict[str, str], end: bool = False) -> Any:
    msg = et.proc.ProcessingRequest()
    part = getattr(msg, kind)
    for k, v in headers.items():
        part.headers.headers.add(key=k, raw_value=v.encode())
    part.end_of_stream = end
    return msg


def body_msg(kind: str, data: bytes, end: bool) -> Any:
    msg = et.proc.ProcessingRequest()
    getattr(msg, kind).body = data
    getattr(msg, kind).end_of_stream = end
    return msg


async def run(proc: ExternalProcessorServicer, msgs: list[Any],
              cancel_after: bool = False) -> list[Any]:
    """Drive one Process stream; ``cancel_after``: Envoy resets it after the last message."""
    async def feed() -> AsyncIterator[Any]:
        for m in msgs:
            yield m
        if cancel_after:
            raise asyncio.CancelledError

    out: list[Any] = []
    try:
        async for resp in proc.Process(feed(), None):
            out.append(resp)
    except asyncio.CancelledError:
        assert cancel_after
    await proc.drain()
    return out


def response_flow(body: bytes, status: str = "200", ctype: str = "application/json",
                  chunk: int = 0) -> list[Any]:
    msgs = [headers_msg("response_headers", {":status": status, "content-type": ctype})]
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    msgs += [body_msg("response_body", p, end=i == len(pieces) - 1)
             for i, p in enumerate(pieces)]
    return msgs


def plan(api: Api = Api.CHAT, stream: bool = False) -> Plan:
    return Plan(api, "m", stream, True, 1200, 400, 0, 24, 0)


async def test_json_response_is_closed_out_with_the_provider_usage() -> None:
    s = Stack()
    req = await s.authorize()
    pid = req["x-keel-permit-id"]
    out = await run(s.proc, [headers_msg("request_headers", req),
                             *response_flow(json.dumps(full_body(plan())).encode())])
    assert len(out) == 3
    assert list(out[0].request_headers.response.header_mutation.remove_headers) == [
        "accept-encoding"]
    assert not out[0].HasField("mode_override")
    assert await s.state(pid) == "settled"
    data = await s.settlement(pid)
    assert data["usage"] == {"in": 1200, "cached": 400, "cw": 0, "out": 24, "rsn": 0}
    assert data["outcome"] == "SUCCEEDED"


async def test_sse_response_in_small_chunks_is_passed_on_and_closed_out() -> None:
    s = Stack()
    req = await s.authorize({**CHAT, "stream": True,
                             "stream_options": {"include_usage": True}})
    assert "x-keel-stream-usage" not in req  # the client asked for usage itself
    stream = b"".join(stream_events(plan(stream=True), 4))
    out = await run(s.proc, [headers_msg("request_headers", req),
                             *response_flow(stream, ctype="text/event-stream", chunk=7)])
    assert all(not r.response_body.response.HasField("body_mutation") for r in out[2:])
    data = await s.settlement(req["x-keel-permit-id"])
    assert data["usage"]["in"] == 1200 and data["usage"]["out"] == 24


async def test_stream_keel_asked_usage_for_settles_exactly_and_loses_the_usage_chunk() -> None:
    s = Stack()
    req = await s.authorize({**CHAT, "stream": True})
    assert req["x-keel-stream-usage"] == "strip"
    assert req["x-keel-enforce-max-tokens"] == "100"  # the body rewrite that asks for it
    original = json.dumps({**CHAT, "stream": True}).encode()
    stream = b"".join(stream_events(plan(stream=True), 4))
    out = await run(s.proc, [headers_msg("request_headers", req),
                             body_msg("request_body", original, end=True),
                             *response_flow(stream, ctype="text/event-stream", chunk=7)])
    sent = json.loads(out[1].request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    passed = b""
    for r, piece in zip(out[3:], [stream[i:i + 7] for i in range(0, len(stream), 7)],
                        strict=True):
        m = r.response_body.response
        if not m.HasField("body_mutation"):
            passed += piece
        elif m.body_mutation.WhichOneof("mutation") == "body":
            passed += m.body_mutation.body
    without = b"".join(stream_events(Plan(Api.CHAT, "m", True, False, 1200, 400, 0, 24, 0), 4))
    assert passed == without
    data = await s.settlement(req["x-keel-permit-id"])
    assert data["usage"]["in"] == 1200 and data["usage"]["cached"] == 400


async def test_enforced_cap_buffers_and_rewrites_the_request_body() -> None:
    s = Stack()
    req = await s.authorize({k: v for k, v in CHAT.items() if k != "max_tokens"})
    assert req["x-keel-enforce-max-tokens"] == "1024"
    original = json.dumps({"model": "gpt-4.1-mini", "messages": []}).encode()
    out = await run(s.proc, [headers_msg("request_headers", req),
                             body_msg("request_body", original, end=True)])
    mode = out[0].mode_override
    assert mode.request_body_mode == et.BODY_BUFFERED
    assert mode.response_body_mode == et.BODY_STREAMED
    common = out[1].request_body.response
    new = common.body_mutation.body
    assert json.loads(new)["max_completion_tokens"] == 1024
    (cl,) = common.header_mutation.set_headers
    assert (cl.header.key, cl.header.raw_value) == ("content-length", str(len(new)).encode())
    # The client went away before any response: the request reached the provider.
    assert await s.state(req["x-keel-permit-id"]) == "settled"
    assert (await s.settlement(req["x-keel-permit-id"]))["outcome"] == "CANCELLED"


async def test_stream_reset_before_the_request_left_voids() -> None:
    s = Stack()
    req = await s.authorize({k: v for k, v in CHAT.items() if k != "max_tokens"})
    await run(s.proc, [headers_msg("request_headers", req)], cancel_after=True)
    assert await s.state(req["x-keel-permit-id"]) == "voided"


async def test_call_without_a_permit_is_not_watched() -> None:
    s = Stack()
    out = await run(s.proc, [headers_msg("request_headers", {":path": "/v1/models"})])
    assert out[0].WhichOneof("response") == "request_headers"  # never a bare mode_override
    mode = out[0].mode_override
    assert (mode.response_header_mode, mode.response_body_mode) == (
        et.HEADERS_SKIP, et.BODY_NONE)


async def test_upstream_error_voids_and_stops_reading_the_body() -> None:
    s = Stack()
    req = await s.authorize()
    out = await run(s.proc, [headers_msg("request_headers", req),
                             headers_msg("response_headers", {":status": "503"})])
    assert out[1].mode_override.response_body_mode == et.BODY_NONE
    assert await s.state(req["x-keel-permit-id"]) == "voided"


async def test_stream_reset_mid_response_settles_partial() -> None:
    s = Stack()
    req = await s.authorize({**CHAT, "stream": True})
    events = stream_events(plan(stream=True), 4)
    half = b"".join(events[:4])  # role + 3 content chunks of 4 tokens
    msgs = [headers_msg("request_headers", req),
            headers_msg("response_headers", {":status": "200",
                                             "content-type": "text/event-stream"}),
            body_msg("response_body", half, end=False)]
    await run(s.proc, msgs, cancel_after=True)
    data = await s.settlement(req["x-keel-permit-id"])
    assert data["outcome"] == "PARTIAL"
    assert data["usage"]["out"] == 12
    assert data["usage"]["in"] == int(req["x-keel-input-tokens"])


async def test_metadata_from_ext_authz_wins_over_request_headers() -> None:
    s = Stack()
    real = await s.authorize()
    forged = {**real, "x-keel-permit-id": "pmt_0000000000000000000000000000"}
    msg = headers_msg("request_headers", forged)
    md = msg.metadata_context.filter_metadata["envoy.filters.http.ext_authz"]
    md.update({"permit_id": real["x-keel-permit-id"], "input_tokens": 10, "max_tokens": 100,
               "api": "chat.completions", "enforce_max_tokens": False})
    await run(s.proc, [msg, *response_flow(json.dumps(full_body(plan())).encode())])
    assert await s.state(real["x-keel-permit-id"]) == "settled"


async def test_closeout_is_retried_then_given_up_while_the_store_is_down() -> None:
    s = Stack()
    req = await s.authorize()
    s.server.connected = False
    await run(s.proc, [headers_msg("request_headers", req),
                       *response_flow(json.dumps(full_body(plan())).encode())])
    assert s.metrics.settle_failures._value.get() == 1
    s.server.connected = True
    assert await s.state(req["x-keel-permit-id"]) == "held"  # the sweeper will expire it


@pytest.mark.parametrize("status", ["200", "204"])
async def test_response_without_body_ends_at_the_headers(status: str) -> None:
    s = Stack()
    req = await s.authorize()
    await run(s.proc, [headers_msg("request_headers", req),
                       headers_msg("response_headers", {":status": status}, end=True)])
    data = await s.settlement(req["x-keel-permit-id"])
    assert data["outcome"] == "SUCCEEDED" and data["usage"]["out"] == 0


class RoleContext:
    """The part of a gRPC context the processor reads: the filter's initial metadata."""

    def __init__(self, role: str) -> None:
        self.role = role

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-keel-ext-proc", self.role),)


async def run_as(proc: ExternalProcessorServicer, role: str, msgs: list[Any]) -> list[Any]:
    async def feed() -> AsyncIterator[Any]:
        for m in msgs:
            yield m

    out = [r async for r in proc.Process(feed(), RoleContext(role))]  # type: ignore[arg-type]
    await proc.drain()
    return out


async def test_cap_filter_rewrites_but_never_settles() -> None:
    s = Stack()
    req = await s.authorize({k: v for k, v in CHAT.items() if k != "max_tokens"})
    out = await run_as(s.proc, "cap", [headers_msg("request_headers", req),
                                       body_msg("request_body", b'{"model":"m"}', end=True)])
    assert out[0].mode_override.request_body_mode == et.BODY_BUFFERED
    # The body also gets the model the permit was issued for.
    assert json.loads(out[1].request_body.response.body_mutation.body) == {
        "model": "gpt-4.1-mini", "max_completion_tokens": 1024}
    assert await s.state(req["x-keel-permit-id"]) == "held"  # the closeout filter's job


async def test_cap_filter_switches_the_body_off_when_no_cap_is_needed() -> None:
    s = Stack()
    req = await s.authorize()
    assert "x-keel-enforce-max-tokens" not in req
    out = await run_as(s.proc, "cap", [headers_msg("request_headers", req)])
    assert out[0].mode_override.request_body_mode == et.BODY_NONE
    assert list(out[0].request_headers.response.header_mutation.remove_headers) == [
        "accept-encoding"]


async def test_closeout_filter_in_observability_mode_answers_nothing_and_settles() -> None:
    s = Stack()
    req = await s.authorize()
    msgs = [headers_msg("request_headers", req),
            *response_flow(json.dumps(full_body(plan())).encode())]
    for m in msgs:
        m.observability_mode = True
    assert await run_as(s.proc, "closeout", msgs) == []
    assert (await s.settlement(req["x-keel-permit-id"]))["usage"]["out"] == 24


async def test_observed_call_abandoned_before_any_response_books_the_hold() -> None:
    s = Stack()
    req = await s.authorize()
    msg = headers_msg("request_headers", req)
    msg.observability_mode = True
    await run_as(s.proc, "closeout", [msg])
    assert (await s.settlement(req["x-keel-permit-id"]))["outcome"] == "CANCELLED"


async def test_permit_no_call_followed_is_voided_once_closeout_streams_are_seen() -> None:
    s = Stack()
    watch = PermitWatch(s.engine, s.metrics, grace_s=0.05)
    s.authz.watch = s.proc.watch = watch
    first = await s.authorize()  # not tracked yet: no closeout stream seen so far
    msg = headers_msg("request_headers", first)
    await run(s.proc, [msg, *response_flow(json.dumps(full_body(plan())).encode())])
    assert watch.armed
    lost = await s.authorize()  # the client vanished before ext_proc saw this call
    for _ in range(100):
        await asyncio.sleep(0.02)
        if await s.state(lost["x-keel-permit-id"]) == "voided":
            break
    assert await s.state(lost["x-keel-permit-id"]) == "voided"
    assert await s.state(first["x-keel-permit-id"]) == "settled"
    seen = await s.authorize()
    watch.seen(seen["x-keel-permit-id"])
    assert watch.due(now=10**9) == []


def test_watch_is_off_without_a_grace_period() -> None:
    s = Stack()
    assert not PermitWatch(s.engine, s.metrics, grace_s=0).enabled
