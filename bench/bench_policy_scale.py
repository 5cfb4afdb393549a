"""Decision cost as the policy bundle grows: 10,000 tenants x 5 budgets vs 10 tenants.

Times the in-process part of Authorize, everything but the Redis round trip
(matching, pricing, planning, the decision event, the hold script's call as
sent on the wire), on both bundles in the same run, alternating rounds, and prints the
ratio (target: at most 1.2).

    python -m bench.bench_policy_scale [--tenants 10000] [--rounds 7]

As a section of ``python -m bench.run_all`` (``--only policy_scale``) it also
measures the whole decision as a caller sees it: two sidecars, one serving each
bundle, Authorize over gRPC with the traffic spread over every tenant of its
bundle, interleaved rounds; the ratio of calls/s and of event-loop CPU per call.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
import yaml

from bench.bench_throughput import Runner
from bench.harness import Context, Row, Sample, Sidecar, Workload, median, spread
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.resp import pack_evalsha
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, ShapeCache, plan
from keel_pdp.engine import Engine
from keel_pdp.events import decision_data
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.policy.snapshot import PolicySnapshot

PRICES = {"openai": {"gpt-4.1": {"input": "2.00", "output": "8.00"},
                     "gpt-4o-mini": {"input": "0.15", "output": "0.60"}}}


class _NoCache(dict[object, object]):
    def __setitem__(self, key: object, value: object) -> None:
        pass


def make_bundle(directory: pathlib.Path, tenants: int, scale: int = 1) -> PolicySnapshot:
    """``scale`` multiplies every cap (the gRPC runs must never reach one)."""
    write_bundle(directory, tenants, scale)
    return load_bundle(directory)


def _dump(value: object) -> str:
    return yaml.dump(value, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


def write_bundle(directory: pathlib.Path, tenants: int, scale: int = 1) -> None:
    directory.mkdir(parents=True)
    (directory / "bundle.yaml").write_text(_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Bundle", "revision": f"t{tenants}"}))
    (directory / "prices.yaml").write_text(_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "PriceTable", "revision": "p",
         "providers": PRICES}))
    budgets = []
    for t in range(tenants):
        name = f"tenant-{t:05d}"
        budgets += [
            {"id": f"{name}-m", "scope": {"tenant": name}, "window": "monthly",
             "cap_usd": str(1000 * scale)},
            {"id": f"{name}-d", "scope": {"tenant": name}, "window": "daily",
             "cap_usd": str(100 * scale)},
            {"id": f"{name}-chat", "scope": {"tenant": name, "workload": "chat"},
             "window": "hourly", "cap_usd": str(10 * scale)},
            {"id": f"{name}-batch", "scope": {"tenant": name, "workload": "batch"},
             "window": "daily", "cap_usd": str(50 * scale)},
            {"id": f"{name}-premium", "scope": {"tenant": name, "model": "gpt-4.1"},
             "window": "daily", "cap_usd": str(20 * scale)},
        ]
    (directory / "budgets.yaml").write_text(_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Budgets", "budgets": budgets}))


def make_engine() -> Engine:
    """An engine whose store never connects: only its key and argument building runs."""
    store = BudgetStore(aioredis.Redis(), KeySpace("keel"))
    return Engine(PolicyHolder("."), store, Metrics())


ENGINE = make_engine()  # one, as in a sidecar: its key space stays the same
SHA = "0" * 40


def time_decisions(snap: PolicySnapshot, tenants: int, n: int, seed: int,
                   cold: bool = False) -> float:
    """Seconds per decision; ``cold`` turns the match and shape caches off, so
    every request is matched from the index and its shape built (as the first
    time a sidecar sees a request shape)."""
    if cold or isinstance(snap._match_cache, _NoCache):
        object.__setattr__(snap, "_match_cache", _NoCache() if cold else {})
    shapes = ShapeCache()
    if cold:
        shapes.shapes = _NoCache()  # type: ignore[assignment]
        shapes.snapshot = snap
    store = ENGINE.store
    rng = random.Random(seed)
    reqs = [AuthorizeInput(f"r{i}", f"tenant-{rng.randrange(tenants):05d}",
                           rng.choice(("chat", "batch")), rng.choice(("gpt-4.1", "gpt-4o-mini")),
                           "openai", 1000, 500) for i in range(n)]
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    for r in reqs:
        p = plan(snap, r, now, ENGINE.ids.new(now), shapes)
        hold, _, _ = ENGINE.prepare_hold(p, decision_data(p))
        keys, args = store.hold_call(hold)
        pack_evalsha(SHA, keys, args, hold.shape)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decisions", type=int, default=20_000)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        small = make_bundle(pathlib.Path(d) / "small", 10)
        large = make_bundle(pathlib.Path(d) / "large", ns.tenants)
        load_s = time.perf_counter() - t0
    print(f"bundle sizes: {len(small.budgets)} vs {len(large.budgets)} budgets "
          f"(built and loaded in {load_s:.1f} s)")
    for label, cold in (("warm (request shapes seen before)", False),
                        ("cold (match cache off)", True)):
        report(label, small, large, ns, cold)


def report(label: str, small: PolicySnapshot, large: PolicySnapshot, ns: argparse.Namespace,
           cold: bool) -> None:
    small_t, large_t, narrow_t = [], [], []
    for _ in range(ns.rounds):
        # The same requests in every round: round 0 also warms the caches.
        small_t.append(time_decisions(small, 10, ns.decisions, 0, cold))
        large_t.append(time_decisions(large, ns.tenants, ns.decisions, 0, cold))
        # The large bundle with traffic from 10 tenants only: separates the cost
        # of the bundle's size from the cost of traffic spread over many tenants
        # (CPU cache misses on a wider working set).
        narrow_t.append(time_decisions(large, 10, ns.decisions, 0, cold))
    # The minimum of alternating rounds is the least disturbed by other load on
    # the machine; the median is printed next to it.
    s, lg = min(small_t), min(large_t)
    sm, lm = statistics.median(small_t), statistics.median(large_t)
    print(f"{label}: decision (everything but the Redis call), best of {ns.rounds} rounds: "
          f"10 tenants {s * 1e6:.1f} us, {ns.tenants} tenants {lg * 1e6:.1f} us "
          f"(medians {sm * 1e6:.1f} / {lm * 1e6:.1f} us)")
    print(f"ratio large/small: {lg / s:.3f} (median ratio {lm / sm:.3f}; target <= 1.2)")
    nw = min(narrow_t)
    print(f"  same large bundle, traffic from 10 tenants only: {nw * 1e6:.1f} us, "
          f"ratio {nw / s:.3f} (the bundle's size alone)")


# ------------------------------------------------------------ run_all section
SECTION = "policy_scale"


@dataclass
class ScaleWorkload(Workload):
    """Authorize requests spread over every tenant of a bundle made by write_bundle."""

    tenants: int = 10

    def authorize(self, tag: str, start: int, count: int) -> Iterator[bytes]:
        from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

        for i in range(start, start + count):
            # A multiplicative hash walks the tenants in a scattered order.
            t = (i * 2_654_435_761) % self.tenants
            yield pb.AuthorizeRequest(
                request_id=f"{tag}-{i:09d}", tenant=f"tenant-{t:05d}",
                workload=("chat", "batch")[i % 2], model=("gpt-4.1", "gpt-4o-mini")[i // 2 % 2],
                provider="openai", estimated_input_tokens=1000, max_output_tokens=500,
            ).SerializeToString()


def run(ctx: Context) -> list[Row]:
    tenants = int(ctx.options.get("scale_tenants", 10_000))
    decisions_n = 3000 if ctx.quick else 20_000
    ns = argparse.Namespace(tenants=tenants, rounds=3 if ctx.quick else 2 * ctx.rounds + 1,
                            decisions=decisions_n)
    t0 = time.perf_counter()
    dirs = {n: ctx.path(f"scale-{n}") for n in (10, tenants)}
    for n, d in dirs.items():
        write_bundle(d, n, scale=1_000_000)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    snaps = {n: load_bundle(d) for n, d in dirs.items()}
    loaded = time.perf_counter() - t0
    rows: list[Row] = []
    for label, cold in (("warm", False), ("cold", True)):
        small_t, large_t = [], []
        for _ in range(ns.rounds):
            small_t.append(time_decisions(snaps[10], 10, decisions_n, 0, cold))
            large_t.append(time_decisions(snaps[tenants], tenants, decisions_n, 0, cold))
        s, lg = min(small_t), min(large_t)
        what = ("request shapes seen before" if not cold
                else "match and shape caches off: every request matched from the index")
        rows.append(Row(SECTION, f"in-process decision, {tenants} tenants ({label})", lg * 1e6,
                        "us", lg / s, "10 tenants",
                        f"{what}; everything but the Redis call; best of {ns.rounds} "
                        f"alternating rounds: 10 tenants {s * 1e6:.1f} us, median ratio "
                        f"{statistics.median(large_t) / statistics.median(small_t):.2f}"))
    del snaps
    rows.extend(_end_to_end(ctx, dirs, tenants))
    rows.append(Row(SECTION, f"bundle of {tenants * 5} budgets: load and compile", loaded,
                    "s", None, "", f"both bundles, YAML written in {written:.1f} s"))
    return rows


def _end_to_end(ctx: Context, dirs: dict[int, pathlib.Path], tenants: int) -> list[Row]:
    samples: dict[int, list[Sample]] = {n: [] for n in dirs}
    mixes: dict[int, dict[str, int]] = {n: {} for n in dirs}
    with ctx.redis("redis-scale") as server:
        sidecars = {n: Sidecar(server.url, d, ctx.work, name=f"scale-{n}")
                    for n, d in dirs.items()}
        try:
            for sc in sidecars.values():
                sc.start(timeout_s=300)
            runners = {n: Runner(ctx, sidecars[n], server, f"s{n}", ScaleWorkload(tenants=n))
                       for n in dirs}
            for _ in range(ctx.rounds):
                for n, r in runners.items():
                    sample, _, counts = r.authorize()
                    samples[n].append(sample)
                    for k, v in counts.items():
                        mixes[n][k] = mixes[n].get(k, 0) + v
            rss = {n: sc.rss() for n, sc in sidecars.items()}
        finally:
            for sc in sidecars.values():
                sc.stop()
    small, large = samples[10], samples[tenants]
    time_ratio = [a.rps / b.rps for a, b in zip(small, large, strict=True)]
    cpu_ratio = [b.us_per_call / a.us_per_call for a, b in zip(small, large, strict=True)]
    return [
        Row(SECTION, f"Authorize over gRPC, {tenants} tenants (time per call)",
            median([b.rps for b in large]), "calls/s", median(time_ratio), "10 tenants",
            f"ratio = calls/s with 10 tenants over calls/s with {tenants} (time per decision, "
            f"target <= 1.2); spread {spread(time_ratio) or '-'}; decisions "
            f"{mixes[tenants]} vs {mixes[10]}"),
        Row(SECTION, f"Authorize over gRPC, {tenants} tenants (event-loop CPU per call)",
            median([b.us_per_call for b in large]), "us", median(cpu_ratio), "10 tenants",
            f"spread {spread(cpu_ratio) or '-'}; 10 tenants "
            f"{median([a.us_per_call for a in small]):.0f} us"),
        Row(SECTION, f"sidecar RSS, {tenants} tenants' bundle, after the runs",
            rss[tenants] / 2**20, "MiB", rss[tenants] / rss[10], "10 tenants",
            f"10 tenants {rss[10] / 2**20:.0f} MiB; the bundle, its index and the shapes the "
            "runs made"),
    ]


if __name__ == "__main__":
    main()
