"""Shared budgets under escrow, against a hostile caller and environment (real Redis).

Every expectation is worked out here from the price table's own figures and the
cap, not read back from the code under test:

* an exception grant on a shared budget raises the budget's cap once, whichever
  shard a tenant sits in (also the shard the shared budget lives in);
* amounts of a trillion micro-USD and more (a large organisation-wide cap) move
  through a transfer exactly, on both sides, and are answered as integers;
* what a lease spent above what it was leased (a Closeout above its hold, a late
  Closeout after the lease gave its unused part back) is charged to the shared
  budget, so the other shards cannot lease it a second time;
* a crowd of tenants in every shard, on four sidecars at once, gets exactly the
  cap, and every transfer has both its sides on the streams once;
* a cap cut in the middle of a window (open, marked xfail: the leases already
  given keep being spent).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import zlib
from decimal import Decimal
from typing import Any

import pytest
import redis

from keel_pdp import grants
from keel_pdp.budget.escrow import Parent
from keel_pdp.budget.keys import tenant_shard
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import PRICES, budget, write_bundle

pytestmark = pytest.mark.redis

PREFIX = "esch"
SHARDS = 4
INPUT, OUTPUT = 1000, 500
MODEL = "gpt-4o-mini"
PRICE = PRICES["openai"][MODEL]
# micro-USD per token = USD per million tokens, so this is exact: 150 + 300 = 450
COST = int(INPUT * Decimal(PRICE["input"]) + OUTPUT * Decimal(PRICE["output"]))


def home_of(budget_id: str) -> int:
    """The shard of a shared budget (no split), by the documented rule:
    crc32(budget id) mod shards."""
    return zlib.crc32(budget_id.encode()) % SHARDS


def tenant_in(shard: int, avoid: int | None = None) -> str:
    for i in range(1000):
        name = f"team-{i}"
        s = tenant_shard(name, SHARDS)
        if (shard >= 0 and s == shard) or (shard < 0 and s != avoid):
            return name
    raise AssertionError("no tenant found")


def engine_for(url: str, bundle: pathlib.Path, lease_idle_s: float = 10.0) -> Engine:
    store = BudgetStore.from_url(url, prefix=PREFIX, timeout_s=2.0, shards=SHARDS)
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, store, Metrics(), lease_idle_s=lease_idle_s)


def bundle_for(tmp: pathlib.Path, cap_micros: int, **kw: Any) -> pathlib.Path:
    cap = Decimal(cap_micros) / 1_000_000
    return write_bundle(tmp, [budget("org", f"{cap:.6f}", **kw)],
                        settings={"min_output_tokens": OUTPUT},
                        exception_paths=[{"name": "finance-overage", "approver_role": "finance",
                                          "max_overage_usd": "1.00",
                                          "max_duration_hours": 24}])


def ask(tag: str, i: int, tenant: str) -> AuthorizeInput:
    return AuthorizeInput(f"{tag}-{i}", tenant, "chat", MODEL, "openai", INPUT, OUTPUT)


async def admitted(engine: Engine, tag: str, n: int, tenant: str) -> list[str]:
    out = []
    for i in range(n):
        got = await engine.authorize(ask(tag, i, tenant))
        if got.decision is DecisionKind.ALLOW:
            out.append(got.permit_id)
    return out


def spent(r: Any) -> int:
    """settled + held over every lease of the shared budget, read from Redis."""
    total = 0
    for key in r.scan_iter(f"{PREFIX}:*:l:org:*"):
        f = r.hgetall(key)
        total += int(f.get(b"s", 0)) + int(f.get(b"h", 0))
    return total


def parent_of(engine: Engine) -> Parent:
    return next(p for m in engine._materials._by_shape.values()
                for p in m.parents if p is not None)


# ------------------------------------------------------------------ grants
@pytest.mark.parametrize("where", ["home shard", "other shard"])
async def test_a_grant_raises_a_shared_budget_once_in_every_shard(
        redis_url: str, tmp_path: pathlib.Path, where: str) -> None:
    """Cap: 4 requests; an approved exception of 2 requests' worth. Whatever shard
    the tenant sits in, exactly 4 + 2 requests are admitted, never 8."""
    home = home_of("org")
    tenant = tenant_in(home) if where == "home shard" else tenant_in(-1, avoid=home)
    assert (tenant_shard(tenant, SHARDS) == home) == (where == "home shard")
    bundle = bundle_for(tmp_path / "b", 4 * COST, exception_path="finance-overage")
    engine = engine_for(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    await grants.record(engine.store, load_bundle(bundle), grants.GrantRequest(
        exception_path="finance-overage", budget_id="org", scope=(),
        amount_micros=2 * COST, duration_seconds=3600, approver="fin@example.com",
        approver_role="finance", justification="quarter-end batch, approved by CFO"))
    got = await admitted(engine, "g", 12, tenant)
    assert len(got) == 6
    assert spent(r) == 6 * COST
    await engine.store.close()


# ------------------------------------------------------------------ large amounts
async def test_a_slice_of_a_large_shared_budget_moves_exactly(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """The largest cap a policy may set ($1bn, 1e15 micro-USD) on 4 shards: one
    slice is 1/8 of it, 1.25e14 micro-USD (15 digits). A refill of more than a
    slice moves exactly what it asked for on both sides, and giving it back
    returns exactly that."""
    cap = 10**15
    assert cap < 2**53
    want_slice = cap // (2 * SHARDS)
    bundle = bundle_for(tmp_path / "b", cap)
    engine = engine_for(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    tenant = tenant_in(-1, avoid=home_of("org"))
    first = await engine.authorize(ask("big", 0, tenant))
    assert first.decision is DecisionKind.ALLOW
    parent = parent_of(engine)
    assert parent.slice_micros == want_slice
    (lease_key,) = [k.decode() for k in r.scan_iter(f"{PREFIX}:*:l:org:*")]
    g0 = int(r.hget(lease_key, "g"))
    # A request as large as a slice plus one: it gets all it needs, or nothing.
    need = want_slice + 1
    got = await engine.escrow.refill(parent, lease_key, need, 1)
    assert got == need
    assert int(r.hget(lease_key, "g")) == g0 + need
    assert int(r.hget(parent.key, "l")) == g0 + need
    back = await engine.escrow.give_back(lease_key, parent.key, 2)
    assert back == g0 + need - COST
    assert int(r.hget(lease_key, "g")) == COST
    assert int(r.hget(parent.key, "l")) == COST
    await engine.store.close()


# ------------------------------------------------------------------ a lease in debt
def two_tenants_off_home() -> tuple[str, str]:
    """Two tenants in two different shards, neither the shared budget's."""
    home = home_of("org")
    a = tenant_in(-1, avoid=home)
    for i in range(1000):
        b = f"team-{i}"
        if tenant_shard(b, SHARDS) not in (home, tenant_shard(a, SHARDS)):
            return a, b
    raise AssertionError("no tenant found")


