"""Redirects from a real Redis Cluster whose nodes do not name their endpoint.

With ``cluster-preferred-endpoint-type unknown-endpoint`` (clusters reached
through addresses the nodes do not know themselves) Redis answers ``?`` as a
master's host in CLUSTER SLOTS and leaves the host out of its redirects:
``MOVED 3999 :6381``, ``ASK 3999 :6381``, meaning "the host you asked, this
port". The client must follow both; a client that does not fails every call
redirected during a slot move, i.e. answers it by the budgets' fail mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keel_pdp.budget.cluster import ClusterClient, key_slot
from tests.integration.cluster_fixture import RedisCluster, redis_cluster

__all__ = ["redis_cluster"]

pytestmark = pytest.mark.redis


@pytest.fixture
def unknown_endpoints(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    ports = [n.port for n in redis_cluster.live()]
    for port in ports:
        redis_cluster.cmd(port, "CONFIG", "SET", "cluster-preferred-endpoint-type",
                          "unknown-endpoint")
    try:
        yield redis_cluster
    finally:
        for port in ports:
            redis_cluster.cmd(port, "CONFIG", "SET", "cluster-preferred-endpoint-type", "ip")


async def test_host_less_ask_and_moved_are_followed_to_the_port_they_name(
        unknown_endpoints: RedisCluster) -> None:
    cluster = unknown_endpoints
    tag = "no-endpoint"
    slot = key_slot(tag)
    source = cluster.owner(slot)
    target = next(m for m in cluster.masters() if m != source)
    key = f"e:{{{tag}}}"
    c = ClusterClient.from_url(cluster.url)
    try:
        # CLUSTER SLOTS names every master's host as nil: the host asked is meant.
        assert await c.command("SET", "steady:{elsewhere}", "1", timeout_s=2) == b"OK"
        assert c.owner_of(key) == ("127.0.0.1", source)
        cluster.cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
        cluster.cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
        try:
            # The key is not on the source: "ASK <slot> :<target port>" (redis-py
            # keeps only "<slot> :<port>" of it).
            with pytest.raises(Exception, match=rf"^(ASK )?{slot} :{target}$"):
                cluster.cmd(source, "SET", key, "direct")
            assert await c.command("SET", key, "1", timeout_s=2) == b"OK"
            assert c.redirects["ASK"] == 1
        finally:
            for port in cluster.masters():
                cluster.cmd(port, "CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
        # The move is done: "MOVED <slot> :<target port>", then the new map.
        with pytest.raises(Exception, match=rf"^(MOVED )?{slot} :{target}$"):
            cluster.cmd(source, "GET", key)
        assert await c.command("GET", key, timeout_s=2) == b"1"
        assert c.redirects["MOVED"] == 1
        assert cluster.admin(target).get(key) == b"1"
    finally:
        await c.close()
    cluster.wait_ok()
