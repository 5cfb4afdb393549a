"""keel_pdp.client against a scripted sidecar, and its usage readers on real SDK types.

The scripted sidecar is a real gRPC server (in this process) whose Authorize,
Closeout and Void answer from a script: UNAVAILABLE a given number of times,
then a decision. It records every request and the deadline each arrived with,
so the tests see what the client put on the wire.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from anthropic._models import construct_type as anthropic_construct
from anthropic.types import Message, RawMessageStreamEvent
from openai._models import construct_type as openai_construct
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as rpc
from keel_pdp.client import (
    AsyncKeelClient,
    KeelClient,
    KeelRequestError,
    PermitDenied,
    Retry,
    SidecarUnavailable,
    TokenUsage,
    UsageMeter,
    read_usage,
)
from keel_pdp.mesh.request import Api
from tests.conftest import free_port
from tools.mockprovider import Plan, full_body, stream_events


@dataclass
class Script:
    unavailable: int = 0  # Authorize answers UNAVAILABLE this many times first
    decision: pb.Decision.ValueType = pb.ALLOW
    closeout_busy: int = 0  # Closeout answers CLOSEOUT_STORE_UNAVAILABLE this many times
    invalid: bool = False
    delay_s: float = 0.0
    authorize: list[tuple[str, float | None]] = field(default_factory=list)
    closeouts: list[pb.CloseoutRequest] = field(default_factory=list)
    voids: list[pb.VoidRequest] = field(default_factory=list)


class ScriptedSidecar(rpc.PolicyDecisionPointServicer):
    def __init__(self, script: Script) -> None:
        self.s = script
        self.lock = threading.Lock()

    def Authorize(self, request: pb.AuthorizeRequest,
                  context: grpc.ServicerContext) -> pb.AuthorizeResponse:
        with self.lock:
            self.s.authorize.append((request.request_id, context.time_remaining()))
            n = len(self.s.authorize)
        if self.s.delay_s:
            threading.Event().wait(self.s.delay_s)
        if self.s.invalid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model must not be empty")
        if n <= self.s.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        reasons = []
        if self.s.decision == pb.DENY:
            reasons = [pb.BlockReason(code=pb.BUDGET_EXHAUSTED, message="acme-daily is spent",
                                      budget_id="acme-daily", exception_path="finance-overage",
                                      retry_after_seconds=3600)]
        elif self.s.decision == pb.CONSTRAIN:
            reasons = [pb.BlockReason(code=pb.MODEL_REROUTED, message="rerouted")]
        return pb.AuthorizeResponse(
            decision=self.s.decision, permit_id="" if self.s.decision == pb.DENY else "pmt_1",
            estimated_cost_micros=480, block_reasons=reasons,
            constraints=pb.Constraints(
                max_output_tokens=120 if self.s.decision == pb.CONSTRAIN else 500,
                model="gpt-4o-mini" if self.s.decision == pb.CONSTRAIN else request.model,
                provider="openai"))

    def Closeout(self, request: pb.CloseoutRequest,
                 context: grpc.ServicerContext) -> pb.CloseoutResponse:
        with self.lock:
            self.s.closeouts.append(request)
            n = len(self.s.closeouts)
        if n <= self.s.closeout_busy:
            return pb.CloseoutResponse(status=pb.CLOSEOUT_STORE_UNAVAILABLE)
        return pb.CloseoutResponse(status=pb.SETTLED, actual_cost_micros=300, held_micros=480,
                                   correction_micros=-180)

    def Void(self, request: pb.VoidRequest,
             context: grpc.ServicerContext) -> pb.VoidResponse:
        with self.lock:
            self.s.voids.append(request)
        return pb.VoidResponse(status=pb.VOIDED, released_micros=480, state="voided")


@pytest.fixture
def sidecar() -> Iterator[tuple[str, Script]]:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rpc.add_PolicyDecisionPointServicer_to_server(ScriptedSidecar(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        server.stop(0)


FAST = Retry(attempts=5, initial_backoff_s=0.001, max_backoff_s=0.01)
USAGE = TokenUsage(input_tokens=1300, cached_input_tokens=1000, output_tokens=300)


def keel(target: str, **kw: Any) -> KeelClient:
    return KeelClient(target, tenant="acme", workload="chat", retry=FAST, **kw)


def test_unavailable_is_retried_with_the_same_request_id(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.unavailable = 2
    with keel(target, timeout=5) as k, k.permit("gpt-4o", max_output_tokens=500) as p:
        p.record_usage(USAGE)
    ids = [rid for rid, _ in script.authorize]
    assert len(ids) == 3 and len(set(ids)) == 1
    assert p.request_id == ids[0]
    assert p.settlement is not None and p.settlement.status == "SETTLED"


def test_each_permit_gets_a_fresh_request_id_and_a_caller_id_is_kept(
        sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    with keel(target) as k:
        for _ in range(3):
            with k.permit("gpt-4o") as p:
                p.record_usage(USAGE)
        with k.permit("gpt-4o", request_id="order-7") as p:
            p.record_usage(USAGE)
    ids = [rid for rid, _ in script.authorize]
    assert len(set(ids[:3])) == 3
    assert ids[3] == "order-7"


def test_the_callers_deadline_reaches_the_sidecar(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    # Generous: a loaded machine must not spend it before the call is made.
    with keel(target) as k, k.permit("gpt-4o", timeout=30) as p:
        p.record_usage(USAGE)
    ((_, remaining),) = script.authorize
    assert remaining is not None and 0 < remaining <= 31  # gRPC rounds a deadline up


def test_deadline_spent_on_a_slow_sidecar_applies_the_fail_mode(
        sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.delay_s = 0.5
    with keel(target) as k, pytest.raises(SidecarUnavailable, match="DEADLINE_EXCEEDED"), \
            k.permit("gpt-4o", timeout=0.1):
        pytest.fail("the block must not run")
    with keel(target, fail_mode="open") as k, k.permit("gpt-4o", timeout=0.1) as p:
        assert p.local and p.degraded and p.permit_id == ""
    assert script.closeouts == [] and script.voids == []  # nothing to end for a local permit


def test_unreachable_sidecar_fail_closed_is_a_denial_naming_the_cause() -> None:
    with keel(f"127.0.0.1:{free_port()}", timeout=0.2) as k, \
            pytest.raises(PermitDenied) as info, k.permit("gpt-4o"):
        pytest.fail("the block must not run")
    assert isinstance(info.value, SidecarUnavailable)
    assert info.value.codes == ("SIDECAR_UNAVAILABLE",)


def test_invalid_argument_is_raised_at_once_even_when_failing_open(
        sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.invalid = True
    with keel(target, fail_mode="open") as k, \
            pytest.raises(KeelRequestError, match="model must not be empty"), \
            k.permit("gpt-4o"):
        pytest.fail("the block must not run")
    assert len(script.authorize) == 1


def test_denial_raises_with_its_reasons(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.decision = pb.DENY
    with keel(target) as k, pytest.raises(PermitDenied) as info, k.permit("gpt-4o"):
        pytest.fail("the block must not run")
    err = info.value
    assert err.codes == ("BUDGET_EXHAUSTED",)
    assert err.retry_after_seconds == 3600
    assert err.exception_paths == ("finance-overage",)
    assert "acme-daily is spent" in str(err)
    assert script.voids == [] and script.closeouts == []


def test_constraints_are_exposed(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.decision = pb.CONSTRAIN
    with keel(target) as k, k.permit("gpt-4.1", max_output_tokens=500) as p:
        assert (p.constrained, p.model, p.max_output_tokens) == (True, "gpt-4o-mini", 120)
        assert [r.code for r in p.reasons] == ["MODEL_REROUTED"]
        p.record_usage(USAGE)


def test_exit_closes_out_with_the_usage_and_retries_a_busy_store(
        sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.closeout_busy = 2
    with keel(target) as k, k.permit("gpt-4o") as p:
        p.record_usage(USAGE, provider_cost_micros=290)
    assert len(script.closeouts) == 3
    assert {c.permit_id for c in script.closeouts} == {"pmt_1"}
    last = script.closeouts[-1]
    assert (last.usage.input_tokens, last.usage.cached_input_tokens,
            last.usage.output_tokens) == (1300, 1000, 300)
    assert last.provider_cost_micros == 290 and last.outcome == pb.SUCCEEDED
    assert p.settlement is not None and p.settlement.actual_cost_micros == 300


def test_an_exception_voids_and_is_re_raised(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    with keel(target) as k, pytest.raises(KeyError), k.permit("gpt-4o"):
        raise KeyError("boom")
    ((void,),) = [script.voids]
    assert void.permit_id == "pmt_1" and "KeyError" in void.reason
    assert script.closeouts == []


def test_no_usage_recorded_voids(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    with keel(target) as k, k.permit("gpt-4o"):
        pass
    assert [v.reason for v in script.voids] == ["closed without usage"]


def test_impossible_usage_is_refused_before_it_reaches_the_sidecar(
        sidecar: tuple[str, Script]) -> None:
    target, _ = sidecar
    with keel(target) as k, k.permit("gpt-4o") as p, pytest.raises(ValueError,
                                                                   match="cached_input"):
        p.record_usage(TokenUsage(input_tokens=10, cached_input_tokens=20))


def test_unreachable_closeout_is_kept_on_the_permit_not_raised(
        sidecar: tuple[str, Script]) -> None:
    target, _ = sidecar
    with keel(target, settle_timeout=0.2) as k, k.permit("gpt-4o") as p:
        p.record_usage(USAGE)
        k.channel.close()  # the sidecar is gone by the time the call ends
    assert p.settlement is None and p.settle_error is not None


async def test_async_client_retries_closes_out_and_voids(sidecar: tuple[str, Script]) -> None:
    target, script = sidecar
    script.unavailable = 1
    async with AsyncKeelClient(target, tenant="acme", workload="chat", retry=FAST,
                               timeout=5) as k:
        async with k.permit("gpt-4o") as p:
            p.record_usage(USAGE)
        with pytest.raises(asyncio.CancelledError):
            async with k.permit("gpt-4o"):
                raise asyncio.CancelledError
    ids = [rid for rid, _ in script.authorize]
    assert ids[0] == ids[1] != ids[2]
    assert p.settlement is not None and p.settlement.status == "SETTLED"
    assert [v.reason for v in script.voids] == ["caller raised CancelledError"]


# ------------------------------------------------------------------ usage readers
APIS = (Api.CHAT, Api.RESPONSES, Api.MESSAGES)
PLANS = {
    Api.CHAT: Plan(Api.CHAT, "gpt-4o", False, True, 1200, 400, 0, 90, 30),
    Api.RESPONSES: Plan(Api.RESPONSES, "gpt-4o", False, False, 1200, 400, 0, 90, 30),
    Api.MESSAGES: Plan(Api.MESSAGES, "claude", False, False, 1200, 400, 100, 90, 0),
}
WANT = {Api.CHAT: TokenUsage(1200, 400, 0, 90, 30), Api.RESPONSES: TokenUsage(1200, 400, 0, 90, 30),
        Api.MESSAGES: TokenUsage(1200, 400, 100, 90, 0)}
SDK_TYPES: dict[Api, Any] = {Api.CHAT: ChatCompletion, Api.RESPONSES: Response,
                             Api.MESSAGES: Message}
EVENT_TYPES: dict[Api, Any] = {Api.CHAT: ChatCompletionChunk, Api.RESPONSES: ResponseStreamEvent,
                               Api.MESSAGES: RawMessageStreamEvent}


def sdk_object(api: Api, type_: Any, value: Any) -> Any:
    """Built the way each SDK builds what it received (lenient, as in production)."""
    construct = anthropic_construct if api is Api.MESSAGES else openai_construct
    return construct(type_=type_, value=value)


@pytest.mark.parametrize("api", APIS)
def test_read_usage_of_sdk_responses_their_usage_and_mappings(api: Api) -> None:
    body = full_body(PLANS[api])
    obj = sdk_object(api, SDK_TYPES[api], body)
    assert type(obj) is SDK_TYPES[api]
    assert read_usage(obj) == WANT[api]
    assert read_usage(obj.usage) == WANT[api]
    assert read_usage(body) == WANT[api]


def sse_items(api: Api, plan: Plan) -> list[Any]:
    import json

    out = []
    for raw in stream_events(plan, 7):
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(sdk_object(api, EVENT_TYPES[api], json.loads(line[6:])))
    return out


@pytest.mark.parametrize("api", APIS)
def test_usage_meter_reads_sdk_stream_items(api: Api) -> None:
    plan = PLANS[api]
    items = sse_items(api, plan)
    m = UsageMeter()
    for it in items[:-2]:
        m.feed(it)
    if api is Api.MESSAGES:  # message_start already told the input side
        assert m.usage is None and m.partial_usage is not None
        assert m.partial_usage.input_tokens == 1200
        assert m.partial_usage.cache_write_tokens == 100
    for it in items[-2:]:
        m.feed(it)
    assert m.usage == WANT[api]
    assert m.text_bytes == 4 * plan.output_tokens


def test_chat_stream_without_usage_chunk_reports_none_but_counts_text() -> None:
    plan = Plan(Api.CHAT, "gpt-4o", True, False, 1200, 0, 0, 90, 0)
    m = UsageMeter()
    for it in sse_items(Api.CHAT, plan):
        m.feed(it)
    assert m.usage is None and m.text_bytes == 360


def test_anthropic_thinking_tokens_are_reasoning() -> None:
    body = full_body(PLANS[Api.MESSAGES])
    body["usage"]["output_tokens_details"] = {"thinking_tokens": 60}
    assert read_usage(sdk_object(Api.MESSAGES, Message, body)) == TokenUsage(1200, 400, 100, 90, 60)


def test_read_usage_refuses_what_is_not_a_response() -> None:
    with pytest.raises(TypeError, match="cannot read usage from int"):
        read_usage(42)
    assert read_usage({"id": "x"}) is None


def test_chat_usage_followed_by_more_text_is_read_as_the_mesh_reads_it() -> None:
    """Usage in an early chunk, then more text: not the final count. The client's
    meter reads the SDK's chunks exactly as the mesh's meter reads the same bytes."""
    from keel_pdp.mesh.usage import ResponseMeter

    def chunk(text: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [] if text is None else [
                    {"index": 0, "delta": {"content": text}, "finish_reason": None}],
                "usage": usage}

    early = {"prompt_tokens": 700, "completion_tokens": 1, "total_tokens": 701}
    chunks = [chunk("The ", early)] + [chunk("ledger is append-only. ")] * 10
    client, mesh = UsageMeter(), ResponseMeter(Api.CHAT, "text/event-stream")
    for c in chunks:
        client.feed(sdk_object(Api.CHAT, ChatCompletionChunk, c))
        mesh.feed(b"data: " + json.dumps(c).encode() + b"\n\n")
    text_bytes = len("The ") + 10 * len("ledger is append-only. ")
    assert client.usage is None
    assert client.partial_usage == TokenUsage(input_tokens=700, output_tokens=1)
    ours, theirs = client.reading(), mesh.reading(complete=False)
    assert (ours.usage, ours.partial_usage, ours.text_bytes, ours.error, ours.incomplete) == (
        theirs.usage, theirs.partial_usage, theirs.text_bytes, theirs.error, theirs.incomplete)
    assert client.reading().text_bytes == text_bytes
    # a usage object after the last text is the final count again
    client.feed(sdk_object(Api.CHAT, ChatCompletionChunk,
                           chunk(None, {"prompt_tokens": 700, "completion_tokens": 60})))
    assert client.usage == TokenUsage(input_tokens=700, output_tokens=60)
