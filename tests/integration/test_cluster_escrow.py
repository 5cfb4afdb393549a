"""The sharded key layout and escrow on a real Redis Cluster (3 masters + 3 replicas).

* The shard tags spread evenly over the masters: the cluster itself (CLUSTER
  KEYSLOT, CLUSTER SLOTS) says where each shard's keys live; 1,000 tenants land
  on the masters within 1.2 of each other.
* No overshoot across masters: two ``keel-pdp serve`` processes on the cluster
  URL serve two tenants whose shards the cluster puts on different masters, all
  at once; an organisation-wide budget has room for exactly N requests. Exactly
  N are admitted, and the shared budget's settled + held + leased never exceeds
  its cap at any look while the traffic runs. The cost of a request is computed
  here from the price table's decimal strings.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import grpc
import pytest

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace, tenant_shard
from keel_pdp.budget.store import DEFAULT_CLUSTER_SHARDS
from tests.conftest import free_port
from tests.helpers import (
    PRICES,
    budget,
    reference_slot,
    stop_processes,
    wait_serving,
    write_bundle,
)
from tests.integration.cluster_fixture import RedisCluster, redis_cluster

__all__ = ["redis_cluster"]

pytestmark = pytest.mark.redis

PREFIX = "esc"
N = 24
INPUT, OUTPUT = 1000, 500
MODEL = "gpt-4o-mini"


def request_cost_micros() -> int:
    price = PRICES["openai"][MODEL]
    cost = INPUT * Decimal(price["input"]) + OUTPUT * Decimal(price["output"])
    assert cost == cost.to_integral_value()
    return int(cost)


def shard_master(cluster: RedisCluster, keys: KeySpace, shard: int) -> int:
    """The master serving a shard's keys, as the cluster computes it."""
    slot = int(cluster.cmd(cluster.masters()[0], "CLUSTER", "KEYSLOT", keys.streams[shard]))
    return cluster.owner(slot)


def test_shard_tags_spread_evenly_over_the_masters(redis_cluster: RedisCluster) -> None:
    keys = KeySpace(PREFIX, DEFAULT_CLUSTER_SHARDS)
    per_master: dict[int, int] = {}
    for shard in range(keys.shards):
        slot = int(redis_cluster.cmd(redis_cluster.masters()[0], "CLUSTER", "KEYSLOT",
                                     keys.streams[shard]))
        assert slot == reference_slot(keys.streams[shard].encode())
        # shard i hashes into the i-th equal part of the slot space
        assert slot * keys.shards // 16384 == shard
        owner = redis_cluster.owner(slot)
        per_master[owner] = per_master.get(owner, 0) + 1
    assert len(per_master) == 3
    assert max(per_master.values()) - min(per_master.values()) <= 1, per_master
    tenants: dict[int, int] = {}
    # Where the cluster puts each shard (asked once per shard), then each tenant.
    owner_of = [shard_master(redis_cluster, keys, shard) for shard in range(keys.shards)]
    for i in range(1000):
        where = owner_of[tenant_shard(f"tenant-{i}", keys.shards)]
        tenants[where] = tenants.get(where, 0) + 1
    assert max(tenants.values()) / min(tenants.values()) <= 1.2, tenants


@pytest.fixture
def two_sidecars(redis_cluster: RedisCluster, tmp_path: pathlib.Path) -> Iterator[list[int]]:
    cap = Decimal(N * request_cost_micros()) / 1_000_000
    policies = write_bundle(tmp_path / "policies", [budget("org", f"{cap:.6f}")],
                            settings={"min_output_tokens": OUTPUT})
    env = {**os.environ, "KEEL_KEY_PREFIX": PREFIX}
    procs, ports = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(policies),
             "--redis-url", redis_cluster.url, "--listen", f"127.0.0.1:{port}",
             "--metrics-port", "0", "--store-timeout", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        ports.append(port)
    try:
        yield ports
    finally:
        stop_processes(procs)


def test_two_sidecars_admit_exactly_n_from_a_budget_shared_across_masters(
        redis_cluster: RedisCluster, two_sidecars: list[int]) -> None:
    keys = KeySpace(PREFIX, DEFAULT_CLUSTER_SHARDS)
    cost = request_cost_micros()
    first = "team-0"
    other = next(f"team-{i}" for i in range(1, 500)
                 if shard_master(redis_cluster, keys, tenant_shard(f"team-{i}", keys.shards))
                 != shard_master(redis_cluster, keys, tenant_shard(first, keys.shards)))
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in two_sidecars]
    for ch in channels:
        wait_serving(ch, timeout=30)
    stubs = [pb_grpc.PolicyDecisionPointStub(ch) for ch in channels]

    looks: list[dict[str, int]] = []
    stop = threading.Event()

    def parent_figures() -> dict[str, int]:
        found: dict[str, int] = {}
        for port in redis_cluster.masters():
            for key in redis_cluster.admin(port).scan_iter(f"{PREFIX}:*:b:org:0::*"):
                raw: Any = redis_cluster.admin(port).hgetall(key)
                found = {k.decode(): int(v) for k, v in raw.items()
                         if k.decode() in ("s", "h", "l")}
        return found

    def watch() -> None:
        while not stop.is_set():
            looks.append(parent_figures())
            time.sleep(0.01)

    def send(stub: Any, tenant: str, tag: str) -> list[int]:
        out = []
        for i in range(2 * N):
            r = stub.Authorize(pb.AuthorizeRequest(
                request_id=f"{tag}-{i}", tenant=tenant, workload="chat", model=MODEL,
                estimated_input_tokens=INPUT, max_output_tokens=OUTPUT), timeout=10)
            out.append(r.decision)
        return out

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, stubs[s], t, f"{t}-{s}")
                       for s in (0, 1) for t in (first, other)]
            results = [f.result(timeout=120) for f in futures]
    finally:
        stop.set()
        watcher.join()
        for ch in channels:
            ch.close()
    decisions = [d for r in results for d in r]
    assert decisions.count(pb.ALLOW) == N, sorted(set(decisions))
    assert set(decisions) == {pb.ALLOW, pb.DENY}
    by_tenant = [results[0] + results[2], results[1] + results[3]]
    assert all(pb.ALLOW in r for r in by_tenant)  # both masters' shards spent from it
    assert looks
    for figures in looks:
        assert figures.get("s", 0) + figures.get("h", 0) + figures.get("l", 0) <= N * cost
    time.sleep(0.3)  # refusals give their leases back after answering
    leased = parent_figures().get("l", 0)
    held = 0
    for port in redis_cluster.masters():
        for key in redis_cluster.admin(port).scan_iter(f"{PREFIX}:*:l:org:0::*"):
            raw: Any = redis_cluster.admin(port).hmget(key, "g", "s", "h")
            g, s, h = (int(x or 0) for x in raw)
            assert s + h <= g
            held += s + h
    assert held == N * cost
    assert held <= leased <= N * cost
