"""The Redis Cluster client against a real local cluster (3 masters + 3 replicas).

Slot computation checked against the cluster's own CLUSTER KEYSLOT and against
the standard library's CRC-CCITT; calls routed to the master that owns their
keys (read back from that master directly, without redirection); a cross-slot
call refused before anything is written; a slot migrated under traffic with
nothing lost or doubled; the budget store's real scripts producing the same
stream on the cluster as on a single Redis; and, last (it changes the cluster),
a master killed with -9 while calls keep coming.
"""

from __future__ import annotations

import asyncio
import binascii
import pathlib
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from keel_pdp.budget.cluster import (
    ClusterClient,
    CrossSlotError,
    call_slot,
    command_keys,
    crc16,
    describe_cluster_url,
    hash_tag,
    is_cluster_url,
    key_slot,
    parse_cluster_url,
)
from keel_pdp.budget.keys import KeySpace, with_shard
from keel_pdp.budget.resp import RespClient, RespConnectionError, RespError, RespNotSent, Shared
from keel_pdp.budget.store import (
    BudgetStore,
    HoldCandidate,
    HoldRequest,
    StoreUnavailable,
    hold_shape,
)
from keel_pdp.decision import AuthorizeInput, Code, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from tests.helpers import budget, reference_slot, write_bundle
from tests.integration.cluster_fixture import RedisCluster, migrate_slot, redis_cluster
from tests.integration.conftest import ledger_bundle, stream_totals, traffic

__all__ = ["redis_cluster"]

pytestmark = pytest.mark.redis

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
# Adds ARGV[1] to every key; all or nothing (a script runs on one node, atomically).
INCR_ALL = """
for i, k in ipairs(KEYS) do redis.call('INCRBY', k, ARGV[1]) end
return #KEYS
"""
STORE_FAILURES = (TimeoutError, RespError, OSError)  # what BudgetStore maps to StoreUnavailable


def sample_keys(n: int, seed: int = 15) -> list[str]:
    rnd = random.Random(seed)
    alphabet = "abcXYZ019{}:_-é€ "
    keys = ["", "{", "}", "{}", "{}x", "x{}", "{{a}}", "a{b}{c}", "a{}{b}", "}{a}", "{a}}",
            "{ü}", "€{€}", "123456789", "keel:{pdp}:events", "foo{bar}baz", "{user1000}.a"]
    ks = KeySpace("t")
    keys += [ks.stream, ks.expiries, ks.idempotency("acme", "r-1"), ks.permit("pmt_" + "a" * 28),
             ks.window("org", ("acme", "chat"), 1_700_000_000_000)]
    while len(keys) < n:
        size = rnd.randint(1, 24)
        keys.append("".join(rnd.choice(alphabet) for _ in range(size)))
    return keys


def tags_per_master(cluster: RedisCluster, per_master: int) -> dict[int, list[str]]:
    """Hash tags whose slots sit on each master (the cluster says which)."""
    out: dict[int, list[str]] = {p: [] for p in cluster.masters()}
    i = 0
    while min(len(v) for v in out.values()) < per_master:
        tag = f"tenant-{i}"
        owner = cluster.owner(reference_slot(tag.encode()))
        if len(out[owner]) < per_master:
            out[owner].append(tag)
        i += 1
    return out


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    c = ClusterClient.from_url(redis_cluster.url)
    try:
        yield c
    finally:
        await c.close()


# ------------------------------------------------------------------ no cluster needed
def test_crc16_is_redis_clusters_crc() -> None:
    # The check value the Redis Cluster specification gives for "123456789".
    assert crc16(b"123456789") == 0x31C3
    rnd = random.Random(1)
    for _ in range(2000):
        data = rnd.randbytes(rnd.randint(0, 40))
        assert crc16(data) == binascii.crc_hqx(data, 0)


def test_key_slot_follows_the_hash_tag_rules() -> None:
    for key in sample_keys(3000):
        assert key_slot(key) == reference_slot(key.encode()), key
        assert key_slot(key.encode()) == reference_slot(key.encode()), key
    assert hash_tag("a{b}{c}") == "b"
    assert hash_tag("{}x") == "{}x"  # an empty tag hashes the whole key
    assert key_slot(b"\xff{\xfe}") == reference_slot(b"\xfe")  # not UTF-8: bytes as they are


