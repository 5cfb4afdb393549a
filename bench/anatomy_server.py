"""A sidecar whose engine answers every Authorize with a canned decision.

    python -m bench.anatomy_server --port P --redis-url URL --mode canned|script

It serves the real ``PolicyDecisionPoint`` and ``Diagnostics`` servicers of
``keel_pdp.server.service`` (request conversion, deadline, response building)
behind the server's interceptor (``keel_pdp.server.guard``: RPC metrics,
admission) over grpc.aio on uvloop, like ``keel-pdp serve``, but the engine
decides nothing: ``canned`` answers at once with a fixed ALLOW in three
budgets, ``script`` first runs a one-line Lua script through the production
Redis client (one round trip). Their ratios to the Noop floor bound what any
decision engine can reach on this server stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import uvloop

from bench.serving import serve_until_signalled
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.resp import RespClient
from keel_pdp.decision import AuthorizeInput, DecisionKind, HoldFigure, Outcome
from keel_pdp.metrics import Metrics
from keel_pdp.server.guard import ServerGuard
from keel_pdp.server.service import DiagnosticsServicer, PdpServicer

SCRIPT = "return redis.call('INCR', KEYS[1])"
TIMEOUT_S = 0.025

CANNED = Outcome(
    DecisionKind.ALLOW, "pmt_019a5a5a5a5a0123456789abcdef", "bench-generous@0123456789ab",
    "p1", 1_234, 256, "gpt-4o-mini", "openai", (),
    tuple(HoldFigure(f"bench.{s}", f"tenant={s} workload=* model=* provider=*", "daily",
                     1_763_769_600_000, 1_763_856_000_000, 10**12, 5_000, 300, "enforce")
          for s in ("org", "tenant", "workload")),
    1_763_800_000_000, False, ("bench.org", "bench.tenant", "bench.workload"))


class CannedEngine:
    def __init__(self, client: RespClient | None) -> None:
        self.client = client
        self.script = client.script(SCRIPT) if client is not None else None

    async def authorize(self, req: AuthorizeInput, deadline_s: float | None = None) -> Outcome:
        if self.client is not None and self.script is not None:
            await self.client.eval_script(self.script, ["bench:{pdp}:anatomy"], ["1"],
                                          TIMEOUT_S)
        return CANNED


async def serve(port: int, redis_url: str, mode: str) -> int:
    client = RespClient.from_url(redis_url) if mode == "script" else None
    engine = CannedEngine(client)
    if client is not None:
        await client.command("PING", timeout_s=2.0)
    metrics = Metrics()
    # The interceptor keel-pdp serve runs (RPC metrics, admission, idle streams).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             interceptors=[ServerGuard(metrics, max_concurrent_rpcs=1024)])
    engine_any: Any = engine
    pb_grpc.add_PolicyDecisionPointServicer_to_server(PdpServicer(engine_any, metrics), server)
    pb_grpc.add_DiagnosticsServicer_to_server(DiagnosticsServicer(), server)
    await serve_until_signalled(server, port, f"anatomy {mode}")
    if client is not None:
        await client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--mode", choices=("canned", "script"), required=True)
    ns = ap.parse_args(argv)
    return uvloop.run(serve(ns.port, ns.redis_url, ns.mode))


if __name__ == "__main__":
    sys.exit(main())
