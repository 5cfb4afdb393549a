"""Long soak of the seeded fault simulation: many seeds, many steps.

    .venv/bin/python scripts/soak.py --seeds 100 --steps 2000 [--first 1000]
    .venv/bin/python scripts/soak.py --cluster --seeds 20 --steps 1000 \
        [--shards 8] [--wait-replicas 1] [--failover-every 3]

Prints one line per seed and a total; a failing seed is printed with the
invariant it broke, and belongs in REGRESSION_SEEDS of
tests/integration/test_simulation.py once fixed (CLUSTER_REGRESSION_SEEDS for
--cluster). Needs redis-server (and redis-cli, Redis 7, for --cluster).

--cluster runs the walk on a local Redis Cluster (3 masters + 3 replicas, one
for the whole soak) with sharded keys and escrow; every --failover-every'th seed
kills a master mid-walk (its replica is promoted, the node comes back as a
replica) and reports what the failover lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys
import tempfile
import time
from typing import TYPE_CHECKING

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.simulation.harness import InvariantViolation, Report, run_seed, summary

if TYPE_CHECKING:
    from tests.integration.cluster_fixture import RedisCluster


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--cluster", action="store_true",
                    help="run on a local Redis Cluster (3 masters + 3 replicas)")
    ap.add_argument("--shards", type=int, default=8, help="key shards (--cluster)")
    ap.add_argument("--wait-replicas", type=int, default=0,
                    help="WAIT for this many replicas after each script (--cluster)")
    ap.add_argument("--failover-every", type=int, default=3,
                    help="every n-th seed kills a master (--cluster; 0: never)")
    ns = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not ns.cluster:
        return await soak(ns, None)
    from tests.integration.cluster_fixture import start_cluster

    with tempfile.TemporaryDirectory(prefix="keel-soak-cluster-") as d:
        cluster = start_cluster(pathlib.Path(d))
        try:
            return await soak(ns, cluster)
        finally:
            cluster.stop()


async def soak(ns: argparse.Namespace, cluster: RedisCluster | None) -> int:
    from tests.simulation.cluster_harness import (
        ClusterReport,
        cluster_summary,
        repair,
        run_cluster_seed,
    )

    reports: list[Report] = []
    failed: list[int] = []
    t0 = time.monotonic()
    for n, seed in enumerate(range(ns.first, ns.first + ns.seeds)):
        if time.monotonic() - t0 > ns.max_seconds:
            print(f"stopping: --max-seconds {ns.max_seconds} reached")
            break
        try:
            if cluster is None:
                rep = await run_seed(seed, ns.steps)
            else:
                failover = ns.failover_every > 0 and n % ns.failover_every == \
                    ns.failover_every - 1
                rep = await run_cluster_seed(cluster, seed, ns.steps, shards=ns.shards,
                                             wait_replicas=ns.wait_replicas,
                                             failover=failover)
        except InvariantViolation as exc:
            print(f"seed {seed}: FAILED: {exc}", flush=True)
            failed.append(seed)
            if cluster is not None:
                repair(cluster)
            continue
        reports.append(rep)
        print(rep.line(), flush=True)
    extra = cluster_summary([r for r in reports if isinstance(r, ClusterReport)]) \
        if cluster is not None else {}
    print(json.dumps({**summary(reports), **extra, "failed_seeds": failed,
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
