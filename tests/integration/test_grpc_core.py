"""The sidecar over real gRPC against a real Redis server."""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.resp import RespClient
from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.service import build_server
from tests.conftest import RedisServer, free_port
from tests.helpers import budget, write_bundle


class Sidecar:
    def __init__(self, engine: Engine, server: grpc.aio.Server, port: int) -> None:
        self.engine = engine
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.PolicyDecisionPointStub(self.channel)


async def start_sidecar(redis_url: str, bundle: pathlib.Path | None,
                        timeout_s: float = 0.025,
                        transport: str = "redis-py") -> tuple[Sidecar, object]:
    holder = PolicyHolder(bundle)
    if bundle is not None:
        holder.set(load_bundle(bundle))
    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.25,
                                     socket_connect_timeout=0.25, max_connections=256)
    store = BudgetStore(client, KeySpace("it"), timeout_s, transport=(
        RespClient.from_url(redis_url) if transport == "resp" else None))
    engine = Engine(holder, store, Metrics())
    server, health, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}")
    await server.start()
    await health.set(holder.current is not None)
    return Sidecar(engine, server, port), health


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[list[Sidecar]]:
    made: list[Sidecar] = []
    yield made
    for s in made:
        await s.channel.close(None)
        await s.server.stop(0)
        await s.engine.store.close()


def areq(rid: str, tenant: str = "acme", tin: int = 1000, tout: int = 500,
         model: str = "gpt-4o-mini") -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, tenant=tenant, workload="chat", model=model,
                               provider="openai", estimated_input_tokens=tin,
                               max_output_tokens=tout)


@pytest.mark.parametrize("transport", ["redis-py", "resp"])
async def test_200_concurrent_authorize_admit_exactly_the_n_that_fit(
        redis_url: str, tmp_path: pathlib.Path, sidecar_factory: list[Sidecar],
        transport: str) -> None:
    # Each request costs exactly 450 micro-USD; room for exactly 37 of them.
    n_fit = 37
    d = write_bundle(tmp_path, [budget("cap", f"0.{450 * n_fit + 449:06d}",
                                       scope={"tenant": "acme"})],
                     settings={"allow_constrain": False})
    sc, _ = await start_sidecar(redis_url, d, timeout_s=2.0, transport=transport)
    sidecar_factory.append(sc)
    results = await asyncio.gather(
        *(sc.stub.Authorize(areq(f"c{i}"), timeout=10) for i in range(200)))
    allowed = [r for r in results if r.decision == pb.ALLOW]
    denied = [r for r in results if r.decision == pb.DENY]
    assert len(allowed) == n_fit
    assert len(denied) == 200 - n_fit
    assert all(r.block_reasons[0].code == pb.BUDGET_EXHAUSTED for r in denied)
    for r in allowed:
        h = r.holds[0]
        assert h.settled_micros + h.held_micros <= h.limit_micros
    key = sc.engine.store.keys.window("cap", (), allowed[0].holds[0].window_start_ms)
    settled, held = await sc.engine.store.window(key)
    assert settled + held == 450 * n_fit <= 450 * n_fit + 449
    # Settle them all concurrently at a higher actual cost: still one event each.
    closeouts = await asyncio.gather(*(sc.stub.Closeout(pb.CloseoutRequest(
        permit_id=r.permit_id, usage=pb.Usage(input_tokens=1000, output_tokens=400),
        outcome=pb.SUCCEEDED), timeout=10) for r in allowed))
    assert {c.status for c in closeouts} == {pb.SETTLED}
    settled, held = await sc.engine.store.window(key)
    assert held == 0
    assert settled == sum(c.actual_cost_micros for c in closeouts)
    client: Any = sc.engine.store.client
    entries = await client.xrange(sc.engine.store.keys.stream)
    types = [f[b"type"].decode() for _, f in entries]
    assert types.count("decision") == 200
    assert types.count("settlement") == n_fit
    assert types.count("alert") == 1  # 80% crossed once; 100% never reached


