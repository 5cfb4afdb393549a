"""The Redis client experiment: the sidecar's gRPC stack with one script call per call.

    python -m bench.rt_server --port P --redis-url URL --client none|resp|redis-py|glide

Serves ``Diagnostics.Noop`` with grpc.aio on uvloop, like ``keel-pdp serve``.
With ``--client none`` it is the floor; otherwise every call first runs a
one-line Lua script through the store's transport for that client
(``keel_pdp.budget.store.RedisPyTransport`` or ``keel_pdp.budget.resp``), with
the store's 25 ms timeout. The ratio to the floor isolates what the Redis
client costs, apart from the decision engine. A failed script call still
answers, with the exception's name as payload, so the benchmark can count it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
import uvloop

from bench.serving import serve_until_signalled
from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.resp import RespClient
from keel_pdp.budget.store import RedisPyTransport, Transport

SCRIPT = "return redis.call('INCR', KEYS[1])"
TIMEOUT_S = 0.025


async def _glide_call(redis_url: str) -> Callable[[], Awaitable[Any]]:
    """The same script call through valkey-glide (``pip install valkey-glide``;
    measured for comparison, not a dependency of the sidecar)."""
    # Imported by name: the checks run where it is not installed.
    g: Any = importlib.import_module("glide")
    host, _, port = redis_url.removeprefix("redis://").split("/")[0].rpartition(":")
    client = await g.GlideClient.create(g.GlideClientConfiguration(
        [g.NodeAddress(host, int(port))], request_timeout=int(TIMEOUT_S * 1000)))
    script = g.Script(SCRIPT)

    async def call() -> Any:
        return await client.invoke_script(script, keys=["bench:{pdp}:rt"], args=["1"])

    await call()
    return call


class OneCall(pb_grpc.DiagnosticsServicer):
    def __init__(self, call: Callable[[], Awaitable[Any]] | None) -> None:
        self.call = call

    async def Noop(self, request: pb.NoopRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.NoopResponse:
        if self.call is not None:
            try:
                await self.call()
            except Exception as exc:
                # Answered, and marked: the benchmark counts failed script calls.
                return pb.NoopResponse(payload=type(exc).__name__.encode())
        return pb.NoopResponse()


async def serve(port: int, redis_url: str, client: str) -> int:
    transport: Transport | None = None
    if client == "resp":
        transport = RespClient.from_url(redis_url)
    elif client == "redis-py":
        transport = RedisPyTransport(aioredis.Redis.from_url(redis_url, max_connections=64))
    call = None
    if client == "glide":
        call = await _glide_call(redis_url)
    if transport is not None:
        t = transport
        script = t.script(SCRIPT)
        keys = ["bench:{pdp}:rt"]
        args = ["1"]

        async def call() -> Any:
            return await t.eval_script(script, keys, args, TIMEOUT_S)

        await call()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_DiagnosticsServicer_to_server(OneCall(call), server)
    await serve_until_signalled(server, port, f"client {client}")
    if transport is not None:
        await transport.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--client", choices=("none", "resp", "redis-py", "glide"), required=True)
    ns = ap.parse_args(argv)
    return uvloop.run(serve(ns.port, ns.redis_url, ns.client))


if __name__ == "__main__":
    sys.exit(main())
