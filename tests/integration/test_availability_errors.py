"""Errors at the gRPC edge, against the real server stack and a real Redis.

* Bytes that are not the method's message answer INVALID_ARGUMENT naming the
  message type (grpc alone answers UNKNOWN "Unexpected DecodeError"), count in
  ``keel_pdp_rpc_errors_total`` and record nothing.
* An unexpected exception inside Authorize is a decision (invariant 7): each
  budget's fail mode applies with the reason INTERNAL_ERROR, the decision is
  journaled like any degraded one and the error is counted. Closeout and Void
  answer their retry status, and the retry books exactly once. Any other method
  answers INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.engine import Engine
from keel_pdp.server import service
from keel_pdp.server.service import build_server
from tests.conftest import free_port
from tests.helpers import budget, make_engine, write_bundle

STREAM = "t:{pdp}:events"

# None is a valid encoding of a message whose field 1 is a string.
GARBAGE = {
    "truncated varint": b"\x08\xff",
    "length past the end": b"\x0a\x7f",
    "invalid utf-8 in a string": b"\x0a\x02\xff\xfe",
    "group end without start": b"\x0c",
    "reserved wire type": b"\x0f\x00",
}

METHODS = {
    "/keel.pdp.v1.PolicyDecisionPoint/Authorize": "keel.pdp.v1.AuthorizeRequest",
    "/keel.pdp.v1.PolicyDecisionPoint/Closeout": "keel.pdp.v1.CloseoutRequest",
    "/keel.pdp.v1.PolicyDecisionPoint/Void": "keel.pdp.v1.VoidRequest",
    "/grpc.health.v1.Health/Check": "grpc.health.v1.HealthCheckRequest",
    "/keel.pdp.v1.Diagnostics/Noop": "keel.pdp.v1.NoopRequest",
}


@dataclass
class Served:
    engine: Engine
    redis: aioredis.Redis
    channel: grpc.aio.Channel
    stub: pb_grpc.PolicyDecisionPointAsyncStub

    def metric(self, name: str, **labels: str) -> float:
        value = self.engine.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    async def events(self) -> list[dict[bytes, bytes]]:
        raw: Any = await self.redis.xrange(STREAM)
        return [fields for _, fields in raw]


async def _serve(redis_url: str, bundle: pathlib.Path) -> AsyncIterator[Served]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    engine = make_engine(client, bundle)
    server, health, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}",
                                        max_concurrent_rpcs=64)
    await server.start()
    await health.set(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(engine, client, channel, pb_grpc.PolicyDecisionPointStub(channel))
    finally:
        await channel.close(None)
        await server.stop(0)
        await client.aclose()


@pytest.fixture
async def served(redis_url: str, tmp_path: pathlib.Path) -> AsyncIterator[Served]:
    bundle = write_bundle(tmp_path / "b", [
        budget("open-org", "1000", fail_mode="open"),
        budget("closed-team", "100", fail_mode="closed", scope={"tenant": "strict"})])
    async for s in _serve(redis_url, bundle):
        yield s


def _authorize(rid: str, tenant: str = "acme") -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, tenant=tenant, workload="chat",
                               model="gpt-4o-mini", estimated_input_tokens=1000,
                               max_output_tokens=200)


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_undecodable_request_is_invalid_argument_naming_the_type(
        served: Served, kind: str) -> None:
    for method, type_name in METHODS.items():
        if kind == "invalid utf-8 in a string" and method.endswith("/Noop"):
            continue  # Noop's field 1 is bytes: any bytes are valid there
        call = served.channel.unary_unary(method, None, None)  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(GARBAGE[kind], timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
        assert type_name in (err.value.details() or ""), err.value.details()
        short = method.rpartition("/")[2]
        assert served.metric("keel_pdp_rpc_errors_total", method=short,
                             code="INVALID_ARGUMENT") >= 1
    assert await served.events() == []  # nothing decided, nothing recorded
    # The server is unharmed: a valid request right after is served.
    r = await served.stub.Authorize(_authorize("after-garbage"), timeout=5)
    assert r.decision == pb.ALLOW


async def test_unexpected_error_in_authorize_applies_each_budgets_fail_mode(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_a: Any, **_k: Any) -> Any:
        raise ZeroDivisionError("a bug, not an outage")

    monkeypatch.setattr(served.engine.store, "hold", broken)
    # Every matching budget fails open: degraded ALLOW, reason INTERNAL_ERROR.
    opened = await served.stub.Authorize(_authorize("bug-open"), timeout=5)
    assert opened.decision == pb.ALLOW
    assert opened.degraded
    assert opened.permit_id
    assert pb.INTERNAL_ERROR in [r.code for r in opened.block_reasons]
    # A fail-closed budget matches: DENY with INTERNAL_ERROR naming that budget.
    closed = await served.stub.Authorize(_authorize("bug-closed", tenant="strict"), timeout=5)
    assert closed.decision == pb.DENY
    assert [(r.code, r.budget_id) for r in closed.block_reasons] == [
        (pb.INTERNAL_ERROR, "closed-team")]
    assert served.metric("keel_pdp_internal_errors_total", method="Authorize") == 2
    assert served.metric("keel_pdp_rpc_errors_total", method="Authorize",
                         code="UNKNOWN") == 0
    assert served.metric("keel_pdp_decisions_total", decision="ALLOW",
                         reason="INTERNAL_ERROR") == 1
    assert served.metric("keel_pdp_decisions_total", decision="DENY",
                         reason="INTERNAL_ERROR") == 1

    # The bug is gone: both decisions reach the stream (journaled, then flushed once
    # the store path works), and the degraded permit is settled by Closeout.
    monkeypatch.undo()
    await served.stub.Authorize(_authorize("healthy"), timeout=5)
    await served.engine.flush_outbox()
    decisions = [e for e in await served.events() if e[b"type"] == b"decision"]
    by_pid = {e[b"pid"].decode(): e for e in decisions}
    assert opened.permit_id in by_pid
    assert closed.permit_id in by_pid
    assert b"INTERNAL_ERROR" in by_pid[opened.permit_id][b"res"]
    c = await served.stub.Closeout(pb.CloseoutRequest(
        permit_id=opened.permit_id, usage=pb.Usage(input_tokens=1000, output_tokens=100),
        outcome=pb.SUCCEEDED), timeout=5)
    assert c.status == pb.SETTLED
    # gpt-4o-mini: 1000 x 0.15 + 100 x 0.60 per million tokens = 210 micro-USD.
    assert c.actual_cost_micros == 1000 * 15 // 100 + 100 * 60 // 100


async def test_unexpected_error_in_closeout_and_void_asks_for_a_retry_that_books_once(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    a = await served.stub.Authorize(_authorize("retry-close"), timeout=5)
    b = await served.stub.Authorize(_authorize("retry-void"), timeout=5)
    assert a.decision == b.decision == pb.ALLOW

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise KeyError("a bug, not an outage")

    monkeypatch.setattr(served.engine.store, "settle", broken)
    monkeypatch.setattr(served.engine.store, "release", broken)
    req = pb.CloseoutRequest(permit_id=a.permit_id, usage=pb.Usage(
        input_tokens=1000, output_tokens=100), outcome=pb.SUCCEEDED)
    first = await served.stub.Closeout(req, timeout=5)
    assert first.status == pb.CLOSEOUT_STORE_UNAVAILABLE
    v = await served.stub.Void(pb.VoidRequest(permit_id=b.permit_id), timeout=5)
    assert v.status == pb.VOID_STORE_UNAVAILABLE
    assert served.metric("keel_pdp_internal_errors_total", method="Closeout") == 1
    assert served.metric("keel_pdp_internal_errors_total", method="Void") == 1
    monkeypatch.undo()
    again = await served.stub.Closeout(req, timeout=5)
    assert again.status == pb.SETTLED
    third = await served.stub.Closeout(req, timeout=5)
    assert third.status == pb.ALREADY_SETTLED
    v2 = await served.stub.Void(pb.VoidRequest(permit_id=b.permit_id), timeout=5)
    assert v2.status == pb.VOIDED
    events = await served.events()
    assert [e[b"pid"] for e in events if e[b"type"] == b"settlement"] == [
        a.permit_id.encode()]
    assert [e[b"pid"] for e in events if e[b"type"] == b"void"] == [b.permit_id.encode()]


async def test_unexpected_error_elsewhere_is_internal_and_counted(
        redis_url: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("a bug in a diagnostics method")

    monkeypatch.setattr(service.DiagnosticsServicer, "Noop", broken)
    bundle = write_bundle(tmp_path / "b", [budget("org", "10", fail_mode="open")])
    async for s in _serve(redis_url, bundle):
        stub = pb_grpc.DiagnosticsStub(s.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Noop(pb.NoopRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert "RuntimeError" in (err.value.details() or "")
        assert s.metric("keel_pdp_internal_errors_total", method="Noop") == 1
        assert s.metric("keel_pdp_rpc_errors_total", method="Noop", code="INTERNAL") == 1
        # Health is unaffected.
        health = health_pb2_grpc.HealthStub(s.channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1


async def test_rpc_metrics_come_from_one_place(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency by method, error codes, and the in-flight gauge while calls are served."""
    release = asyncio.Event()
    entered = asyncio.Event()
    hold = served.engine.store.hold

    async def slow(*a: Any, **k: Any) -> Any:
        entered.set()
        await release.wait()
        return await hold(*a, **k)

    monkeypatch.setattr(served.engine.store, "hold", slow)
    pending = asyncio.ensure_future(served.stub.Authorize(_authorize("m1"), timeout=5))
    await asyncio.wait_for(entered.wait(), 5)
    assert served.metric("keel_pdp_inflight_rpcs") == 1
    release.set()
    assert (await pending).decision == pb.ALLOW
    assert served.metric("keel_pdp_inflight_rpcs") == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await served.stub.Closeout(pb.CloseoutRequest(permit_id="nope"), timeout=5)
    assert served.metric("keel_pdp_rpc_duration_seconds_count", method="Authorize") == 1
    assert served.metric("keel_pdp_rpc_duration_seconds_count", method="Closeout") == 1
    assert served.metric("keel_pdp_rpc_errors_total", method="Closeout",
                         code="INVALID_ARGUMENT") == 1
    assert served.metric("keel_pdp_inflight_rpcs") == 0
