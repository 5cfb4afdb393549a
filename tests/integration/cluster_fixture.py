"""A real local Redis Cluster: 3 masters + 3 replicas on free loopback ports.

Each node is its own ``redis-server --cluster-enabled yes`` in a temporary
directory; ``redis-cli --cluster create ... --cluster-replicas 1`` assigns the
slots and the replicas. The fixture waits until every node reports
``cluster_state:ok`` and every replica's link to its master is up, so a test
may kill a master at once. Nodes are stopped by pid. A short node timeout makes
a failover take about two seconds instead of fifteen. A test may add a node
(``redis-cli --cluster add-node``), move slots with ``migrate_slot`` (as
``redis-cli --cluster reshard`` does) and delete a node again
(``redis-cli --cluster del-node``).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from tests.conftest import free_port

NODE_TIMEOUT_MS = 1000


@dataclass
class ClusterNode:
    port: int
    workdir: pathlib.Path
    bus_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def start(self, binary: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             # An explicit bus port: port + 10000 may be out of range or taken.
             "--cluster-port", str(self.bus_port),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """kill -9: no shutdown, no last write to its replica."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


def _ping_until(node: ClusterNode, deadline: float) -> bool:
    """True once the node answers; False when its process exited first (a port of
    its was taken between choosing it and binding it)."""
    client = node.client()
    while True:
        try:
            client.ping()
            return True
        except redis.ConnectionError:
            if node.proc is not None and node.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {node.port} did not start") from None
            time.sleep(0.02)


def _start_node(node: ClusterNode, binary: str) -> None:
    """Start ``node``; on fresh ports when the chosen ones were taken meanwhile."""
    for _ in range(5):
        node.start(binary)
        if _ping_until(node, time.monotonic() + 10):
            return
        node.proc = None
        node.port, node.bus_port = free_port(), free_port()
    raise RuntimeError(f"redis-server in {node.workdir} did not start on 5 pairs of ports")


