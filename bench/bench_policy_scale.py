"""Decision cost as the policy bundle grows: 10,000 tenants x 5 budgets vs 10 tenants.

Times the in-process part of Authorize, everything but the Redis round trip
(matching, pricing, planning, the decision event, the hold script's keys and
arguments), on both bundles in the same run, alternating rounds, and prints the
ratio (target: at most 1.2).

    python -m bench.bench_policy_scale [--tenants 10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import tempfile
import time

import yaml

import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, event_data, plan
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.policy.snapshot import PolicySnapshot

PRICES = {"openai": {"gpt-4.1": {"input": "2.00", "output": "8.00"},
                     "gpt-4o-mini": {"input": "0.15", "output": "0.60"}}}


class _NoCache(dict[object, object]):
    def __setitem__(self, key: object, value: object) -> None:
        pass


def make_bundle(directory: pathlib.Path, tenants: int) -> PolicySnapshot:
    directory.mkdir(parents=True)
    (directory / "bundle.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Bundle", "revision": f"t{tenants}"}))
    (directory / "prices.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "PriceTable", "revision": "p",
         "providers": PRICES}))
    budgets = []
    for t in range(tenants):
        name = f"tenant-{t:05d}"
        budgets += [
            {"id": f"{name}-m", "scope": {"tenant": name}, "window": "monthly",
             "cap_usd": "1000"},
            {"id": f"{name}-d", "scope": {"tenant": name}, "window": "daily", "cap_usd": "100"},
            {"id": f"{name}-chat", "scope": {"tenant": name, "workload": "chat"},
             "window": "hourly", "cap_usd": "10"},
            {"id": f"{name}-batch", "scope": {"tenant": name, "workload": "batch"},
             "window": "daily", "cap_usd": "50"},
            {"id": f"{name}-premium", "scope": {"tenant": name, "model": "gpt-4.1"},
             "window": "daily", "cap_usd": "20"},
        ]
    (directory / "budgets.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Budgets", "budgets": budgets}))
    return load_bundle(directory)


def make_engine() -> Engine:
    """An engine whose store never connects: only its key and argument building runs."""
    store = BudgetStore(aioredis.Redis(), KeySpace("keel"))
    return Engine(PolicyHolder("."), store, Metrics())


ENGINE = make_engine()  # one, as in a sidecar: its key space stays the same


def time_decisions(snap: PolicySnapshot, tenants: int, n: int, seed: int,
                   cold: bool = False) -> float:
    """Seconds per decision; ``cold`` turns the match and shape caches off, so
    every request is matched from the index and its shape built (as the first
    time a sidecar sees a request shape)."""
    for name in ("_match_cache", "_shape_cache"):
        if cold or isinstance(getattr(snap, name), _NoCache):
            object.__setattr__(snap, name, _NoCache() if cold else {})
    store = ENGINE.store
    rng = random.Random(seed)
    reqs = [AuthorizeInput(f"r{i}", f"tenant-{rng.randrange(tenants):05d}",
                           rng.choice(("chat", "batch")), rng.choice(("gpt-4.1", "gpt-4o-mini")),
                           "openai", 1000, 500) for i in range(n)]
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    for r in reqs:
        p = plan(snap, r, now)
        hold, _, _ = ENGINE.prepare_hold(p, event_data(p))
        store.hold_call(hold)
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


if __name__ == "__main__":
    main()
