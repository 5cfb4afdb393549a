"""Drill: Redis unreachable for 30 seconds under steady traffic.

Starts its own redis-server (AOF) and `keel-pdp serve` on free loopback ports,
sends Authorize + Closeout at a steady rate, stops Redis for --outage seconds,
brings it back, and reports: the slowest answer during the outage (every one
must come inside the deadline), how decisions followed the fail modes, how
long recovery took, and whether every answered decision reached the stream.

    .venv/bin/python scripts/drill_redis_outage.py [--outage 30] [--rps 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import grpc
import redis

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import RedisServer, free_port
from tests.helpers import budget, write_bundle


async def drive(port: int, seconds: float, rps: int, phase: list[str],
                stats: dict[str, Counter[str]], worst: dict[str, float],
                answered: list[str]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.PolicyDecisionPointStub(ch)
        end = time.monotonic() + seconds
        i = 0
        pending: set[asyncio.Task[None]] = set()

        async def one(n: int) -> None:
            tenant = "closed-co" if n % 2 else "open-co"
            t0 = time.monotonic()
            p = phase[0]
            try:
                r = await stub.Authorize(pb.AuthorizeRequest(
                    request_id=f"d{n}", tenant=tenant, workload="w", model="gpt-4o-mini",
                    provider="openai", estimated_input_tokens=500, max_output_tokens=100),
                    timeout=0.25)
                code = pb.ReasonCode.Name(r.block_reasons[0].code) if r.block_reasons else "-"
                stats[p][f"{tenant}:{pb.Decision.Name(r.decision)}:{code}"] += 1
                answered.append(r.permit_id)
            except grpc.aio.AioRpcError as exc:
                stats[p][f"rpc-error:{exc.code().name}"] += 1
            worst[p] = max(worst.get(p, 0.0), time.monotonic() - t0)

        while time.monotonic() < end:
            i += 1
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / rps)
        await asyncio.gather(*pending)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=30.0)
    ap.add_argument("--rps", type=int, default=100)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = pathlib.Path(d)
        (work / "redis").mkdir()
        rs = RedisServer(free_port(), work / "redis")
        rs.start()
        bundle = write_bundle(work / "bundle", [
            budget("closed", "1000", scope={"tenant": "closed-co"}, fail_mode="closed"),
            budget("open", "1000", scope={"tenant": "open-co"}, fail_mode="open")])
        port = free_port()
        proc = subprocess.Popen(  # noqa: ASYNC220 - a drill driver, not a server
            [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
             "--redis-url", rs.url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
             "--outbox-dir", str(work / "outbox")],
            env={**os.environ, "KEEL_LOG_LEVEL": "ERROR"})
        try:
            await asyncio.sleep(2)
            phase = ["before"]
            stats: dict[str, Counter[str]] = {p: Counter() for p in ("before", "outage", "after")}
            worst: dict[str, float] = {}
            answered: list[str] = []
            total = 5 + ns.outage + 10
            load = asyncio.create_task(drive(port, total, ns.rps, phase, stats, worst, answered))
            await asyncio.sleep(5)
            rs.kill()
            phase[0] = "outage"
            await asyncio.sleep(ns.outage)
            rs.start()
            back = time.monotonic()
            phase[0] = "after"
            client: Any = redis.Redis(port=rs.port)
            recovered = None
            while recovered is None and time.monotonic() - back < 10:
                if stats["after"].get("closed-co:ALLOW:-", 0):
                    recovered = time.monotonic() - back
                await asyncio.sleep(0.05)
            await load
            await asyncio.sleep(2.5)  # the sidecar flushes its outbox in the background
            recorded = {f[b"pid"].decode() for _, f in client.xrange("keel:{pdp}:events")}
            missing = [p for p in answered if p not in recorded]
            for p in ("before", "outage", "after"):
                print(f"{p:7s} slowest answer {worst.get(p, 0) * 1000:7.1f} ms  "
                      f"{dict(stats[p])}")
            print(f"recovered {recovered:.2f} s after Redis came back" if recovered is not None
                  else "did not recover within 10 s")
            print(f"answered decisions {len(answered)}, missing from the stream {len(missing)}")
            return 0 if not missing and recovered is not None else 1
        finally:
            proc.terminate()
            proc.wait(20)
            rs.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