@dataclass
class RedisCluster:
    """The running cluster; ``masters()``/``replica_of()`` read the live topology."""

    nodes: list[ClusterNode]
    binary: str = ""
    cli: str = ""
    started_s: float = 0.0
    # Running, but not (or no longer) members: deleted nodes, stopped with the rest.
    outside: list[ClusterNode] = field(default_factory=list)
    _admin: dict[int, redis.Redis] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Two seed nodes, as a deployment would list them."""
        return f"redis+cluster://{self.nodes[0].address},{self.nodes[1].address}/"

    def admin(self, port: int) -> redis.Redis:
        if port not in self._admin:
            self._admin[port] = redis.Redis(port=port, socket_timeout=5)
        return self._admin[port]

    def cmd(self, port: int, *args: str | int) -> Any:
        """One command to the node on ``port`` (no redirection)."""
        return self.admin(port).execute_command(*args)  # type: ignore[no-untyped-call]

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None]

    def topology(self) -> list[dict[str, str]]:
        """CLUSTER NODES of a live node, one dict per node (id, port, role, master id, slots)."""
        raw = self.cmd(self.live()[0].port, "CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        out = []
        for line in text.strip().splitlines():
            f = line.split()
            out.append({"id": f[0], "port": f[1].split("@")[0].rsplit(":", 1)[1],
                        "flags": f[2], "master": f[3], "link": f[7],
                        "slots": " ".join(f[8:])})
        return out

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots, by their first slot."""
        rows = [r for r in self.topology()
                if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]]
        rows.sort(key=lambda r: int(r["slots"].split()[0].split("-")[0]))
        return [int(r["port"]) for r in rows]

    def node_id(self, port: int) -> str:
        raw = self.cmd(port, "CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def replica_of(self, master_port: int) -> int:
        mid = self.node_id(master_port)
        for r in self.topology():
            if r["master"] == mid and "fail" not in r["flags"]:
                return int(r["port"])
        raise LookupError(f"master {master_port} has no replica")

    def owner(self, slot: int) -> int:
        """Port of the master serving ``slot`` (CLUSTER SHARDS is not in every 7.0;
        CLUSTER SLOTS is)."""
        for entry in self.cmd(self.live()[0].port, "CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return int(entry[2][1])
        raise LookupError(f"slot {slot} is not served")

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_replicated(self, master: int, replica: int, timeout_s: float = 10.0) -> None:
        """Until ``replica`` has processed everything ``master`` has written so far."""
        target = int(self.admin(master).info("replication")["master_repl_offset"])
        deadline = time.monotonic() + timeout_s
        while int(self.admin(replica).info("replication").get("slave_repl_offset", -1)) < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica} did not catch up with {master}")
            time.sleep(0.01)

    def wait_ok(self, timeout_s: float = 30.0, *, replicas: int = 3) -> None:
        """Until every live node says cluster_state:ok, agrees on the masters, and
        ``replicas`` replicas have their link to a master up."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                states = []
                for n in self.live():
                    info = self.cmd(n.port, "CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    states.append("cluster_state:ok" in text)
                views = {tuple(sorted(
                    int(e[2][1]) for e in self.cmd(n.port, "CLUSTER", "SLOTS")))
                    for n in self.live()}
                linked = 0
                for n in self.live():
                    repl = self.admin(n.port).info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") == "up":
                        linked += 1
                last = f"ok={states} views={views} linked={linked}"
                if all(states) and len(views) == 1 and linked >= replicas:
                    return
            except redis.RedisError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster did not become ready: {last}")

    def redis_cli(self, *args: str) -> str:
        done = subprocess.run([self.cli, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return done.stdout

    def add_node(self, again: ClusterNode | None = None) -> ClusterNode:
        """Join a node as a master without slots (``redis-cli --cluster add-node``):
        a new one on a free port, or ``again``, a node deleted before, at the same
        port under a new identity (``CLUSTER RESET HARD``: the members refuse the
        identity they were told to forget for a minute)."""
        if again is None:
            node = ClusterNode(free_port(), self.nodes[0].workdir.parent /
                               f"n{len(self.nodes) + len(self.outside)}")
            _start_node(node, self.binary)
        else:
            node = again
            self.cmd(node.port, "CLUSTER", "RESET", "HARD")
            self.outside.remove(node)
        self.redis_cli("--cluster", "add-node", node.address, self.live()[0].address)
        self.nodes.append(node)
        node_id = self.node_id(node.port)
        deadline = time.monotonic() + 30
        while not all(node_id in _text(self.cmd(n.port, "CLUSTER", "NODES"))
                      and "handshake" not in _text(self.cmd(n.port, "CLUSTER", "NODES"))
                      for n in self.live()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not learn of node {node.address}")
            time.sleep(0.05)
        self.wait_ok()
        return node

    def del_node(self, port: int) -> None:
        """``redis-cli --cluster del-node``: the node must serve no slot; every
        member forgets it and it is reset, but keeps running (in ``outside``)."""
        node = self.node(port)
        self.redis_cli("--cluster", "del-node", self.live()[0].address, self.node_id(port))
        self.nodes.remove(node)
        self.outside.append(node)

    def stop(self) -> None:
        for client in self._admin.values():
            with contextlib.suppress(Exception):
                client.close()
        self._admin.clear()
        for n in [*self.nodes, *self.outside]:
            n.stop()


async def migrate_slot(cluster: RedisCluster, slot: int, source: int, target: int,
                       pause_s: float, batch: int = 3) -> int:
    """Move ``slot`` from ``source`` to ``target`` as redis-cli --cluster reshard
    does, ``batch`` keys at a time, with traffic running in between; the number
    of keys moved."""
    src, dst = cluster.node_id(source), cluster.node_id(target)
    cluster.cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src)
    cluster.cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst)
    moved = 0
    while True:
        await asyncio.sleep(pause_s)
        keys = cluster.cmd(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            break
        cluster.cmd(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    await asyncio.sleep(pause_s)
    for port in (target, source, *(m for m in cluster.masters() if m not in (source, target))):
        try:
            cluster.cmd(port, "CLUSTER", "SETSLOT", slot, "NODE", dst)
        except redis.ResponseError as exc:
            # A master that gave away its last slot becomes a replica of the new
            # owner (cluster-allow-replica-migration), maybe before it is told.
            if port != source or "only with masters" not in str(exc):
                raise
    return moved


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def start_cluster(workdir: pathlib.Path) -> RedisCluster:
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server and redis-cli are needed for the Redis Cluster tests "
                    "(make deps installs the Debian package redis-server)")
    version = subprocess.run([server, "--version"], capture_output=True, text=True,
                             check=False).stdout
    major = version.partition(" v=")[2].split(".")[0]
    if not major.isdigit() or int(major) < 7:
        pytest.skip(f"the Redis Cluster fixture needs Redis 7 (--cluster-port); found "
                    f"{version.strip() or 'no version'}")
    began = time.monotonic()
    nodes = [ClusterNode(free_port(), workdir / f"n{i}") for i in range(6)]
    cluster = RedisCluster(nodes, server, cli)
    try:
        for n in nodes:
            _start_node(n, server)
        subprocess.run(
            [cli, "--cluster", "create", *(n.address for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    cluster.started_s = time.monotonic() - began
    return cluster


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with tempfile.TemporaryDirectory(prefix="keel-cluster-") as d:
        cluster = start_cluster(pathlib.Path(d))
        try:
            yield cluster
        finally:
            cluster.stop()
