"""Where an Authorize spends its CPU, without gRPC: the engine driven in-process.

    python -m bench.profile_engine [--calls 20000] [--client resp|redis-py] [--top 30]
                                   [--method authorize|closeout]

Starts a redis-server of its own, builds the engine as ``keel-pdp serve`` does
(bench/policies/generous, the chosen Redis client), runs Authorize calls 32 at
a time on uvloop and prints the CPU per call of the whole engine path, then a
cProfile of the same run sorted by own time. The gRPC floor (Noop) costs
about 100 us of event-loop CPU per call on these machines: whatever this
prints per call comes on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pathlib
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence

import uvloop

from bench.harness import POLICIES, RedisServer
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage


async def drive(engine: Engine, calls: int, tag: str, concurrency: int = 32,
                method: str = "authorize") -> float:
    """CPU per call of ``method``; for closeout, of settling permits that
    untimed Authorize calls made first."""
    reqs = [AuthorizeInput(f"{tag}-{i}", f"t{i % 100:05d}", ("chat", "search")[i % 2],
                           "gpt-4o-mini", "openai", 800 + i % 400, 256,
                           (("team", "bench"),)) for i in range(calls)]
    permits: list[str] = []
    started = time.process_time()
    for i in range(0, calls, concurrency):
        outs = await asyncio.gather(*(engine.authorize(r) for r in reqs[i:i + concurrency]))
        permits.extend(o.permit_id for o in outs)
    if method == "authorize":
        return (time.process_time() - started) / calls * 1e6
    usage = TokenUsage(input_tokens=900, cached_input_tokens=100, output_tokens=180)
    started = time.process_time()
    for i in range(0, calls, concurrency):
        await asyncio.gather(*(engine.closeout(p, usage, "SUCCEEDED", None)
                               for p in permits[i:i + concurrency]))
    return (time.process_time() - started) / calls * 1e6


async def main_async(calls: int, client: str, top: int, method: str) -> None:
    with tempfile.TemporaryDirectory(prefix="keel-profile-") as d, \
            RedisServer(pathlib.Path(d)) as server:
        store = BudgetStore.from_url(server.url, timeout_s=1.0, client=client)
        holder = PolicyHolder(str(POLICIES / "generous"))
        holder.reload(force=True)
        engine = Engine(holder, store, Metrics())
        await drive(engine, 2000, "warm", method=method)
        plain = await drive(engine, calls, "plain", method=method)
        if method == "closeout":  # the Authorize calls that make the permits stay unprofiled
            reqs = [AuthorizeInput(f"profiled-{i}", f"t{i % 100:05d}", "chat", "gpt-4o-mini",
                                   "openai", 800, 256) for i in range(calls)]
            permits = [(await engine.authorize(r)).permit_id for r in reqs]
            usage = TokenUsage(input_tokens=900, cached_input_tokens=100, output_tokens=180)
        prof = cProfile.Profile(time.process_time)  # CPU, not wall: the machine is shared
        prof.enable()
        if method == "closeout":
            for i in range(0, calls, 32):
                await asyncio.gather(*(engine.closeout(p, usage, "SUCCEEDED", None)
                                       for p in permits[i:i + 32]))
        else:
            await drive(engine, calls, "profiled")
        prof.disable()
        await store.close()
    print(f"engine.{method} + store ({client}): {plain:.0f} us of CPU per call "
          f"(process CPU / calls, 32 concurrent, {calls} calls, no gRPC)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--client", choices=("resp", "redis-py"), default="resp")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--method", choices=("authorize", "closeout"), default="authorize")
    ns = ap.parse_args(argv)
    uvloop.run(main_async(ns.calls, ns.client, ns.top, ns.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
