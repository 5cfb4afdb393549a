"""What one ext_authz Check costs a Keel worker's CPU, over gRPC, against an empty call.

    python -m bench.bench_check_cpu                          # 3 rounds of 2,000 Checks
    python -m bench.bench_check_cpu --baseline-src ../main   # and a tree before, same run
    python -m bench.bench_check_cpu --profile prof.out       # cProfile of the worker

One ``keel-pdp serve`` worker (through bench.serve, ``--store-timeout 0.1``) on a
Redis of its own with tests/fixtures/mesh_policies. This process is the client
(grpc.aio, ``--concurrency`` calls in flight, each with Envoy's 250 ms deadline)
and sends what Envoy's ext_authz sends for a chat completion: the pseudo and
ordinary headers, the body as bytes, addresses and the request's time. One call
in four bills the tenant ``broke`` (a DENY, 429); the others an ALLOW on one of
many tenants (no budget runs out). Every request id is new, so every Check is a
fresh Authorize with its hold.

The same Checks also run in this process without gRPC (``--in-process``):
the servicer's ``check()`` on the engine as ``keel-pdp serve`` builds it, on
the same Redis, 50 at a time on uvloop, and once more with the engine's
answer canned (the servicer's own code: reading the request, building the
answer, metrics).

Per round it measures the worker's CPU (``/proc``, every thread) over
``--calls`` Checks and over as many empty calls (``grpc.health.v1.Health/Check``:
the gRPC stack and the server guard, no Keel work), and prints CPU per call
and the ratio Check / empty call (the same-run baseline). With
``--baseline-src`` a second worker runs the code of another source tree (for
instance a checkout of the commit before a change) on the same Redis, its
rounds interleaved with this tree's, and the ratio of the two Checks is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import ROOT, BenchError, RedisServer, cpu_seconds, free_port, new_workdir
from keel_pdp.mesh import envoy_types as et

POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
CHAT = {"model": "gpt-4.1-mini", "max_tokens": 64,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Summarise the spend policy in one line."}]}
DENIED_TENANT = "broke"  # tests/fixtures/mesh_policies: no budget, every call 429
TENANTS = 200  # ALLOWs spread over this many tenants' daily budgets
DEADLINE_S = 0.25  # Envoy's documented ext_authz timeout


def check_request(i: int, run: str) -> bytes:
    """Call ``i`` of a run as Envoy's ext_authz would send it (serialized)."""
    body = json.dumps({**CHAT, "user": f"u{i}"}).encode()
    tenant = DENIED_TENANT if i % 4 == 3 else f"cpu-{i % TENANTS}"
    req = et.auth.CheckRequest()
    attrs = req.attributes
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 40000 + i % 20000
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = 10000
    attrs.request.time.GetCurrentTime()
    http = attrs.request.http
    rid = f"{run}-{i:08d}-4c1f-9b2e-7d3a5e6f8a9b"
    http.id, http.method, http.path, http.host = str(10**18 + i), "POST", \
        "/v1/chat/completions", "api.openai.com"
    http.scheme, http.protocol, http.size = "http", "HTTP/1.1", len(body)
    http.headers.update({
        ":authority": "api.openai.com", ":method": "POST", ":path": "/v1/chat/completions",
        ":scheme": "http", "content-type": "application/json",
        "content-length": str(len(body)), "user-agent": "OpenAI/Python 1.0",
        "x-forwarded-proto": "http", "x-request-id": rid, "x-keel-tenant": tenant,
        "x-keel-workload": "chat", "x-envoy-expected-rq-timeout-ms": "60000"})
    http.raw_body = body
    return bytes(req.SerializeToString())


