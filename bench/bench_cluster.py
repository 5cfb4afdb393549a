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

Two more sections (``--only durability,hot``; ``python -m bench.run_all --only
cluster`` runs both):

* durability: the cost of ``--wait-replicas 1``. A Keel-like write script (one
  hash field, one stream entry) under the ``{pdp}`` tag, with and without
  ``WAIT 1`` pipelined behind it on the same connection, interleaved in this
  run: latency at one call at a time (p50, p99) and calls/s at 64 concurrent
  calls. The baseline is the same script without WAIT.
* hot: where Keel's real Authorize lands. 10,000 real Authorize calls through
  the engine and ``BudgetStore.from_url(redis+cluster://...)`` for 1,000
  tenants (an organisation-wide budget, one per tenant, one per tenant and
  workload), first with every key under one tag (``--key-shards 1``), then with
  the default 64 shards, each from empty leases ("cold") and then 10,000 more
  on the leases grown ("steady"); INFO commandstats of every master: script calls per
  master, busiest/idlest (by tenant placement and over all scripts), Redis time
  per script, the fleet's ceiling for 1, 3, 6 and 12 masters derived from them,
  escrow refills per Authorize and the headroom left in leases at the end.
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

from bench.harness import Context, RedisServer, Row, median
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


# ------------------------------------------------------------------ durability
WRITE = """
redis.call('HINCRBY', KEYS[1], 'h', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'd', ARGV[2])
return 1
"""
PAYLOAD = "x" * 600  # about what a decision event carries


async def _writes(client: ClusterClient, wait: bool, concurrency: int,
                  seconds: float) -> tuple[list[float], float, int]:
    """Per-call latencies (us), calls/s and short WAITs of the write script."""
    script = client.script(WRITE)
    keys = ["keel:{pdp}:b:bench", "keel:{pdp}:events-bench"]
    await client.eval_script(script, keys, [1, PAYLOAD], 5.0)  # connect, map, load
    lat: list[float] = []
    short = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal short
        while time.monotonic() < stop:
            t = time.perf_counter()
            if wait:
                _, acked = await client.eval_script_wait(script, keys, [1, PAYLOAD], 2.0,
                                                         None, 1, 100)
                short += acked < 1
            else:
                await client.eval_script(script, keys, [1, PAYLOAD], 2.0)
            lat.append((time.perf_counter() - t) * 1e6)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, len(lat) / (time.monotonic() - began), short


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def durability_rows(cluster: RedisCluster, rounds: int, seconds: float) -> list[Row]:
    got: dict[tuple[bool, int], list[tuple[list[float], float, int]]] = {}
    for _ in range(rounds):
        for concurrency in (1, CONCURRENCY):
            for wait in (False, True):
                async def one(wait: bool = wait, c: int = concurrency
                              ) -> tuple[list[float], float, int]:
                    client = ClusterClient.from_url(cluster.url)
                    try:
                        return await _writes(client, wait, c, seconds)
                    finally:
                        await client.close()
                got.setdefault((wait, concurrency), []).append(uvloop.run(one()))
    rows = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        base = median([_percentile(r[0], q) for r in got[(False, 1)]])
        with_wait = median([_percentile(r[0], q) for r in got[(True, 1)]])
        rows.append(Row("cluster", f"write script latency {label}, one call at a time",
                        base, "us", 1.0, "no WAIT"))
        rows.append(Row("cluster", f"write script + WAIT 1 latency {label}, one call at a "
                        "time", with_wait, "us", with_wait / base, "no WAIT"))
    base_rps = median([r[1] for r in got[(False, CONCURRENCY)]])
    wait_rps = median([r[1] for r in got[(True, CONCURRENCY)]])
    short = sum(r[2] for k, v in got.items() if k[0] for r in v)
    rows.append(Row("cluster", f"write script calls/s, {CONCURRENCY} concurrent", base_rps,
                    "calls/s", 1.0, "no WAIT"))
    rows.append(Row("cluster", f"write script + WAIT 1 calls/s, {CONCURRENCY} concurrent",
                    wait_rps, "calls/s", wait_rps / base_rps, "no WAIT",
                    f"one pipelined connection per master; a WAIT holds the calls behind it "
                    f"until the replica acknowledges; {short} WAIT(s) short of 1 replica"))
    return rows


def authorize_wait_rows(cluster: RedisCluster, work: pathlib.Path, calls: int,
                        rounds: int) -> list[Row]:
    """Real Authorize calls one at a time through the engine and the cluster store,
    with ``wait_replicas`` 0 and 1 in interleaved rounds: what a caller waits."""
    from keel_pdp.budget.store import BudgetStore
    from keel_pdp.decision import AuthorizeInput
    from keel_pdp.engine import Engine
    from keel_pdp.metrics import Metrics
    from keel_pdp.policy.loader import load_bundle
    from keel_pdp.policy.reload import PolicyHolder
    from tests.helpers import budget, write_bundle

    bundle = write_bundle(work / "wait-bundle", [
        budget("org-daily", "1000000.00"), budget("per-tenant", "10000.00", per=["tenant"])])
    lat: dict[int, list[list[float]]] = {0: [], 1: []}
    short = 0

    async def one(wait: int, r: int) -> list[float]:
        nonlocal short
        holder = PolicyHolder(bundle)
        holder.set(load_bundle(bundle))
        store = BudgetStore.from_url(cluster.url, prefix=f"aw{wait}", timeout_s=0.5,
                                     wait_replicas=wait)
        engine = Engine(holder, store, Metrics())
        out = []
        try:
            await engine.authorize(AuthorizeInput(f"warm-{r}", "t-0", "chat", "gpt-4o-mini",
                                                  "openai", 200, 50))
            for i in range(calls):
                t = time.perf_counter()
                await engine.authorize(AuthorizeInput(
                    f"a-{r}-{i}", f"t-{i % 100}", "chat", "gpt-4o-mini", "openai", 200, 50))
                out.append((time.perf_counter() - t) * 1e6)
            short += store.short_waits
        finally:
            await store.close()
        return out

    for r in range(rounds):
        for wait in (0, 1):
            lat[wait].append(uvloop.run(one(wait, r)))
    rows = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        base = median([_percentile(x, q) for x in lat[0]])
        with_wait = median([_percentile(x, q) for x in lat[1]])
        rows.append(Row("cluster", f"Authorize (engine + store) {label}, one at a time", base,
                        "us", 1.0, "no WAIT"))
        rows.append(Row("cluster", f"Authorize --wait-replicas 1 {label}, one at a time",
                        with_wait, "us", with_wait / base, "no WAIT",
                        f"{short} short WAIT(s)" if label == "p99" else ""))
    return rows


# ------------------------------------------------------------------ hot slot
def _commandstats(cluster: RedisCluster) -> dict[int, tuple[int, float]]:
    out = {}
    for port in cluster.masters():
        stats = cluster.admin(port).info("commandstats").get("cmdstat_evalsha", {})
        out[port] = (int(stats.get("calls", 0)), float(stats.get("usec_per_call", 0.0)))
    return out


def _hot_drive(cluster: RedisCluster, bundle: pathlib.Path, calls: int, shards: int,
               prefix: str) -> dict[str, Any]:
    """Two phases of ``calls`` real Authorize calls for 1,000 tenants through the
    cluster store with ``shards`` key shards: "cold" from empty leases, then
    "steady" on the leases the first phase grew. Per phase: the masters'
    commandstats and the escrow refills; at the end, the leases' figures."""
    from keel_pdp.budget.store import BudgetStore
    from keel_pdp.decision import AuthorizeInput
    from keel_pdp.engine import Engine
    from keel_pdp.metrics import Metrics
    from keel_pdp.policy.loader import load_bundle
    from keel_pdp.policy.reload import PolicyHolder

    out: dict[str, Any] = {}

    async def drive() -> None:
        holder = PolicyHolder(bundle)
        holder.set(load_bundle(bundle))
        store = BudgetStore.from_url(cluster.url, prefix=prefix, timeout_s=2.0, shards=shards)
        engine = Engine(holder, store, Metrics())
        try:
            await engine.authorize(AuthorizeInput("warm", "t-0", "chat", "gpt-4o-mini",
                                                  "openai", 200, 50))
            for phase in ("cold", "steady"):
                for port in cluster.masters():
                    cluster.cmd(port, "CONFIG", "RESETSTAT")
                before = engine.escrow.refills

                async def worker(w: int, phase: str = phase) -> None:
                    for i in range(w, calls, 16):
                        await engine.authorize(AuthorizeInput(
                            f"{phase}-{i}", f"t-{i % 1000}", "chat", "gpt-4o-mini", "openai",
                            200, 50))

                await asyncio.gather(*(worker(w) for w in range(16)))
                out[phase] = {"refills": engine.escrow.refills - before,
                              "stats": _commandstats(cluster)}
        finally:
            await store.close()

    uvloop.run(drive())
    leased = unused = 0
    for port in cluster.masters():
        for key in cluster.admin(port).scan_iter(f"{prefix}:*:l:*"):
            g, st, h = (int(x or 0) for x in cluster.admin(port).hmget(key, "g", "s", "h"))
            leased += g
            unused += g - st - h
    out["leased"], out["unused"] = leased, unused
    return out


def hot_rows(cluster: RedisCluster, work: pathlib.Path, calls: int) -> list[Row]:
    """Real Authorize calls for 1,000 tenants through the cluster store, with every
    key under one tag (``--key-shards 1``) and with the default 64 shards: which
    masters run them, the Redis time of each, the fleet's ceiling per master
    count, and what escrow costs the shared (organisation-wide) budget, from cold
    (empty leases) and in steady state (a second run of as many calls)."""
    from keel_pdp.budget.keys import KeySpace
    from keel_pdp.budget.store import DEFAULT_CLUSTER_SHARDS
    from tests.helpers import budget, write_bundle

    bundle = write_bundle(work / "hot-bundle", [
        budget("org-daily", "1000000.00"), budget("per-tenant", "10000.00", per=["tenant"]),
        budget("per-workload", "10000.00", per=["tenant", "workload"])])
    rows: list[Row] = []
    for shards in (1, DEFAULT_CLUSTER_SHARDS):
        esc = _hot_drive(cluster, bundle, calls, shards, f"hot{shards}")
        label = "one tag ({pdp})" if shards == 1 else f"{shards} shards"
        if shards == 1:
            stats = esc["steady"]["stats"]
            per_master = sorted((c for c, _ in stats.values()), reverse=True)
            usec = max(u for c, u in stats.values() if c == per_master[0])
            rows.append(Row("cluster", f"{label}: EVALSHA per master, 1,000 tenants",
                            float(per_master[0]), "calls", None, "",
                            f"all masters: {per_master}"))
            rows.append(Row("cluster", f"{label}: ceiling of the fleet = one master",
                            1e6 / usec if usec else 0.0, "Authorize/s", None, "",
                            f"1e6 / {usec:.1f} us per script (commandstats): one Redis "
                            "core, whatever the number of masters"))
            continue
        ks = KeySpace(f"hot{shards}", shards)
        owner_of = [cluster.owner(key_slot(stream)) for stream in ks.streams]
        placed: Counter[int] = Counter(owner_of[ks.tenant_shard(f"t-{i % 1000}")]
                                       for i in range(calls))
        by_tenant = sorted(placed.values(), reverse=True)
        rows.append(Row("cluster", f"{label}: Authorize calls per master (tenants' shards)",
                        by_tenant[0] / by_tenant[-1], "x busiest/idlest", None, "",
                        f"per master: {by_tenant} (where the cluster puts each tenant's "
                        "shard)"))
        for phase in ("cold", "steady"):
            stats = esc[phase]["stats"]
            per_master = sorted((c for c, _ in stats.values()), reverse=True)
            total = sum(per_master)
            busiest_calls = per_master[0]
            usec = max(u for c, u in stats.values() if c == busiest_calls)
            what = ("from empty leases" if phase == "cold"
                    else f"the next {calls:,} calls, on the leases grown")
            rows.append(Row("cluster", f"{label}, {phase}: EVALSHA per master", float(
                busiest_calls), "calls", None, "", f"all masters: {per_master} ({what})"))
            spread = per_master[0] / per_master[-1] if per_master[-1] else float("inf")
            rows.append(Row("cluster", f"{label}, {phase}: busiest / idlest master", spread,
                            "x", None, "", "script calls (Authorize and escrow) per master"))
            rows.append(Row("cluster", f"{label}, {phase}: escrow refills per Authorize",
                            esc[phase]["refills"] / calls, "refills", None, "",
                            f"{esc[phase]['refills']} refills (3 more round trips each) in "
                            f"{calls} calls, org-wide budget shared by 1,000 tenants"))
            if phase == "cold":
                continue
            share = busiest_calls / total
            per_call = total / calls  # script calls per Authorize (escrow steps included)
            for masters in (1, 3, 6, 12):
                # The busiest master saturates first. Its share of the script calls was
                # measured on 3 masters; with m masters it is taken as 3/m of that.
                busiest = min(1.0, share * 3 / masters)
                rows.append(Row("cluster", f"{label}: fleet ceiling with {masters} master(s)",
                                1e6 / (usec * per_call * busiest), "Authorize/s", None, "",
                                f"1e6 / ({usec:.1f} us x {per_call:.3f} scripts per "
                                f"Authorize x busiest share {busiest:.3f}), steady phase"))
        cap = 1_000_000 * 1_000_000
        rows.append(Row("cluster", f"{label}: headroom in leases, not held, at the end",
                        100.0 * esc["unused"] / cap, "% of cap", None, "",
                        f"{esc['unused']} micro-USD of {esc['leased']} leased; given back "
                        "when idle; stranded only if the window ends first"))
    return rows


def run(ctx: Context) -> list[Row]:
    """run_all's section: durability (WAIT) and the hot slot, on one fixture cluster."""
    cluster = start_cluster(ctx.path("cluster"))
    try:
        rows = durability_rows(cluster, ctx.rounds, ctx.duration_s)
        rows.extend(authorize_wait_rows(cluster, ctx.work, 300 if ctx.quick else 2000,
                                        ctx.rounds))
        rows.extend(hot_rows(cluster, ctx.work, 1000 if ctx.quick else 10000))
        return rows
    finally:
        cluster.stop()


def _print_rows(rows: Sequence[Row]) -> None:
    for r in rows:
        ratio = "" if r.ratio is None else f"  {r.ratio:.2f}x {r.baseline}"
        digits = 4 if abs(r.value) < 10 else 1  # ratios and per-call figures in full
        print(f"{r.name:<62}{r.value:>12,.{digits}f} {r.unit}{ratio}")
        if r.note:
            print(f"    {r.note}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s")
    ap.add_argument("--resp-before", metavar="REV",
                    help="also measure RespClient as it was at this git revision")
    ap.add_argument("--only", default="client,durability,hot",
                    help="sections: client (the client's cost, tag spread), durability "
                         "(WAIT), hot (where Authorize lands)")
    ns = ap.parse_args(argv)
    rounds, seconds = (1, 1.0) if ns.quick else (ns.rounds, ns.duration)
    only = set(ns.only.split(","))
    if only - {"client", "durability", "hot"}:
        ap.error(f"unknown section(s) in --only {ns.only!r}")
    if "client" not in only:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as d:
            cluster = start_cluster(pathlib.Path(d) / "cluster")
            try:
                rows = durability_rows(cluster, rounds, seconds) if "durability" in only \
                    else []
                if "durability" in only:
                    rows += authorize_wait_rows(cluster, pathlib.Path(d),
                                                300 if ns.quick else 2000, rounds)
                if "hot" in only:
                    rows += hot_rows(cluster, pathlib.Path(d), 1000 if ns.quick else 10000)
            finally:
                cluster.stop()
        _print_rows(rows)
        return 0
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
            extra = durability_rows(cluster, rounds, seconds) if "durability" in only else []
            if "durability" in only:
                extra += authorize_wait_rows(cluster, work, 300 if ns.quick else 2000, rounds)
            if "hot" in only:
                extra += hot_rows(cluster, work, 1000 if ns.quick else 10000)
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
    _print_rows(extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
