"""`keel-pdp serve` and `keel-pdp ledger` on a real Redis Cluster, and --wait-replicas.

The sidecar and the ledger writer run as an operator runs them, as processes
given a ``redis+cluster://`` URL of two seed nodes; Authorize, replays, Closeout
and Void go over gRPC; the ledger (SQLite) must then hold every stream entry
exactly once. What the stream holds is read from the master that owns it,
directly, and compared with the ledger by stream id and by amounts.

The durability option: with ``wait_replicas=1`` every hold is on the replica
when its answer comes back (read from the replica itself); with the replica
stopped (SIGSTOP) holds are still answered inside the store timeout, as usual,
and counted as short waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from redis.exceptions import RedisError

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.cluster import key_slot
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import DEFAULT_CLUSTER_SHARDS, BudgetStore, describe_url
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.flags import Bad, redacted_url
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.settings import SERVE
from tests.conftest import free_port
from tests.helpers import budget, stop_processes, wait_serving, write_bundle
from tests.integration.cluster_fixture import RedisCluster, redis_cluster

__all__ = ["redis_cluster"]

pytestmark = pytest.mark.redis

PREFIX = "srv"


def _bundle(directory: pathlib.Path) -> pathlib.Path:
    return write_bundle(directory, [
        budget("org-daily", "1000.00"),
        budget("per-tenant", "50.00", per=["tenant"]),
        budget("tiny", "0.000100", scope={"tenant": "tiny"})])


@pytest.fixture
def serving(redis_cluster: RedisCluster, tmp_path: pathlib.Path
            ) -> Iterator[tuple[int, int, pathlib.Path, list[subprocess.Popen[str]]]]:
    """`keel-pdp serve --wait-replicas 1` and `keel-pdp ledger` on the cluster URL."""
    policies = _bundle(tmp_path / "policies")
    port, mport = free_port(), free_port()
    ledger = tmp_path / "ledger.db"
    env = {**os.environ, "KEEL_KEY_PREFIX": PREFIX}
    serve = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(policies),
         "--redis-url", redis_cluster.url, "--listen", f"127.0.0.1:{port}",
         "--metrics-port", str(mport), "--store-timeout", "0.5", "--wait-replicas", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    writer = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "ledger", "--redis-url", redis_cluster.url,
         "--store", f"sqlite:///{ledger}", "--block", "0.05"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [serve, writer]
    try:
        yield port, mport, ledger, procs
    finally:
        stop_processes(procs)


def _stream_on_owner(cluster: RedisCluster, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """The stream, read from the master that owns its slot (no redirection)."""
    raw: Any = cluster.admin(cluster.owner(key_slot(stream))).xrange(stream)
    return [(i.decode(), f) for i, f in raw]


def _ledger_events(path: pathlib.Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT event_id, etype, permit_id FROM ledger_events").fetchall()
        except sqlite3.OperationalError:  # the writer has not migrated yet
            return []
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def test_serve_and_the_ledger_writer_run_on_a_cluster_url_exactly_once(
        redis_cluster: RedisCluster,
        serving: tuple[int, int, pathlib.Path, list[subprocess.Popen[str]]]) -> None:
    port, mport, ledger, procs = serving
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_serving(channel)
        stub = pb_grpc.PolicyDecisionPointStub(channel)
        permits: list[str] = []
        denials: set[str] = set()
        for i in range(40):
            tenant = ("acme", "globex", "tiny")[i % 3]
            req = pb.AuthorizeRequest(
                request_id=f"c-{i}", tenant=tenant, workload="chat", model="gpt-4o-mini",
                estimated_input_tokens=300 + 7 * i, max_output_tokens=100)
            r = stub.Authorize(req, timeout=5)
            again = stub.Authorize(req, timeout=5)  # a retry
            assert again.decision == r.decision
            if r.decision == pb.DENY:
                # A denial holds nothing; each answer is its own decision event.
                denials.update((r.permit_id, again.permit_id))
                continue
            assert again.permit_id == r.permit_id  # the same permit, no second hold
            permits.append(r.permit_id)
        assert permits and denials  # the "tiny" tenant is over its budget
        settled = voided = 0
        for n, pid in enumerate(permits):
            if n % 4 == 3:
                v = stub.Void(pb.VoidRequest(permit_id=pid, reason="caller gave up"), timeout=5)
                assert v.status == pb.VOIDED
                voided += 1
                continue
            close = pb.CloseoutRequest(permit_id=pid, usage=pb.Usage(
                input_tokens=300, output_tokens=40 + n), outcome=pb.SUCCEEDED)
            assert stub.Closeout(close, timeout=5).status == pb.SETTLED
            again_c = stub.Closeout(close, timeout=5)  # a retried closeout books nothing new
            assert again_c.status in (pb.SETTLED, pb.ALREADY_SETTLED)
            settled += 1
    finally:
        channel.close()

    # Every shard's stream (64 by default on a cluster); the ledger's event id is
    # the shard's tag, "/", and the stream id.
    ks = KeySpace(PREFIX, DEFAULT_CLUSTER_SHARDS)
    entries = [(f"{tag}/{i}", f) for stream, tag in zip(ks.streams, ks.tags, strict=True)
               for i, f in _stream_on_owner(redis_cluster, stream)]
    kinds = [f[b"type"].decode() for _, f in entries]
    # What this test did, from its own counts: one decision per permit (retries add
    # none) and per denial answer, one settlement per settled permit, one void per
    # voided one.
    assert kinds.count("decision") == len(permits) + len(denials)
    assert kinds.count("settlement") == settled
    assert kinds.count("void") == voided
    deadline = time.monotonic() + 30
    rows = _ledger_events(ledger)
    while len(rows) < len(entries) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _ledger_events(ledger)
    ids = [r[0] for r in rows]
    assert sorted(ids) == sorted(i for i, _ in entries), "the ledger is not the stream"
    assert len(set(ids)) == len(ids)
    by_id = {i: f for i, f in entries}
    for eid, etype, pid in rows:
        assert by_id[eid][b"type"].decode() == etype
        assert json.loads(by_id[eid][b"res"]).get("pid", pid) == pid
    # Nothing else arrives later (no duplicate deliveries).
    time.sleep(0.5)
    assert len(_ledger_events(ledger)) == len(entries)

    # Every hold and settlement reached the replica within its WAIT: no short waits.
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    assert 'keel_pdp_store_short_waits_total{script="authorize"} 0.0' in text
    assert 'keel_pdp_store_short_waits_total{script="closeout"} 0.0' in text
    for p in procs:
        assert p.poll() is None, p.communicate(timeout=5)[0]
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=20)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # The log names the cluster's seeds and nothing else.
    assert f"budget store cluster {redis_cluster.nodes[0].address}," in outs[0]
    assert "--wait-replicas 1: a master" not in outs[0]  # every master has its replica


def test_cluster_urls_are_validated_and_logged_without_secrets() -> None:
    url = "redis+cluster://ops:s3cret@10.0.0.1:7000,10.0.0.2:7001/?password=p4ss"
    assert describe_url(url) == "cluster 10.0.0.1:7000,10.0.0.2:7001"
    shown = redacted_url(url)
    assert "s3cret" not in shown and "p4ss" not in shown
    assert "10.0.0.1:7000,10.0.0.2:7001" in shown
    setting = next(s for s in SERVE if s.name == "redis_url")
    kind = setting.kind
    kind.check(url)
    kind.check("rediss+cluster://h1:1,[::1]:2/")
    for bad, words in (("redis+cluster://ops:s3cret@h1:1,,h2:2/", "empty seed node"),
                       ("redis+cluster://ops:s3cret@h1:99999/", "1 to 65535"),
                       ("redis+cluster://h1:1/3", "only database 0"),
                       ("redis+cluster://h1:1/?cluster=true", "unknown parameter"),
                       ("redis://h1:1,h2:2", "redis+cluster://"),
                       ("rediss+cluster://ops:s3cret@h1:1/?ssl_ca_certs=/nonexistent/ca.pem",
                        "cannot read the TLS file")):
        with pytest.raises(Bad) as err:
            kind.check(bad)
        message = setting.message(err.value, bad)  # what the CLI prints
        assert words in message, message
        assert "s3cret" not in message and "--redis-url" in message


def test_serve_refuses_a_bad_cluster_url_naming_the_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "serve", "--redis-url",
                          "redis+cluster://u:hunter2@h1:1,,h2:2/"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "--redis-url" in res.stderr and "empty seed node" in res.stderr
    assert "hunter2" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "serve", "--wait-replicas",
                          "-1"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--wait-replicas" in res.stderr


# ------------------------------------------------------------------ durability (WAIT)
def _engine(store: BudgetStore, bundle: pathlib.Path) -> Engine:
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, store, Metrics())


def _replica_reader(cluster: RedisCluster, key: str) -> tuple[int, redis.Redis]:
    owner = cluster.owner(key_slot(key))
    replica = cluster.replica_of(owner)
    reader = redis.Redis(port=replica, socket_timeout=5)
    reader.execute_command("READONLY")  # type: ignore[no-untyped-call]
    return replica, reader


async def test_with_wait_every_hold_is_on_the_replica_when_it_is_answered(
        redis_cluster: RedisCluster, tmp_path: pathlib.Path) -> None:
    keys = KeySpace("w1")
    store = BudgetStore.from_url(redis_cluster.url, prefix="w1", timeout_s=0.5,
                                 shards=1,
                                 wait_replicas=1)
    _, reader = _replica_reader(redis_cluster, keys.stream)
    engine = _engine(store, _bundle(tmp_path / "b"))
    try:
        for i in range(50):
            res = await engine.authorize(AuthorizeInput(
                f"w-{i}", "acme", "chat", "gpt-4o-mini", "openai", 200, 50))
            assert res.decision is DecisionKind.ALLOW
            # Read from the replica at once: WAIT returned, so it has the hold.
            assert reader.hget(keys.permit(res.permit_id), "state") == b"held", i
            assert reader.xlen(keys.stream) == i + 1
        assert store.short_waits == 0
        assert await store.fewest_replicas() == 1
        # The replica paused while a hold is made: the answer waits for it. (On
        # loopback a replica is usually quick enough for the reads above to pass
        # without WAIT; this part is the one that fails without it.)
        replica_port = redis_cluster.owner(key_slot(keys.stream))
        proc = redis_cluster.node(redis_cluster.replica_of(replica_port)).proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        os.kill(proc.pid, signal.SIGSTOP)
        resumed = loop.call_later(0.05, os.kill, proc.pid, signal.SIGCONT)
        try:
            began = time.monotonic()
            res = await engine.authorize(AuthorizeInput(
                "w-paused", "acme", "chat", "gpt-4o-mini", "openai", 200, 50))
            took = time.monotonic() - began
        finally:
            resumed.cancel()
            os.kill(proc.pid, signal.SIGCONT)
        assert res.decision is DecisionKind.ALLOW and not res.degraded
        assert took >= 0.05 * 0.9, took  # answered only once the replica had resumed
        assert store.short_waits == 0
        assert reader.hget(keys.permit(res.permit_id), "state") == b"held"
    finally:
        await store.close()
        reader.close()


async def test_a_stopped_replica_makes_holds_short_waits_answered_inside_the_timeout(
        redis_cluster: RedisCluster, tmp_path: pathlib.Path) -> None:
    keys = KeySpace("w2")
    timeout_s = 0.2
    store = BudgetStore.from_url(redis_cluster.url, prefix="w2",
                                 timeout_s=timeout_s, shards=1,
                                 wait_replicas=1)
    short: list[str] = []
    store.on_short_wait = short.append
    replica, reader = _replica_reader(redis_cluster, keys.stream)
    engine = _engine(store, _bundle(tmp_path / "b"))
    proc = redis_cluster.node(replica).proc
    assert proc is not None
    # Redis ends a WAIT's timeout at its next cron tick: at the default hz 10 up to
    # 100 ms late, and the calls pipelined behind it on the connection wait too.
    # The documented setting for --wait-replicas is hz 100 (10 ms).
    master = redis_cluster.owner(key_slot(keys.stream))
    redis_cluster.cmd(master, "CONFIG", "SET", "hz", 100)
    try:
        first = await engine.authorize(AuthorizeInput(
            "s-0", "acme", "chat", "gpt-4o-mini", "openai", 200, 50))
        assert first.decision is DecisionKind.ALLOW and not short
        os.kill(proc.pid, signal.SIGSTOP)  # well under the node timeout: no failover
        try:
            took = []
            for i in range(1, 4):
                began = time.monotonic()
                res = await engine.authorize(AuthorizeInput(
                    f"s-{i}", "acme", "chat", "gpt-4o-mini", "openai", 200, 50))
                took.append(time.monotonic() - began)
                # Answered as usual: the hold is made on the master, only not yet
                # confirmed on the replica.
                assert res.decision is DecisionKind.ALLOW and not res.degraded
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert short == ["authorize"] * 3 and store.short_waits == 3
        # WAIT gives up at half the store timeout, so the answer is inside it.
        assert max(took) < timeout_s, took
        assert min(took) >= timeout_s / 2 * 0.9, took
        redis_cluster.wait_replicated(redis_cluster.owner(key_slot(keys.stream)), replica)
        assert reader.xlen(keys.stream) == 4  # and it catches up afterwards
    finally:
        redis_cluster.cmd(master, "CONFIG", "SET", "hz", 10)
        await store.close()
        reader.close()


def test_waiting_needs_the_pipelined_clients() -> None:
    with pytest.raises(ValueError, match="RESP or Redis Cluster client"):
        BudgetStore.from_url("redis://127.0.0.1:1/0", client="redis-py", wait_replicas=1)
    with pytest.raises(ValueError, match="wait_replicas"):
        BudgetStore.from_url("redis://127.0.0.1:1/0", wait_replicas=-1)


async def test_a_wait_that_outlasts_the_store_timeout_never_fails_the_written_hold(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    # A standalone Redis has no replica: WAIT 1 can only time out, and Redis ends
    # it at a cron tick (hz 10: 100 ms or more), long after this 40 ms budget.
    store = BudgetStore.from_url(redis_url, prefix="late", timeout_s=0.04, wait_replicas=1)
    short: list[str] = []
    store.on_short_wait = short.append
    engine = _engine(store, _bundle(tmp_path / "b"))
    try:
        res = await engine.authorize(AuthorizeInput(
            "late-0", "acme", "chat", "gpt-4o-mini", "openai", 200, 50))
        # The hold was written and answered: WAIT's lateness is not a store failure.
        assert res.decision is DecisionKind.ALLOW and not res.degraded
        assert short == ["authorize"]
        # What serve checks at start to warn that --wait-replicas cannot be met.
        assert await store.fewest_replicas() == 0
    finally:
        await store.close()
    keys = KeySpace("late")
    reader = redis.Redis.from_url(redis_url)
    assert reader.hget(keys.permit(res.permit_id), "state") == b"held"
    raw: Any = reader.xrange(keys.stream)
    assert [f[b"type"] for _, f in raw] == [b"decision"]  # one hold, one event


def test_serve_warns_when_masters_have_fewer_replicas_than_asked(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    policies = _bundle(tmp_path / "policies")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(policies),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--wait-replicas", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "--wait-replicas 1: a master of" in out and "has only 0 replica(s)" in out, out


# ------------------------------------------------------------------ last: it changes the cluster
async def test_the_ledger_writer_follows_a_failover_and_stays_exactly_once(
        redis_cluster: RedisCluster, tmp_path: pathlib.Path) -> None:
    # Traffic with --wait-replicas 1, the writer consuming; the master of Keel's
    # slot is killed with -9, its replica promoted; more traffic; the writer
    # (its own RedisCluster client) carries on. The ledger must then be exactly
    # the stream the new master holds, and that stream must hold every decision
    # the engine answered before and after (WAIT: nothing answered was lost).
    # After the promotion the new master has no replica: its WAITs are short.
    from keel_pdp.ledger.commands import stream_client
    from tests.integration.conftest import assert_ledger_matches_stream, traffic

    keys = KeySpace("t")
    for node in redis_cluster.live():  # the documented setting for --wait-replicas
        redis_cluster.cmd(node.port, "CONFIG", "SET", "hz", 100)
    # One shard (--key-shards 1): every key, and the one stream, on the master killed.
    store = BudgetStore.from_url(redis_cluster.url, prefix="t", timeout_s=0.1,
                                 wait_replicas=1, shards=1)
    engine = _engine(store, _bundle(tmp_path / "b"))
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    ledger.migrate()
    writer = LedgerWriter(WriterConfig(key_prefix="t", block_ms=10, consumer="w1",
                                       trim=False, backoff_initial_s=0.01,
                                       backoff_max_s=0.2),
                          ledger, stream_client(redis_cluster.url, socket_timeout=2))

    def consume(until_s: float) -> int:
        """Step the writer (through errors, as its run loop does) until it is idle."""
        deadline, idle, handled = time.monotonic() + until_s, 0, 0
        while idle < 3:
            assert time.monotonic() < deadline, "the writer did not catch up"
            try:
                n = writer.step()
            except RedisError:
                time.sleep(0.1)
                continue
            handled += n
            idle = idle + 1 if n == 0 else 0
        return handled

    try:
        before = await traffic(engine, 30, "a", tenants=("acme", "globex"))
        consume(20)
        owner = redis_cluster.owner(key_slot(keys.stream))
        replica = redis_cluster.replica_of(owner)
        assert store.short_waits == 0  # every hold so far is on the replica
        redis_cluster.node(owner).kill()
        promoted_by = time.monotonic() + 30
        while redis_cluster.owner(key_slot(keys.stream)) != replica:
            assert time.monotonic() < promoted_by, "the replica was not promoted"
            await asyncio.sleep(0.05)
        redis_cluster.wait_ok(timeout_s=30, replicas=2)
        after = await traffic(engine, 30, "b", tenants=("acme", "globex"))
        consume(30)
    finally:
        await store.close()
    # The promoted master has no replica of its own (one replica per master), so
    # every WAIT since is short: answered as usual and counted, as documented.
    assert store.short_waits > 0
    reader = redis_cluster.admin(replica)
    entries: Any = reader.xrange(keys.stream)
    decisions = sum(1 for _, f in entries if f[b"type"] == b"decision")
    answered = len(before.permits) + before.denials + len(after.permits) + after.denials
    assert decisions == answered  # nothing answered was lost in the failover
    assert_ledger_matches_stream(ledger, reader)
    ids = [str(r[0]) for r in ledger.query("SELECT event_id FROM ledger_events")]
    assert sorted(ids) == sorted(i.decode() for i, _ in entries)
    ledger.close()
