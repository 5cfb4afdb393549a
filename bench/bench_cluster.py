"""What Redis Cluster costs the client, and how 1,000 tenants' tags spread.

    python -m bench.bench_cluster                      # ~1 minute on 2 cores
    python -m bench.bench_cluster --quick
    python -m bench.bench_cluster --resp-before <git revision>

Started here: one standalone ``redis-server`` and a 3-master + 3-replica local
cluster (as tests/integration/cluster_fixture.py starts it). Measured in
interleaved rounds of this run, each at 64 concurrent calls of a script with
ten keys (Keel's Authorize shape, one hash tag per call):

* baseline: ``RespClient`` against the standalone Redis;
* ``ClusterClient`` with every call under one tag (today's ``{pdp}`` layout);
* ``ClusterClient`` with calls spread over 1,000 tags (a tag per tenant);
* with ``--resp-before REV``: ``RespClient`` as it was at REV (loaded from git),
  to show the single-node client did not get slower.

Figures: calls/s and the client's CPU per call (this process only; Redis runs
elsewhere), each as a ratio to the baseline; EVALSHA calls per master for the
spread run (busiest / idlest, from INFO commandstats); and how 1,000 tenant tags
fall on the three masters' slots.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import uvloop

from bench.harness import RedisServer, median
from keel_pdp.budget.cluster import ClusterClient, call_slot, key_slot
from keel_pdp.budget.resp import RespClient, Shared
from tests.integration.cluster_fixture import RedisCluster, start_cluster

SCRIPT = """
local n = 0
for i, k in ipairs(KEYS) do n = n + #k end
return n
"""
CONCURRENCY = 64
TAGS = 1000


def shape(tag: str) -> tuple[list[str], Shared]:
    own = [f"keel:{{{tag}}}:req:r", f"keel:{{{tag}}}:permit:p", f"keel:{{{tag}}}:expiries",
           f"keel:{{{tag}}}:events"]
    shared = Shared.of([f"keel:{{{tag}}}:b:budget{i}:1:x:1700000000000" for i in range(6)],
                       [6, 1000000, 1, 1800000000, "80,100"])
    return own, shared


async def _drive(client: Any, tags: Sequence[str], seconds: float) -> tuple[float, float]:
    """Calls/s and client CPU microseconds per call over ``seconds``."""
    script = client.script(SCRIPT)
    shapes = [shape(t) for t in tags]
    stop = time.monotonic() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.monotonic() < stop:
            own, shared = shapes[i % len(shapes)]
            await client.eval_script(script, own, ["a", "b"], 2.0, shared)
            done += 1
            i += CONCURRENCY

    for own, shared in shapes[:CONCURRENCY]:  # connect, read the map, load the script
        await client.eval_script(script, own, ["a"], 5.0, shared)
    done = 0
    cpu, wall = time.process_time(), time.monotonic()
    stop = wall + seconds
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return done / wall, cpu / max(done, 1) * 1e6


def _old_resp(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:keel_pdp/budget/resp.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("keel_resp_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:keel_pdp/budget/resp.py", "exec"), module.__dict__)
    return module


def _evalsha_calls(cluster: RedisCluster) -> dict[int, int]:
    out = {}
    for port in cluster.masters():
        stats = cluster.admin(port).info("commandstats")
        out[port] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return out


def _routing_us(tags: Sequence[str], n: int = 20000) -> tuple[float, float]:
    """Microseconds to find a call's slot: all 10 keys hashed, and as the client
    does it (4 own keys; the shape's 6 shared keys' slot remembered per shape)."""
    shapes = [shape(t) for t in tags]
    started = time.perf_counter()
    for i in range(n):
        own, shared = shapes[i % len(shapes)]
        call_slot([*own, *shared.keys])
    whole = (time.perf_counter() - started) / n * 1e6
    client = ClusterClient.from_url("redis+cluster://127.0.0.1:1")
    started = time.perf_counter()
    for i in range(n):
        own, shared = shapes[i % len(shapes)]
        client._slot_of(own, shared)
    return whole, (time.perf_counter() - started) / n * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s")
    ap.add_argument("--resp-before", metavar="REV",
                    help="also measure RespClient as it was at this git revision")
    ns = ap.parse_args(argv)
    rounds, seconds = (1, 1.0) if ns.quick else (ns.rounds, ns.duration)
    tags = [f"tenant-{i}" for i in range(TAGS)]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as d:
        work = pathlib.Path(d)
        single = RedisServer(work / "single")
        single.start()
        cluster = start_cluster(work / "cluster")
        try:
            runs: dict[str, Callable[[], Any]] = {
                "resp": lambda: RespClient.from_url(single.url),
                "cluster-one-tag": lambda: ClusterClient.from_url(cluster.url),
                "cluster-1000-tags": lambda: ClusterClient.from_url(cluster.url),
            }
            if ns.resp_before:
                old = _old_resp(ns.resp_before)
                runs["resp-before"] = lambda: old.RespClient.from_url(single.url)
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
            per_master: Counter[int] = Counter()

            async def one(name: str) -> tuple[float, float]:
                client = runs[name]()
                try:
                    return await _drive(client, tags if name == "cluster-1000-tags" else
                                        ["pdp"], seconds)
                finally:
                    await client.close()

            for _ in range(rounds):
                for name in runs:
                    before = _evalsha_calls(cluster)
                    samples[name].append(uvloop.run(one(name)))
                    if name == "cluster-1000-tags":
                        after = _evalsha_calls(cluster)
                        per_master.update({p: after[p] - before.get(p, 0) for p in after})
            owners = Counter(cluster.owner(key_slot(t)) for t in tags)
        finally:
            cluster.stop()
            single.stop()
    base_rps = median([s[0] for s in samples["resp"]])
    base_cpu = median([s[1] for s in samples["resp"]])
    print(f"{'client':<20}{'calls/s':>10}{'ratio':>8}{'CPU us/call':>13}{'ratio':>8}")
    for name, got in samples.items():
        rps, cpu = median([s[0] for s in got]), median([s[1] for s in got])
        print(f"{name:<20}{rps:>10,.0f}{rps / base_rps:>7.2f}x{cpu:>13.1f}"
              f"{cpu / base_cpu:>7.2f}x")
    print(f"(median of {rounds} round(s) of {seconds:g} s, {CONCURRENCY} concurrent calls, "
          f"10 keys per call; ratios against 'resp' on a standalone Redis in this run)")
    whole, cached = _routing_us(tags)
    print(f"slot of a call's 10 keys: {whole:.2f} us; as the client finds it (shape's "
          f"slot remembered): {cached:.2f} us")
    calls = [int(per_master[p]) for p in sorted(per_master)]
    idlest = min(calls, default=0)
    if idlest:
        print(f"EVALSHA per master, 1,000 tags: {calls} -> busiest/idlest "
              f"{max(calls) / idlest:.3f}")
    tag_counts = [owners[p] for p in sorted(owners)]
    print(f"tenant tags per master's slots: {tag_counts} -> busiest/idlest "
          f"{max(tag_counts) / min(tag_counts):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
