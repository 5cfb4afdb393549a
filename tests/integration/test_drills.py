"""Crash and shutdown drills against a real `keel-pdp serve` process and Redis."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import redis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port, free_port_block
from tests.helpers import budget, wait_ready, write_bundle


def start(redis_url: str, bundle: pathlib.Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "KEEL_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--store-timeout", "1", "--sweep-interval", "0.2", "--drain-delay", "0.2",
         *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def areq(rid: str) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, tenant="acme", workload="w", model="gpt-4o-mini",
                               provider="openai", estimated_input_tokens=1000,
                               max_output_tokens=100)


def test_sigkill_between_hold_and_closeout_expires_then_late_closeout_books(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    bundle = write_bundle(tmp_path, [budget("b", "10")], settings={"hold_ttl_seconds": 5})
    port = free_port()
    proc = start(redis_url, bundle, port)
    try:
        wait_ready(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq("k1"), timeout=5)
        assert r.decision == pb.ALLOW
    finally:
        proc.kill()  # SIGKILL: no drain, no goodbye
        proc.wait(10)
    port2 = free_port()
    proc2 = start(redis_url, bundle, port2)
    try:
        wait_ready(port2)
        client: Any = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and client.zcard("keel:{pdp}:expiries"):
            time.sleep(0.2)
        assert client.zcard("keel:{pdp}:expiries") == 0  # the new sidecar swept it
        with grpc.insecure_channel(f"127.0.0.1:{port2}") as ch:
            c = pb_grpc.PolicyDecisionPointStub(ch).Closeout(pb.CloseoutRequest(
                permit_id=r.permit_id, usage=pb.Usage(input_tokens=1000, output_tokens=50),
                outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED_AFTER_EXPIRY
        assert c.actual_cost_micros == 180
        types = [f[b"type"] for _, f in client.xrange("keel:{pdp}:events")]
        assert types == [b"decision", b"expiry", b"settlement"]
        key = next(iter(client.scan_iter(match="keel:{pdp}:b:b:*")))
        assert client.hmget(key, "s", "h") == [b"180", b"0"]
    finally:
        proc2.terminate()
        proc2.wait(20)


def test_sigterm_under_load_drains_and_loses_no_event(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    bundle = write_bundle(tmp_path, [budget("b", "1000")])
    port = free_port()
    proc = start(redis_url, bundle, port, "--grace", "5", "--drain-delay", "1.0")
    wait_ready(port)

    async def load() -> tuple[list[Any], list[str]]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        answers: list[Any] = []
        health: list[str] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            hstub = health_pb2_grpc.HealthStub(ch)

            async def one(i: int) -> None:
                try:
                    answers.append(await stub.Authorize(areq(f"t{i}"), timeout=10))
                except grpc.aio.AioRpcError as exc:
                    answers.append(exc.code())

            async def watch() -> None:
                for _ in range(40):
                    try:
                        h = await hstub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                        health.append(health_pb2.HealthCheckResponse.ServingStatus.Name(h.status))
                    except grpc.aio.AioRpcError as exc:
                        health.append(exc.code().name)
                    await asyncio.sleep(0.02)

            tasks = [asyncio.create_task(one(i)) for i in range(300)]
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            tasks += [asyncio.create_task(one(1000 + i)) for i in range(100)]
            await asyncio.gather(*tasks)
            await watcher
        return answers, health

    answers, health = asyncio.run(load())
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    allowed = [a for a in answers if isinstance(a, pb.AuthorizeResponse)]
    refused = [a for a in answers if not isinstance(a, pb.AuthorizeResponse)]
    # Everything sent before SIGTERM and during the drain delay is answered.
    assert len(allowed) == 400, refused
    assert all(a.decision == pb.ALLOW for a in allowed)
    assert "NOT_SERVING" in health
    client: Any = redis.Redis.from_url(redis_url)
    recorded = {f[b"pid"].decode() for _, f in client.xrange("keel:{pdp}:events")}
    assert {a.permit_id for a in allowed} <= recorded  # every answered decision is recorded


def test_two_prefork_workers_share_the_port_and_stop_cleanly(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    import urllib.request

    bundle = write_bundle(tmp_path, [budget("b", "10")])
    port, mport = free_port(), free_port_block(2)  # worker 1's metrics on mport + 1
    proc = start(redis_url, bundle, port, "--workers", "2", "--metrics-port", str(mport))
    try:
        wait_ready(port)
        for i in range(6):  # new channels: the kernel spreads connections over workers
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.use_local_subchannel_pool", 1)]) as ch:
                r = pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq(f"w{i}"), timeout=5)
                assert r.decision == pb.ALLOW
        served = 0
        for p in (mport, mport + 1):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics",
                                                  timeout=2).read().decode()
                    break
                except OSError:
                    time.sleep(0.2)
            served += int(float(next(
                (line.split()[-1] for line in text.splitlines()
                 if line.startswith('keel_pdp_decisions_total{decision="ALLOW"')), "0")))
        assert served == 6  # every decision was made by one of the two workers
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "worker 0 gRPC listening" in out
    assert "worker 1 gRPC listening" in out
