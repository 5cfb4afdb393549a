"""A node that leaves a real Redis Cluster is let go by the client, and a node
that comes back at the same address is reached over a new connection.

On its own fixture cluster (3 masters + 3 replicas), a fourth master is added
with ``redis-cli --cluster add-node``; Keel's slot is migrated onto it under
Authorize/Closeout traffic and raw increments, so the client connects to it;
the slot is migrated back and the node deleted with ``redis-cli --cluster
del-node``. The node's own ``CLIENT LIST`` shows the client's connection gone
after the refresh that followed the move (before, it stayed open until the
process restarted). The node is then added again (same port, new identity), the
slot moved onto it once more, and the traffic follows over a new connection.
Throughout, nothing is lost or applied twice: every increment is there exactly
once, every Authorize was held and every Closeout settled, and the budget's
window holds exactly what was booked.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from keel_pdp.budget.cluster import ClusterClient, key_slot
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.resp import RespClient
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, write_bundle
from tests.integration.cluster_fixture import RedisCluster, migrate_slot, redis_cluster
from tests.integration.conftest import stream_totals

__all__ = ["redis_cluster"]

pytestmark = pytest.mark.redis

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
PROVIDER_COST = 1234  # micro-USD a Closeout reports as the provider's cost


def connected_from(cluster: RedisCluster, port: int) -> set[str]:
    """The addresses (ip:port) the clients of the node on ``port`` connect from,
    as the node itself lists them."""
    raw = cluster.cmd(port, "CLIENT", "LIST")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return {f[len("addr="):] for line in text.strip().splitlines()
            for f in line.split() if f.startswith("addr=")}


def local_address(node: RespClient) -> str:
    """Where the client's connection to ``node`` comes from (ip:port)."""
    conn = node._conns[0]
    assert conn is not None, "not connected"
    host, port = conn._transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def until(check: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.02)


class Traffic:
    """Authorize + Closeout and raw increments in Keel's slot, until stopped."""

    def __init__(self, client: ClusterClient, engine: Engine, tag: str) -> None:
        self.client, self.engine = client, engine
        self.incr = client.script(INCR)
        self.keys = [f"d:{{{tag}}}:{i}" for i in range(12)]
        self.sent: Counter[str] = Counter()
        self.held = self.settled = self.requests = 0
        self.window_start_ms = 0
        self.wrong: list[object] = []
        self._stop = asyncio.Event()
        self._n = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._raw(w)) for w in range(4)]
        self._tasks += [asyncio.create_task(self._decisions()) for _ in range(3)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _raw(self, w: int) -> None:
        rnd = random.Random(w)
        while not self._stop.is_set():
            key = rnd.choice(self.keys)
            try:
                await self.client.eval_script(self.incr, [key], [1], timeout_s=5)
                self.sent[key] += 1
            except Exception as exc:
                self.wrong.append(exc)
            await asyncio.sleep(0.002)

    async def _decisions(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            try:
                out = await self.engine.authorize(AuthorizeInput(
                    f"dep-{self._n}", "acme", "chat", "gpt-4o-mini", "openai", 120, 40))
                self.requests += 1
                if out.decision is not DecisionKind.ALLOW or out.degraded or out.replayed:
                    self.wrong.append(out)
                    continue
                self.held += out.estimated_cost_micros
                self.window_start_ms = out.holds[0].window_start_ms
                done = await self.engine.closeout(
                    out.permit_id, TokenUsage(input_tokens=120, output_tokens=30),
                    "SUCCEEDED", PROVIDER_COST)
                if done.status != "SETTLED":
                    self.wrong.append(done)
                    continue
                self.settled += done.actual_cost_micros
            except Exception as exc:
                self.wrong.append(exc)
            await asyncio.sleep(0.005)


async def test_a_deleted_node_is_let_go_and_a_returning_one_reconnects(
        redis_cluster: RedisCluster, tmp_path: pathlib.Path) -> None:
    cluster = redis_cluster
    keys = KeySpace("t")
    tag = keys.stream[keys.stream.index("{") + 1:keys.stream.index("}")]
    slot = key_slot(keys.stream)
    home = cluster.owner(slot)
    bundle = write_bundle(tmp_path / "b", [budget("cap", "1000", scope={"tenant": "acme"})])
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    client = ClusterClient.from_url(cluster.url)
    store = BudgetStore(None, keys, 2.0, transport=client)
    traffic = Traffic(client, Engine(holder, store, Metrics()), tag)
    try:
        joined = cluster.add_node()
        address = ("127.0.0.1", joined.port)
        traffic.start()
        await asyncio.sleep(0.2)

        # Keel's slot onto the new master: the traffic follows it there.
        await migrate_slot(cluster, slot, home, joined.port, pause_s=0.02, batch=10_000)
        await until(lambda: client.owner_of(keys.stream) == address, "the client follows")
        await asyncio.sleep(0.2)
        first = client._nodes[address]
        ours = local_address(first)
        assert ours in connected_from(cluster, joined.port)

        # Back to where it was, under traffic; the client's next refresh sees a
        # complete map without the node.
        refreshes = client.refreshes
        await migrate_slot(cluster, slot, joined.port, home, pause_s=0.02, batch=10_000)
        await until(lambda: client.refreshes > refreshes and address not in client.masters
                    and client.owner_of(keys.stream) == ("127.0.0.1", home),
                    "a refresh after the move back")
        await until(lambda: ours not in connected_from(cluster, joined.port),
                    "the client's connection to the departed master closed")
        assert address not in client.nodes and not first.connected
        assert client.retired >= 1
        cluster.del_node(joined.port)
        await asyncio.sleep(0.3)
        assert ours not in connected_from(cluster, joined.port)
        print(f"departed: {client.retired} node(s) let go, client {client.redirects}")

        # The same address joins again and serves the slot: a new connection.
        cluster.add_node(again=joined)
        await migrate_slot(cluster, slot, home, joined.port, pause_s=0.02, batch=10_000)
        await until(lambda: client.owner_of(keys.stream) == address, "the client follows")
        again = client._nodes[address]
        assert again is not first
        await until(lambda: again.connected, "connected to the returning master")
        assert local_address(again) in connected_from(cluster, joined.port)
        await asyncio.sleep(0.3)  # traffic served there
    finally:
        await traffic.stop()
        await client.close()
    print(f"traffic: {sum(traffic.sent.values())} increments, {traffic.requests} "
          f"Authorize + Closeout")
    assert traffic.wrong == [], traffic.wrong[:5]
    owner = cluster.owner(slot)
    assert owner == joined.port
    direct = cluster.admin(owner)
    # Nothing lost, nothing applied twice.
    assert sum(traffic.sent.values()) > 100 and traffic.requests > 20
    for key, total in traffic.sent.items():
        assert int(direct.get(key) or 0) == total, key
    totals = stream_totals(direct, keys.stream)
    assert totals.types.get("decision") == traffic.requests
    assert totals.types.get("settlement") == traffic.requests
    assert totals.held == traffic.held and totals.actual == traffic.settled
    # The budget's window holds exactly what was booked: settled, nothing held.
    window = keys.window("cap", (), traffic.window_start_ms)
    assert [int(v or 0) for v in direct.hmget(window, "s", "h")] == [traffic.settled, 0]
    assert traffic.settled == PROVIDER_COST * traffic.requests