async def test_a_closeout_above_the_lease_is_charged_to_the_shared_budget(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap: 10 requests (4,500 micro-USD). Tenant A's one request is billed three
    requests' worth (1,350: above its hold, below the overrun ceiling, so booked),
    more than A's shard was leased; A then goes quiet. After the sweeper's pass,
    tenant B (another shard) may spend only what is left of the cap:
    4,500 - 1,350 = 3,150, seven requests; the budget's total stays the cap."""
    cap, over = 10 * COST, 3 * COST
    engine = engine_for(redis_url, bundle_for(tmp_path / "b", cap))
    r: Any = redis.Redis.from_url(redis_url)
    a, b = two_tenants_off_home()
    (pid,) = await admitted(engine, "a", 1, a)
    done = await engine.closeout(pid, TokenUsage(input_tokens=INPUT, output_tokens=OUTPUT),
                                 "SUCCEEDED", over)
    assert done.status == "SETTLED"
    await engine.sweep_once()
    got = await admitted(engine, "b", 20, b)
    assert len(got) == (cap - over) // COST == 7
    assert spent(r) == over + 7 * COST == cap
    await engine.store.close()


async def test_a_late_closeout_on_a_lease_given_back_is_charged_to_the_shared_budget(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap: 10 requests. Tenant A's permit is voided; A's lease, idle, is given back
    whole by the sweeper; then the provider's bill for the call arrives (a late
    Closeout books it: the provider billed it). That 450 is spent from the shared
    budget: tenant B may spend 9 requests more, not 10."""
    cap = 10 * COST
    engine = engine_for(redis_url, bundle_for(tmp_path / "b", cap), lease_idle_s=0.0)
    r: Any = redis.Redis.from_url(redis_url)
    a, b = two_tenants_off_home()
    (pid,) = await admitted(engine, "a", 1, a)
    assert (await engine.void(pid, "caller gave up")).status == "VOIDED"
    now = engine.ids.now_ms()
    await engine.sweep_once(now)  # first look: figures noted
    await engine.sweep_once(now + 1)  # unchanged since: given back
    lease = next(k for k in r.scan_iter(f"{PREFIX}:*:l:org:*"))
    assert int(r.hget(lease, "g")) == 0
    late = await engine.closeout(pid, TokenUsage(input_tokens=INPUT, output_tokens=OUTPUT),
                                 "SUCCEEDED", COST)
    assert late.status == "SETTLED_AFTER_VOID"
    await engine.sweep_once(now + 2)
    got = await admitted(engine, "b", 20, b)
    assert len(got) == (cap - COST) // COST == 9
    assert spent(r) == cap
    await engine.store.close()


async def test_two_sidecars_sweeping_the_same_debt_charge_it_once_and_both_sides_are_recorded(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """A lease owes 900 micro-USD (a Closeout of three requests' worth on one request's
    hold, of which the lease had 562 = 1/8 of the cap). Two sidecars' sweepers see
    the same figures at once: the parent books the debt once, the lease is credited
    once, and each side's stream holds one lease event of that amount."""
    cap = 10 * COST
    bundle = bundle_for(tmp_path / "b", cap)
    e1, e2 = engine_for(redis_url, bundle), engine_for(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    (pid,) = await admitted(e1, "a", 1, a)
    slice_ = cap // (2 * SHARDS)
    await e1.closeout(pid, TokenUsage(input_tokens=INPUT, output_tokens=OUTPUT), "SUCCEEDED",
                      3 * COST)
    (lease,) = [k.decode() for k in r.scan_iter(f"{PREFIX}:*:l:org:*")]
    parent = parent_of(e1)
    assert int(r.hget(lease, "g")) == slice_ == int(r.hget(parent.key, "l"))
    streams = e1.store.keys.streams
    before = {s: r.xlen(s) for s in streams}
    figures = (slice_, 3 * COST, 0)
    got = await asyncio.gather(*(e.escrow.charge_debt(lease, parent.key, figures, 1)
                                 for e in (e1, e2, e1)))
    debt = 3 * COST - slice_
    assert got == [debt] * 3
    assert int(r.hget(parent.key, "l")) == slice_ + debt == 3 * COST
    assert int(r.hget(lease, "g")) == 3 * COST
    new = [json.loads(f[b"res"]) for s in streams
           for _, f in r.xrange(s, f"({r.xrange(s)[before[s] - 1][0].decode()}"
                                if before[s] else "-")
           if f[b"type"] == b"lease"]
    assert sorted((e["dir"], e["amt"]) for e in new) == [("credit", debt), ("take", debt)]
    for e in (e1, e2):
        await e.store.close()


# ------------------------------------------------------------------ a crowd
async def test_a_crowd_of_tenants_in_every_shard_gets_exactly_the_cap_and_every_transfer_pairs(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap: 25 requests. Four sidecars, twelve tenants spread over every shard, 120
    requests at once: never more than 25 admitted. Traffic keeps coming (with the
    sweepers returning idle leases) until nothing more is admitted: exactly 25 in
    all. Every transfer id has both its sides on the streams, once each, for the
    same amount; the parent leased exactly what the leases hold."""
    n = 25
    cap = n * COST
    bundle = bundle_for(tmp_path / "b", cap)
    engines = [engine_for(redis_url, bundle, lease_idle_s=0.0) for _ in range(4)]
    r: Any = redis.Redis.from_url(redis_url)
    tenants = [f"team-{i}" for i in range(12)]
    assert {tenant_shard(t, SHARDS) for t in tenants} == set(range(SHARDS))

    async def one(i: int, tag: str) -> bool:
        got = await engines[i % 4].authorize(ask(tag, i, tenants[i % len(tenants)]))
        return got.decision is DecisionKind.ALLOW

    first = sum(await asyncio.gather(*(one(i, "burst") for i in range(120))))
    assert first <= n
    total = first
    for rnd in range(10):
        for e in engines:
            await e.sweep_once(e.ids.now_ms() + rnd)
        more = sum(await asyncio.gather(*(one(i, f"more{rnd}") for i in range(24))))
        assert total + more <= n
        total += more
        if total == n:
            break
    assert total == n
    assert spent(r) == cap
    for e in engines:  # give-backs run after their answer
        await asyncio.gather(*list(e._background))
    sides: dict[tuple[str, str], list[int]] = {}
    for s in engines[0].store.keys.streams:
        for _, f in r.xrange(s):
            if f[b"type"] == b"lease":
                res = json.loads(f[b"res"])
                sides.setdefault((f[b"pid"].decode(), res["dir"]), []).append(res["amt"])
    assert all(len(v) == 1 for v in sides.values())
    pairs = {"take": "credit", "give": "back"}
    for (tid, step), (amt,) in sides.items():
        if step in pairs:
            assert sides.get((tid, pairs[step])) == [amt], (tid, step)
        else:
            assert any(sides.get((tid, a)) == [amt] for a, b in pairs.items() if b == step)
    leased = sum(v[0] for (_, d), v in sides.items() if d == "take") - sum(
        v[0] for (_, d), v in sides.items() if d == "back")
    held = 0
    for key in r.scan_iter(f"{PREFIX}:*:l:org:*"):
        held += int(r.hget(key, "g") or 0)
    (pkey,) = list(r.scan_iter(f"{PREFIX}:*:b:org:*"))
    assert int(r.hget(pkey, "l")) == leased == held
    for e in engines:
        await e.store.close()


# ------------------------------------------------------------------ a cap cut
@pytest.mark.xfail(strict=True, reason=(
    "open: a lease keeps spending what it was leased under the old cap; a cap cut "
    "binds only the parent's next take (see docs/redis-cluster.md, escrow)"))
async def test_a_cap_cut_mid_window_binds_the_leases_already_given(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap: 200 requests; one busy tenant's lease has grown to a whole slice (1/8 of
    the cap: 25 requests' worth). Finance cuts the cap to 5 requests; the tenant
    already spent more than that, so nothing more may be admitted, as a budget in
    one shard would answer."""
    engine = engine_for(redis_url, bundle_for(tmp_path / "b", 200 * COST))
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    before = len(await admitted(engine, "pre", 8, a))
    assert before == 8
    lease = next(k for k in r.scan_iter(f"{PREFIX}:*:l:org:*"))
    assert int(r.hget(lease, "g")) - 8 * COST >= COST  # room left in the lease
    cut = bundle_for(tmp_path / "b2", 5 * COST)
    engine.policies.set(load_bundle(cut))
    after = await admitted(engine, "post", 10, a)
    assert after == []
    assert spent(r) == 8 * COST
    await engine.store.close()