def test_cluster_url_forms_and_clear_errors() -> None:
    cfg = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert cfg.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (cfg.node.username, cfg.node.password, cfg.node.ssl_context) == ("u", "p@ss", None)
    tls = parse_cluster_url("rediss+cluster://h1:1,h2:2?ssl_cert_reqs=none",
                            connect_timeout_s=0.3)
    assert tls.node.ssl_context is not None and tls.node.connect_timeout_s == 0.3
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1")
    assert describe_cluster_url("rediss+cluster://u:secret@h1:1,[::1]:2/?password=x") == \
        "cluster h1:1,[::1]:2"
    bad = {
        "redis://h1:1,h2:2/": "redis+cluster://h1:p1,h2:p2",
        "redis+cluster:///": "names no seed node",
        "redis+cluster://h1:1,,h2:2": "empty seed node",
        "redis+cluster://h1:70000": "port '70000'",
        "redis+cluster://h1:x": "port 'x'",
        "redis+cluster://:7000": "has no host",
        "redis+cluster://::1:7000": "[address]:port",
        "redis+cluster://h1:1/3": "only database 0",
        "redis+cluster://h1:1/?db=2": "only database 0",
        "redis+cluster://h1:1/?cluster=true": "unknown parameter(s) cluster",
    }
    for url, message in bad.items():
        with pytest.raises(ValueError, match=None) as info:
            parse_cluster_url(url)
        assert message in str(info.value), (url, str(info.value))


def test_cross_slot_keys_are_named_in_the_refusal() -> None:
    assert call_slot([]) is None
    assert call_slot(["{a}1", "{a}2", "x{a}"]) == key_slot("a")
    with pytest.raises(CrossSlotError) as info:
        call_slot(["{a}1", "{a}2", "{b}1"])
    text = str(info.value)
    assert "2 slots" in text and "'{b}1'" in text and "'{a}1'" in text
    assert not isinstance(info.value, STORE_FAILURES)  # never mistaken for an outage
    assert command_keys(("HMGET", "k", "f1", "f2")) == ["k"]
    assert command_keys(("MGET", "a", "b")) == ["a", "b"]
    assert command_keys(("EVALSHA", "0" * 40, 2, "k1", "k2", "v")) == ["k1", "k2"]
    assert command_keys(("MSET", "a", 1, "b", 2)) == ["a", "b"]
    assert command_keys(("PING",)) == []


async def test_only_a_command_never_written_is_marked_safe_to_send_elsewhere(
        redis_url: str) -> None:
    # The cluster client re-sends RespNotSent only; a command lost after it was
    # written must not look like one.
    from tests.conftest import free_port

    nowhere = RespClient.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RespNotSent):
            await nowhere.command("INCR", "k", timeout_s=1)
        with pytest.raises(RespNotSent, match="next connect attempt"):
            await nowhere.command("INCR", "k", timeout_s=1)  # in back-off
    finally:
        await nowhere.close()
    client = RespClient.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        assert await client.command("PING", timeout_s=1) == b"PONG"
        waiting = asyncio.ensure_future(client.command("BLPOP", "never", 5, timeout_s=5))
        await asyncio.sleep(0.1)
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # type: ignore[no-untyped-call]
        with pytest.raises(RespConnectionError) as info:
            await waiting
        assert not isinstance(info.value, RespNotSent)
    finally:
        admin.close()
        await client.close()
    with pytest.raises(RespNotSent):
        await client.command("PING", timeout_s=1)  # closed