@dataclass
class Worker:
    label: str
    src: pathlib.Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    check_us: list[float] = field(default_factory=list)
    empty_us: list[float] = field(default_factory=list)

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def worker(label: str, src: pathlib.Path, redis_url: str, log: pathlib.Path,
           profile: str = "") -> Iterator[Worker]:
    w = Worker(label, src.resolve(), free_port())
    cmd = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []),
           "-m", "bench.serve", "--", "--policies", str(POLICIES), "--redis-url", redis_url,
           "--listen", f"127.0.0.1:{w.port}", "--metrics-port", "0",
           "--store-timeout", "0.1", "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(w.src))
    with log.open("wb") as out:
        w.proc = subprocess.Popen(cmd, cwd=w.src, stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "gRPC listening on" not in log.read_text(errors="replace"):
            if w.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{label} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield w
    finally:
        w.proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        try:
            w.proc.wait(30)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


async def drive(port: int, bodies: Sequence[bytes], concurrency: int, empty: bool
                ) -> dict[str, int]:
    """Send every body (or as many empty calls); outcomes by kind."""
    outcomes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        one: Callable[[bytes], Awaitable[str]]
        if empty:
            health = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest()

            async def empty_call(_: bytes) -> str:
                r = await health.Check(req, timeout=DEADLINE_S)
                return "SERVING" if r.status == 1 else "NOT_SERVING"
            one = empty_call
        else:
            call = channel.unary_unary(f"/{et.AUTHZ_SERVICE}/Check",
                                       request_serializer=None,
                                       response_deserializer=et.auth.CheckResponse.FromString)

            async def check(raw: bytes) -> str:
                r = await call(raw, timeout=DEADLINE_S)
                if r.WhichOneof("http_response") == "ok_response":
                    return "ok"
                return str(r.denied_response.status.code)
            one = check

        queue = iter(bodies)

        async def lane() -> None:
            for raw in queue:
                try:
                    kind = await one(raw)
                except grpc.aio.AioRpcError as exc:
                    kind = exc.code().name
                outcomes[kind] = outcomes.get(kind, 0) + 1

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return outcomes


def measure(w: Worker, bodies: Sequence[bytes], concurrency: int, empty: bool,
            strict: bool = True) -> float:
    """CPU µs per call of the worker over one batch."""
    before = w.cpu()
    outcomes = asyncio.run(drive(w.port, bodies, concurrency, empty))
    used = w.cpu() - before
    expected = {"SERVING"} if empty else {"ok", "429"}
    if strict and set(outcomes) - expected:
        raise BenchError(f"{w.label}: unexpected outcomes {outcomes}")
    return used / len(bodies) * 1e6


async def in_process(redis_url: str, warm: Sequence[bytes], bodies: Sequence[bytes],
                     concurrency: int, canned: bool) -> tuple[float, dict[str, int]]:
    """CPU µs per Check of the servicer in this process (no gRPC), and the outcomes."""
    from keel_pdp.budget.store import BudgetStore
    from keel_pdp.engine import Engine
    from keel_pdp.mesh.authz import AuthorizationServicer
    from keel_pdp.mesh.config import MeshConfig
    from keel_pdp.mesh.metrics import MeshMetrics
    from keel_pdp.metrics import Metrics
    from keel_pdp.policy.reload import PolicyHolder

    holder = PolicyHolder(str(POLICIES))
    holder.reload(force=True)
    store = BudgetStore.from_url(redis_url, timeout_s=0.1)
    engine = Engine(holder, store, Metrics())
    servicer = AuthorizationServicer(engine, MeshMetrics(Metrics()), MeshConfig())
    requests = [et.auth.CheckRequest.FromString(raw) for raw in bodies]
    warm_requests = [et.auth.CheckRequest.FromString(raw) for raw in warm]
    if canned:  # one real answer per tenant kind, then served from here
        answers: dict[bool, Any] = {}
        real = engine.authorize

        async def authorize(inp: Any, deadline_s: float | None = None) -> Any:
            key = inp.tenant == DENIED_TENANT
            if key not in answers:
                answers[key] = await real(inp, deadline_s)
            return answers[key]

        engine.authorize = authorize  # type: ignore[method-assign,assignment]
    outcomes: dict[str, int] = {}

    async def lane() -> None:
        for req in queue:
            r = await servicer.check(req, DEADLINE_S)
            kind = ("ok" if r.WhichOneof("http_response") == "ok_response"
                    else str(r.denied_response.status.code))
            outcomes[kind] = outcomes.get(kind, 0) + 1

    queue = iter(warm_requests)
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    outcomes.clear()
    queue = iter(requests)
    t0 = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    used = time.process_time() - t0
    await store.close()
    return used / len(requests) * 1e6, outcomes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_check_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="Checks per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=50, help="calls in flight")
    ap.add_argument("--baseline-src", type=pathlib.Path, default=None,
                    help="a source tree whose worker is measured alongside (the before)")
    ap.add_argument("--profile", default="", help="write this tree's worker's cProfile here")
    ap.add_argument("--in-process", action="store_true",
                    help="also run the Checks in this process, without gRPC")
    ns = ap.parse_args(argv)
    work = new_workdir()
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    try:
        with contextlib.ExitStack() as stack:
            workers = [stack.enter_context(worker("this tree", ROOT, redis_server.url,
                                                  work / "keel.log", ns.profile))]
            if ns.baseline_src is not None:
                workers.append(stack.enter_context(worker(
                    f"baseline ({ns.baseline_src})", ns.baseline_src, redis_server.url,
                    work / "baseline.log")))
            serial = 0

            def batch(n: int) -> list[bytes]:
                nonlocal serial
                serial += 1
                return [check_request(i, f"r{os.getpid()}x{serial}") for i in range(n)]

            for w in workers:  # warm up: imports, caches, connections
                measure(w, batch(min(500, ns.calls)), ns.concurrency, False, strict=False)
                measure(w, batch(200), ns.concurrency, True, strict=False)
            empties = [b"" for _ in range(ns.calls)]
            for r in range(ns.rounds):
                for w in workers if r % 2 == 0 else workers[::-1]:
                    w.check_us.append(measure(w, batch(ns.calls), ns.concurrency, False))
                    w.empty_us.append(measure(w, empties, ns.concurrency, True))
            print(f"{ns.calls} Checks x {ns.rounds} rounds, {ns.concurrency} in flight; "
                  "CPU of the worker per call (median of rounds)")
            print(f"{'worker':<40} {'Check µs':>9} {'empty µs':>9} {'Check/empty':>12}")
            med: dict[str, float] = {}
            for w in workers:
                c, e = sorted(w.check_us)[len(w.check_us) // 2], \
                    sorted(w.empty_us)[len(w.empty_us) // 2]
                med[w.label] = c
                print(f"{w.label:<40} {c:9.0f} {e:9.0f} {c / e:12.2f}   "
                      f"rounds: {' '.join(f'{x:.0f}' for x in w.check_us)}")
            if len(workers) == 2:
                a, b = (med[w.label] for w in workers)
                print(f"Check CPU, this tree / baseline: {a / b:.2f}")
            if ns.in_process:
                import uvloop

                for label, canned in (("in-process Check (engine, Redis)", False),
                                      ("in-process, engine answer canned", True)):
                    us, outcomes = uvloop.run(in_process(
                        redis_server.url, batch(min(500, ns.calls)), batch(ns.calls),
                        ns.concurrency, canned))
                    if set(outcomes) - {"ok", "429"}:
                        raise BenchError(f"{label}: unexpected outcomes {outcomes}")
                    print(f"{label:<40} {us:9.0f}")
    finally:
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