async def test_invalid_argument_names_the_field(
        redis_url: str, tmp_path: pathlib.Path, sidecar_factory: list[Sidecar]) -> None:
    sc, _ = await start_sidecar(redis_url, write_bundle(tmp_path, [budget("b", "1")]))
    sidecar_factory.append(sc)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sc.stub.Authorize(areq("x", tenant=""), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant" in (info.value.details() or "")
    big = areq("y")
    for i in range(40):
        big.labels[f"k{i}"] = "v"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sc.stub.Authorize(big, timeout=5)
    assert "labels" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sc.stub.Closeout(pb.CloseoutRequest(permit_id="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "permit_id" in (info.value.details() or "")


async def test_health_is_not_serving_until_policy_loaded_and_reflection_lists_services(
        redis_url: str, sidecar_factory: list[Sidecar]) -> None:
    sc, _ = await start_sidecar(redis_url, None)
    sidecar_factory.append(sc)
    hstub = health_pb2_grpc.HealthStub(sc.channel)
    got = await hstub.Check(
        health_pb2.HealthCheckRequest(service="keel.pdp.v1.PolicyDecisionPoint"))
    assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
    r = await sc.stub.Authorize(areq("p"), timeout=5)
    assert r.decision == pb.DENY
    assert r.block_reasons[0].code == pb.POLICY_NOT_LOADED
    rstub = reflection_pb2_grpc.ServerReflectionStub(sc.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for resp in rstub.ServerReflectionInfo(ask()):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"keel.pdp.v1.PolicyDecisionPoint", "grpc.health.v1.Health"} <= names


async def test_redis_stopped_mid_test_gives_store_unavailable_in_time_then_recovers(
        tmp_path: pathlib.Path, sidecar_factory: list[Sidecar]) -> None:
    with tempfile.TemporaryDirectory() as work:
        rs = RedisServer(free_port(), pathlib.Path(work))
        rs.start()
        try:
            d = write_bundle(tmp_path, [
                budget("closed", "100", scope={"tenant": "acme"}, fail_mode="closed"),
                budget("open", "100", scope={"tenant": "globex"}, fail_mode="open"),
            ])
            sc, _ = await start_sidecar(rs.url, d, timeout_s=0.025)
            sidecar_factory.append(sc)
            ok = await sc.stub.Authorize(areq("before"), timeout=5)
            assert ok.decision == pb.ALLOW
            rs.kill()
            for i in range(5):
                t0 = time.perf_counter()
                r = await sc.stub.Authorize(areq(f"down{i}"), timeout=1)
                took = time.perf_counter() - t0
                assert took < 0.5, took
                assert r.decision == pb.DENY
                assert r.degraded
                assert r.block_reasons[0].code == pb.STORE_UNAVAILABLE
                assert r.block_reasons[0].budget_id == "closed"
            opened = await sc.stub.Authorize(areq("down-open", tenant="globex"), timeout=1)
            assert opened.decision == pb.ALLOW
            assert opened.degraded
            assert opened.block_reasons[0].code == pb.STORE_UNAVAILABLE
            # A caller deadline shorter than the store timeout is honoured too.
            t0 = time.perf_counter()
            r = await sc.stub.Authorize(areq("tight"), timeout=0.05)
            assert time.perf_counter() - t0 < 0.05 + 0.1
            assert sc.engine.outbox_len >= 6
            rs.start()
            for _ in range(100):
                r = await sc.stub.Authorize(areq(f"after{_}"), timeout=5)
                if not r.degraded:
                    break
                await asyncio.sleep(0.05)
            assert r.decision == pb.ALLOW
            assert not r.degraded
            # The fail-open permit settles, and its cost reaches the budget.
            c = await sc.stub.Closeout(pb.CloseoutRequest(
                permit_id=opened.permit_id, usage=pb.Usage(input_tokens=100, output_tokens=10),
                outcome=pb.SUCCEEDED), timeout=5)
            assert c.status == pb.SETTLED
            await sc.engine.flush_outbox()
            assert sc.engine.outbox_len == 0
            client: Any = sc.engine.store.client
            entries = await client.xrange(sc.engine.store.keys.stream)
            pids = [f[b"pid"].decode() for _, f in entries]
            assert opened.permit_id in pids
            assert pids.count(opened.permit_id) == 2  # decision (from outbox) + settlement
        finally:
            rs.stop()