# ------------------------------------------------------------------ the real cluster
def test_the_fixture_is_three_masters_each_with_a_replica(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert len({redis_cluster.replica_of(m) for m in masters}) == 3
    assert redis_cluster.started_s < 30


def test_slots_agree_with_cluster_keyslot(redis_cluster: RedisCluster) -> None:
    keys = sample_keys(2000, seed=7)
    pipe = redis_cluster.admin(redis_cluster.masters()[0]).pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
    theirs = pipe.execute()
    mismatches = [(k, key_slot(k), t) for k, t in zip(keys, theirs, strict=True)
                  if key_slot(k) != int(t)]
    assert mismatches == []
    assert len(set(theirs)) > 1000  # the sample covers the slot space, not a few slots


async def test_calls_reach_the_master_owning_their_slot_in_one_round_trip(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    tags = tags_per_master(redis_cluster, 4)
    incr = client.script(INCR)
    incr_all = client.script(INCR_ALL)
    calls: list[Any] = []
    expected: Counter[str] = Counter()
    for owner, owned in tags.items():
        for tag in owned:
            for j in range(25):
                key = f"c:{{{tag}}}:n{j % 3}"
                calls.append(client.eval_script(incr, [key], [j + 1], timeout_s=5))
                expected[key] += j + 1
            keys = [f"c:{{{tag}}}:all{j}" for j in range(3)]
            calls.append(client.eval_script(incr_all, keys, [7], timeout_s=5))
            expected.update({k: 7 for k in keys})
            calls.append(client.command("SET", f"c:{{{tag}}}:owner", owner, timeout_s=5))
    await asyncio.gather(*calls)
    assert sorted(p for _, p in client.masters) == sorted(redis_cluster.masters())
    for owner, owned in tags.items():
        direct = redis_cluster.admin(owner)  # no redirection: the key must be here
        for tag in owned:
            assert direct.get(f"c:{{{tag}}}:owner") == str(owner).encode()
            assert client.owner_of(f"{{{tag}}}") == ("127.0.0.1", owner)
    for key, total in expected.items():
        owner = redis_cluster.owner(reference_slot(key.encode()))
        assert int(redis_cluster.admin(owner).get(key) or 0) == total, key
        assert await client.command("GET", key, timeout_s=5) == str(total).encode()
    # Every master took part and no call needed a redirect or a second try: with
    # the map known a call is one write and one reply.
    assert all(v == 0 for v in client.redirects.values()), client.redirects
    assert client.refreshes == 1 and client.connects == 3


async def test_a_cross_slot_call_is_refused_and_writes_nothing(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    incr_all = client.script(INCR_ALL)
    tags = tags_per_master(redis_cluster, 1)
    a, b = (f"x:{{{owned[0]}}}" for owned in list(tags.values())[:2])
    with pytest.raises(CrossSlotError, match="span 2 slots"):
        await client.eval_script(incr_all, [a, b], [1], timeout_s=5)
    with pytest.raises(CrossSlotError):
        await client.command("MGET", a, b, timeout_s=5)
    # The keys a request shape shares and the request's own keys are checked together.
    shape = Shared.of([a + ":w1", a + ":w2"], [1])
    assert await client.eval_script(incr_all, [a + ":own"], [], timeout_s=5, shared=shape) == 3
    with pytest.raises(CrossSlotError, match=re.escape(repr(b + ":own"))):
        await client.eval_script(incr_all, [b + ":own"], [], timeout_s=5, shared=shape)
    with pytest.raises(CrossSlotError):
        await client.eval_script(incr_all, [], [], timeout_s=5, shared=Shared.of([a, b], [1]))
    assert redis_cluster.admin(redis_cluster.owner(reference_slot(b.encode()))).exists(
        b + ":own") == 0
    for key in (a, b):
        assert redis_cluster.admin(redis_cluster.owner(reference_slot(key.encode()))).exists(
            key) == 0
    # A store built on it lets the error through: a layout bug is not "Redis down".
    store = BudgetStore(None, KeySpace("t"), 1.0, transport=client)
    with pytest.raises(CrossSlotError):
        await store.grant(f"{{{next(iter(tags.values()))[0]}}}:grants", "g1", 5,
                          2_000_000_000_000, 0, "{}")


async def test_scripts_flushed_on_every_master_are_reloaded_per_node(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    incr = client.script(INCR)
    tags = tags_per_master(redis_cluster, 1)
    keys = [f"f:{{{owned[0]}}}" for owned in tags.values()]
    for k in keys:
        assert await client.eval_script(incr, [k], [1], timeout_s=5) == 1
    for port in redis_cluster.masters():
        redis_cluster.admin(port).script_flush()
    for k in keys:
        assert await client.eval_script(incr, [k], [1], timeout_s=5) == 2
    assert await client.command("SCRIPT", "EXISTS", incr.sha, timeout_s=5) == [1]


async def test_a_slot_migrated_under_traffic_loses_nothing_and_doubles_nothing(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    tag = "migrating"
    slot = key_slot(tag)
    source = redis_cluster.owner(slot)
    target = next(m for m in redis_cluster.masters() if m != source)
    incr, incr_all = client.script(INCR), client.script(INCR_ALL)
    singles = [f"m:{{{tag}}}:{i}" for i in range(40)]
    groups = [[f"m:{{{tag}}}:g{g}:{i}" for i in range(3)] for g in range(5)]
    for k in singles:  # keys to migrate from the start
        await client.eval_script(incr, [k], [1], timeout_s=5)
    sent: Counter[str] = Counter({k: 1 for k in singles})
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        rnd = random.Random(w)
        while not stop.is_set():
            try:
                if rnd.random() < 0.7:
                    key = rnd.choice(singles)
                    await client.eval_script(incr, [key], [1], timeout_s=5)
                    sent[key] += 1
                else:
                    keys = rnd.choice(groups)
                    await client.eval_script(incr_all, keys, [1], timeout_s=5)
                    sent.update(keys)
            except Exception as exc:
                errors.append(exc)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(w)) for w in range(16)]
    try:
        moved = await migrate_slot(redis_cluster, slot, source, target, pause_s=0.02)
        await asyncio.sleep(0.2)  # traffic after the move: MOVED, then the new map
    finally:
        stop.set()
        await asyncio.gather(*workers)
    print(f"migration: {sum(sent.values())} increments, {moved} keys moved, "
          f"client {client.redirects}")
    assert errors == []
    assert moved >= len(singles)
    assert redis_cluster.owner(slot) == target
    # Nothing lost, nothing applied twice: each key holds exactly what was sent,
    # and all of it is on the new owner.
    direct = redis_cluster.admin(target)
    for key, total in sent.items():
        assert int(direct.get(key) or 0) == total, key
    assert redis_cluster.cmd(source, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert client.redirects["ASK"] + client.redirects["TRYAGAIN"] > 0, client.redirects
    assert client.redirects["MOVED"] > 0, client.redirects
    assert client.owner_of(f"{{{tag}}}") == ("127.0.0.1", target)


async def test_ask_to_a_node_that_lost_its_scripts_loads_them_there(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    tag = "ask-noscript"
    slot = key_slot(tag)
    source = redis_cluster.owner(slot)
    target = next(m for m in redis_cluster.masters() if m != source)
    incr = client.script(INCR)
    # Connect to every master (each loads the scripts), then empty the target's cache.
    for owned in tags_per_master(redis_cluster, 1).values():
        await client.eval_script(incr, [f"warm:{{{owned[0]}}}"], [1], timeout_s=5)
    redis_cluster.admin(target).script_flush()
    key = f"a:{{{tag}}}"
    redis_cluster.cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING",
                      redis_cluster.node_id(source))
    redis_cluster.cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING",
                      redis_cluster.node_id(target))
    try:
        # The key is on neither node: the source answers ASK, the target NOSCRIPT.
        assert await client.eval_script(incr, [key], [5], timeout_s=5) == 5
        assert await client.eval_script(incr, [key], [5], timeout_s=5) == 10
        assert await client.command("GET", key, timeout_s=5) == b"10"
    finally:
        for port in redis_cluster.masters():
            redis_cluster.cmd(port, "CLUSTER", "SETSLOT", slot, "NODE",
                              redis_cluster.node_id(target))
    assert client.redirects["ASK"] == 3, client.redirects
    assert client.redirects["MOVED"] == 0  # an ASK leaves the map alone
    assert redis_cluster.admin(target).get(key) == b"10"
    redis_cluster.wait_ok()


async def test_a_written_call_that_times_out_is_never_sent_again(
        redis_cluster: RedisCluster, client: ClusterClient) -> None:
    # Peers double-applied increments by retrying in cluster mode. A call that
    # reached Redis and did not answer in time may have run: it fails, once.
    slow_incr = client.script("""
redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + 300000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 1
""")
    key = "slow:{once}"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.eval_script(slow_incr, [key], [], timeout_s=0.1)
    assert time.monotonic() - started < 0.2
    await asyncio.sleep(0.4)
    assert await client.command("GET", key, timeout_s=5) == b"1"
    assert all(v == 0 for k, v in client.redirects.items()), client.redirects


async def test_dead_seeds_are_skipped_and_all_dead_is_a_clear_fast_error(
        redis_cluster: RedisCluster) -> None:
    from tests.conftest import free_port

    dead = free_port()
    live = redis_cluster.nodes[2].address
    c = ClusterClient.from_url(f"redis+cluster://127.0.0.1:{dead},{live}/")
    try:
        assert await c.command("SET", "seed:{x}", "1", timeout_s=5) == b"OK"
        assert len(c.masters) == 3
    finally:
        await c.close()
    nobody = ClusterClient.from_url(f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{free_port()}")
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match=f"127.0.0.1:{dead}") as info:
            await nobody.command("GET", "k", timeout_s=1)
        assert "CLUSTER SLOTS" in str(info.value)
        assert time.monotonic() - started < 1.0
    finally:
        await nobody.close()
    late = ClusterClient.from_url(redis_cluster.url)
    try:
        with pytest.raises(TimeoutError):  # no time even to read the map: no hang
            await late.command("GET", "k", timeout_s=0.00001)
        assert await late.command("GET", "never:{set}", timeout_s=5) is None
    finally:
        await late.close()
    with pytest.raises(OSError):
        await late.command("GET", "k", timeout_s=1)


async def _engine_traffic(store: BudgetStore, bundle: pathlib.Path, tag: str) -> None:
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    engine = Engine(holder, store, Metrics())
    out = await traffic(engine, 60, tag)
    assert out.permits and out.denials


async def test_the_budget_stores_scripts_run_unchanged_on_the_cluster(
        redis_cluster: RedisCluster, client: ClusterClient, redis_url: str,
        tmp_path: pathlib.Path) -> None:
    bundle = ledger_bundle(tmp_path / "bundle")
    keys = KeySpace("t")
    single = RespClient.from_url(redis_url)
    try:
        await _engine_traffic(BudgetStore(None, keys, 2.0, transport=single), bundle, "s")
    finally:
        await single.close()
    await _engine_traffic(BudgetStore(None, keys, 2.0, transport=client), bundle, "c")
    owner = redis_cluster.owner(key_slot(keys.stream))
    on_cluster = stream_totals(redis_cluster.admin(owner), keys.stream)
    on_single = stream_totals(redis.Redis.from_url(redis_url), keys.stream)
    # The same requests, decided by the same scripts: the same events and amounts.
    assert on_cluster == on_single
    assert on_cluster.events > 60 and on_cluster.held > 0 and on_cluster.actual > 0
    # Idempotent by request id on the cluster as on one node.
    store = BudgetStore(None, keys, 2.0, transport=client)
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    engine = Engine(holder, store, Metrics())
    req = AuthorizeInput("replayed", "acme", "chat", "gpt-4o-mini", "openai", 100, 50)
    first, again = await engine.authorize(req), await engine.authorize(req)
    assert first.permit_id and again.permit_id == first.permit_id and again.replayed
    state = await store.permit(first.permit_id)
    assert state is not None and state.state == "held"


# ------------------------------------------------------------------ last: it changes the cluster
async def test_a_replay_whose_permit_moved_before_its_record_is_refused_not_handed_out(
        redis_cluster: RedisCluster) -> None:
    # A replay reads the earlier permit under a key only its record names (same
    # slot). Mid-migration, with the permit already on the new owner and the record
    # not, Redis refuses that read: the Authorize fails as a store error, writes
    # nothing, and the permit is replayed as usual once the slot has moved.
    store = BudgetStore.from_url(redis_cluster.url, prefix="mig", timeout_s=5.0)
    ks = store.keys
    shard = ks.tenant_shard("acme")
    shape = hold_shape((ks.window("b", ("acme",), 0, shard),),
                       (ks.grants("b", ("acme",), shard),), (10**12,), (True,),
                       (4_000_000_000,), ((),), idempotency_ttl_s=600,
                       permit_retention_s=600, min_output_tokens=1)
    now = int(time.time() * 1000)

    def request(n: int) -> HoldRequest:
        return HoldRequest(
            permit_id="pmt_" + with_shard(f"{n:028x}", shard, ks.shards),
            idempotency_key=ks.idempotency("acme", "r-1"), fingerprint="fp", now_ms=now,
            expires_at_ms=now + 60_000, event_data="{}", shape=shape,
            candidates=(HoldCandidate(0, 1_000_000, 10, False, "{}", (0,), 100),))

    try:
        first = await store.hold(request(1))
        assert first.decision == "ALLOW"
        permit_key = ks.permit(first.permit_id)
        slot = key_slot(permit_key)
        assert slot == key_slot(ks.idempotency("acme", "r-1"))
        source = redis_cluster.owner(slot)
        target = next(m for m in redis_cluster.masters() if m != source)
        redis_cluster.cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING",
                          redis_cluster.node_id(source))
        redis_cluster.cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING",
                          redis_cluster.node_id(target))
        try:
            redis_cluster.cmd(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000,
                              "KEYS", permit_key)
            events_before = redis_cluster.admin(source).xlen(ks.stream_of(first.permit_id))
            with pytest.raises(StoreUnavailable):
                await store.hold(request(2))
            assert redis_cluster.admin(source).xlen(
                ks.stream_of(first.permit_id)) == events_before
        finally:
            keys = redis_cluster.cmd(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if keys:
                redis_cluster.cmd(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                  "KEYS", *keys)
            for port in redis_cluster.masters():
                redis_cluster.cmd(port, "CLUSTER", "SETSLOT", slot, "NODE",
                                  redis_cluster.node_id(target))
        assert not redis_cluster.admin(target).exists(ks.permit(request(2).permit_id))
        assert redis_cluster.admin(target).xlen(ks.stream_of(first.permit_id)) == events_before
        again = await store.hold(request(3))
        assert (again.outcome, again.permit_id) == ("replay", first.permit_id)
    finally:
        await store.close()
        redis_cluster.wait_ok()


async def test_a_master_killed_mid_traffic_fails_calls_within_their_timeout_then_recovers(
        redis_cluster: RedisCluster, client: ClusterClient, tmp_path: pathlib.Path) -> None:
    # The victim is the master of Keel's own slot: raw script calls and real
    # Authorize calls (one fail-open tenant, one fail-closed) run through the kill.
    keys = KeySpace("t")
    slot = key_slot(keys.stream)
    victim = redis_cluster.owner(slot)
    heir = redis_cluster.replica_of(victim)
    incr = client.script(INCR)
    key = "fo:{pdp}"
    timeout = 0.2
    bundle = write_bundle(tmp_path / "b", [
        budget("open-org", "1000", fail_mode="open"),
        budget("closed-team", "100", fail_mode="closed", scope={"tenant": "strict"})])
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    engine = Engine(holder, BudgetStore(None, keys, timeout, transport=client), Metrics())
    n = 0

    async def authorize(tenant: str) -> tuple[float, Any]:
        nonlocal n
        n += 1
        started = time.monotonic()
        out = await engine.authorize(AuthorizeInput(
            f"fo-{n}", tenant, "chat", "gpt-4o-mini", "openai", 100, 20), deadline_s=timeout)
        return time.monotonic() - started, out

    for tenant in ("acme", "strict"):
        assert (await authorize(tenant))[1].decision is DecisionKind.ALLOW
    assert await client.eval_script(incr, [key], [1], timeout_s=1) == 1
    # A key on another master: not lost, but the cluster may refuse it for a moment.
    bystander = next(f"by:{{{t}}}" for t in (f"b{i}" for i in range(1000))
                     if redis_cluster.owner(key_slot(t)) != victim)
    elsewhere: list[tuple[float, BaseException | None]] = []
    # The replica has everything written so far. (Not WAIT from another
    # connection: WAIT covers only its own connection's writes. Without this, a
    # write the master acknowledged but had not replicated is lost with it: seen.)
    redis_cluster.wait_replicated(victim, heir)
    ok = 1
    failures: list[tuple[float, BaseException]] = []
    answers: list[tuple[str, float, Any]] = []
    redis_cluster.node(victim).kill()
    killed = time.monotonic()
    recovered_after: float | None = None
    while time.monotonic() - killed < 20:
        started = time.monotonic()
        try:
            await client.eval_script(incr, [key], [1], timeout_s=timeout)
            ok += 1
            if recovered_after is None:
                recovered_after = time.monotonic() - killed
            if ok >= 20:
                break
        except Exception as exc:
            failures.append((time.monotonic() - started, exc))
            assert recovered_after is None, f"failed again after recovering: {exc!r}"
        if recovered_after is None:
            for tenant in ("acme", "strict"):
                answers.append((tenant, *await authorize(tenant)))
            started = time.monotonic()
            try:
                await client.eval_script(incr, [bystander], [1], timeout_s=timeout)
                elsewhere.append((time.monotonic() - started, None))
            except Exception as exc:
                elsewhere.append((time.monotonic() - started, exc))
        await asyncio.sleep(0.01)
    assert recovered_after is not None, f"never recovered: {failures[-3:]}"
    assert failures, "the kill was not noticed"
    wrong = [e for _, e in failures if not isinstance(e, STORE_FAILURES)]
    assert wrong == []
    slowest = max(d for d, _ in failures)
    slowest_answer = max(d for _, d, _ in answers)
    kinds = Counter(type(e).__name__ for _, e in failures)
    unavailable = Counter((t, o.decision.name) for t, _, o in answers
                          if any(r.code is Code.STORE_UNAVAILABLE for r in o.reasons))
    refused = [e for _, e in elsewhere if e is not None]
    assert [e for e in refused if not isinstance(e, STORE_FAILURES)] == []
    slowest_elsewhere = max(d for d, _ in elsewhere)
    print(f"failover, another master: {len(elsewhere) - len(refused)} of {len(elsewhere)} "
          f"calls answered, refused: {dict(Counter(str(e)[:60] for e in refused))}, "
          f"slowest {slowest_elsewhere * 1000:.0f} ms")
    assert slowest_elsewhere < timeout + 0.1, slowest_elsewhere
    print(f"failover: {len(failures)} calls failed ({dict(kinds)}), slowest "
          f"{slowest * 1000:.0f} ms of {timeout * 1000:.0f}; first success "
          f"{recovered_after:.2f} s after the kill; client {client.redirects}; "
          f"Authorize answers {len(answers)}, slowest {slowest_answer * 1000:.0f} ms, "
          f"store unavailable: {dict(unavailable)}")
    assert slowest < timeout + 0.1, slowest  # inside the call's timeout (+ event-loop slack)
    # Every Authorize during the failover was answered inside its deadline, by
    # each budget's fail mode: the fail-open tenant admitted, the fail-closed one not.
    assert slowest_answer < timeout + 0.1, slowest_answer
    assert unavailable[("acme", "ALLOW")] > 0 and unavailable[("strict", "DENY")] > 0
    assert set(unavailable) <= {("acme", "ALLOW"), ("strict", "DENY")}
    redis_cluster.wait_ok(replicas=2)
    assert redis_cluster.owner(slot) == heir
    assert client.owner_of(keys.stream) == ("127.0.0.1", heir)
    # Written before the kill and replicated (WAIT), plus everything after: all there.
    assert int(redis_cluster.admin(heir).get(key) or 0) == ok
    for tenant in ("acme", "strict"):
        _, out = await authorize(tenant)
        assert out.decision is DecisionKind.ALLOW and not out.reasons, out
