"""Shared budgets on a sharded key space: escrow, against a real Redis.

With ``shards`` > 1 a budget several tenants spend from (here an organisation-
wide cap) lives in a shard of its own and is leased, in slices, to the shards of
the tenants that spend it. Two engines (two sidecars) serve two tenants that sit
in different shards, all at once; the cap has room for exactly N requests.

The cost of a request is computed here from the price table's own figures
(decimal strings, per million tokens), not by the code under test. What must
hold:

* exactly N requests are admitted, never more (no overshoot) and, as long as
  requests keep coming, never fewer (the last slices gather where they are asked
  for: a lease that refuses gives back what it does not use);
* the parent's invariant ``settled + held + leased <= cap`` holds at every look
  while the traffic runs, and once it is over every lease's use is within what
  it was leased, and what the leases hold adds up to what the parent leased;
* every transfer is on the streams on both sides (take/credit, give/back), and
  the ledger writer, reading every shard's stream, stores each event once;
* a lease left idle is given back by the sweeper.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from decimal import Decimal
from typing import Any

import pytest
import redis

from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.ledger.store import open_store
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import PRICES, budget, record_authorize_calls, write_bundle

pytestmark = pytest.mark.redis

PREFIX = "esc"
SHARDS = 8
N = 20
INPUT, OUTPUT = 1000, 500
MODEL = "gpt-4o-mini"


def request_cost_micros() -> int:
    """Input tokens x input price + max output x output price, USD per million
    tokens as the price table writes them: micro-USD per token, exactly."""
    price = PRICES["openai"][MODEL]
    cost = INPUT * Decimal(price["input"]) + OUTPUT * Decimal(price["output"])
    assert cost == cost.to_integral_value()
    return int(cost)


def tenants_in_two_shards() -> tuple[str, str]:
    """Two tenants whose keys sit in different shards (read back from the key names
    the engine writes, below)."""
    from keel_pdp.budget.keys import tenant_shard
    names = [f"team-{i}" for i in range(50)]
    a = names[0]
    b = next(n for n in names if tenant_shard(n, SHARDS) != tenant_shard(a, SHARDS))
    return a, b


def engine_for(url: str, bundle: pathlib.Path, lease_idle_s: float = 10.0) -> Engine:
    store = BudgetStore.from_url(url, prefix=PREFIX, timeout_s=2.0, shards=SHARDS)
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, store, Metrics(), lease_idle_s=lease_idle_s)


def parent_and_leases(r: Any) -> tuple[dict[str, int], list[dict[str, int]]]:
    parents = [k for k in r.scan_iter(f"{PREFIX}:*:b:org:0::*")]
    assert len(parents) == 1, parents
    p = {k.decode(): int(v) for k, v in r.hgetall(parents[0]).items()
         if k.decode() in ("s", "h", "l")}
    leases = []
    for k in r.scan_iter(f"{PREFIX}:*:l:org:0::*"):
        leases.append({f.decode(): int(v) for f, v in r.hgetall(k).items()
                       if f.decode() in ("g", "s", "h")})
    return p, leases


@pytest.fixture
def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    cap = Decimal(N * request_cost_micros()) / 1_000_000
    # min_output_tokens = the requested maximum: a request is held in full or denied
    # (no smaller constrained hold), so "admitted" counts whole requests.
    return write_bundle(tmp_path / "b", [budget("org", f"{cap:.6f}")],
                        settings={"min_output_tokens": OUTPUT})


async def test_exactly_n_admitted_across_shards_and_sidecars(
        redis_url: str, bundle: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cost = request_cost_micros()
    cap = N * cost
    t1, t2 = tenants_in_two_shards()
    e1, e2 = engine_for(redis_url, bundle), engine_for(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    looks: list[tuple[dict[str, int], list[dict[str, int]]]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            looks.append(parent_and_leases(r) if list(r.scan_iter(f"{PREFIX}:*:b:org:*"))
                         else ({}, []))
            await asyncio.sleep(0.005)

    async def send(engine: Engine, tenant: str, n: int, tag: str) -> list[str]:
        out = []
        for i in range(n):
            got = await engine.authorize(AuthorizeInput(
                f"{tag}-{i}", tenant, "chat", MODEL, "openai", INPUT, OUTPUT))
            out.append(str(got.decision) if got.decision is not DecisionKind.DENY
                       else "DENY:" + got.reasons[0].code.name)
        return out

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            send(e1, t1, 2 * N, "a1"), send(e2, t1, 2 * N, "a2"),
            send(e1, t2, 2 * N, "b1"), send(e2, t2, 2 * N, "b2"))
    finally:
        stop.set()
        await watcher
    decisions = [d for rs in results for d in rs]
    assert decisions.count("ALLOW") == N, sorted(set(decisions))
    assert set(decisions) <= {"ALLOW", "DENY:BUDGET_EXHAUSTED"}, set(decisions)
    # Both tenants were served (their shards both leased).
    assert "ALLOW" in results[0] + results[1] and "ALLOW" in results[2] + results[3]

    # The parent's invariant at every look, and its figures at the end.
    assert looks
    for parent, _leases in looks:
        if parent:
            assert parent.get("s", 0) + parent.get("h", 0) + parent.get("l", 0) <= cap
    await asyncio.sleep(0.2)  # the refusals' give-backs run after their answers
    parent, leases = parent_and_leases(r)
    assert len(leases) == 2
    assert sum(x.get("h", 0) + x.get("s", 0) for x in leases) == N * cost
    for x in leases:
        assert x.get("h", 0) + x.get("s", 0) <= x["g"]
    assert sum(x["g"] for x in leases) == parent["l"] <= cap

    # Every transfer on both sides' streams; the writer stores each event once.
    keys = e1.store.keys
    lease_events = [(f[b"pid"].decode(), f[b"res"].decode())
                    for s in keys.streams for _id, f in r.xrange(s)
                    if f[b"type"] == b"lease"]
    by_transfer: dict[str, list[str]] = {}
    for tid, res in lease_events:
        by_transfer.setdefault(tid, []).append(res.split('"dir":"')[1].split('"')[0])
    assert by_transfer
    for tid, steps in by_transfer.items():
        assert sorted(steps) in (["credit", "take"], ["back", "give"]), (tid, steps)

    db = tmp_path / "ledger.db"
    store = open_store(f"sqlite:///{db}")
    writer = LedgerWriter(WriterConfig(key_prefix=PREFIX, shards=SHARDS, block_ms=10,
                                       consumer="w1", trim=False),
                          store, redis.Redis.from_url(redis_url))
    for _ in range(50):
        if writer.step() == 0:
            break
    on_streams = sum(r.xlen(s) for s in keys.streams)
    con = sqlite3.connect(db)
    stored = con.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM ledger_events"
                         ).fetchone()
    assert stored == (on_streams, on_streams)
    decisions_stored = con.execute(
        "SELECT COUNT(*) FROM ledger_events WHERE etype = 'decision'").fetchone()[0]
    assert decisions_stored == len(decisions)
    assert con.execute("SELECT COUNT(*) FROM ledger_events WHERE etype = 'lease'"
                       ).fetchone()[0] == len(lease_events)
    # Again: nothing new, nothing twice.
    assert writer.step() == 0
    assert con.execute("SELECT COUNT(*) FROM ledger_events").fetchone()[0] == on_streams
    for e in (e1, e2):
        await e.store.close()


async def test_idle_leases_are_given_back_and_closeouts_settle_in_the_lease(
        redis_url: str, bundle: pathlib.Path) -> None:
    cost = request_cost_micros()
    t1, _ = tenants_in_two_shards()
    engine = engine_for(redis_url, bundle, lease_idle_s=0.01)
    r: Any = redis.Redis.from_url(redis_url)
    got = await engine.authorize(AuthorizeInput("x-1", t1, "chat", MODEL, "openai",
                                                INPUT, OUTPUT))
    assert got.decision is DecisionKind.ALLOW
    parent, leases = parent_and_leases(r)
    (lease,) = leases
    assert lease["h"] == cost and lease["g"] >= cost and parent["l"] == lease["g"]
    # The provider used less: settled in the lease, the rest of the hold freed.
    usage = TokenUsage(input_tokens=INPUT, output_tokens=100)
    done = await engine.closeout(got.permit_id, usage, "SUCCEEDED", None)
    assert done.status == "SETTLED"
    actual = int(INPUT * Decimal(PRICES["openai"][MODEL]["input"])
                 + 100 * Decimal(PRICES["openai"][MODEL]["output"]))
    parent, (lease,) = parent_and_leases(r)
    assert (lease.get("s", 0), lease.get("h", 0)) == (actual, 0)
    # Idle: the first sweep notes the figures, the next (unchanged) gives back the
    # unused part; the parent then leases only what was spent.
    await engine.sweep_once()
    await asyncio.sleep(0.02)
    await engine.sweep_once()
    parent, (lease,) = parent_and_leases(r)
    assert lease["g"] == actual and parent["l"] == actual
    # A give-back with nothing left to give moves nothing and writes no event.
    before = sum(r.xlen(s) for s in engine.store.keys.streams)
    await asyncio.sleep(0.02)
    await engine.sweep_once()
    await asyncio.sleep(0.02)
    await engine.sweep_once()
    assert sum(r.xlen(s) for s in engine.store.keys.streams) == before
    await engine.store.close()


async def test_a_first_call_that_refills_its_lease_stores_its_shape_copy_once(
        redis_url: str, bundle: pathlib.Path) -> None:
    """A shape's first call sends its stored copy; when the script answers "lease"
    (before it reaches the copy) the copy goes again with the call after the refill,
    so the refill costs no further round trip."""
    engine = engine_for(redis_url, bundle)
    calls = record_authorize_calls(engine)
    t1, _ = tenants_in_two_shards()
    got = await engine.authorize(AuthorizeInput("first", t1, "chat", MODEL, "openai",
                                                INPUT, OUTPUT))
    assert got.decision is DecisionKind.ALLOW
    assert calls == ["lease", "decided"]
    r: Any = redis.Redis.from_url(redis_url)
    copies = list(r.scan_iter(f"{PREFIX}:*:shape:*"))
    assert len(copies) == 1
    assert engine.escrow.refills == 1
