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
* a cap cut in the middle of a window binds the leases already given: their
  unused part goes back (on the reload, or by the sweeper of any sidecar, one
  started after the cut too, once however many sweep), and the next refill
  applies the new cap; a cap raised gives nothing back.
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
from keel_pdp.budget.escrow import Escrow, Parent
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
OLD_CAP, NEW_CAP = 200 * COST, 5 * COST
# The lease's first refill asks for 32 requests' worth, up to a slice: 1/(2 x 4
# shards) of the old cap, 25 requests' worth. Eight requests spend 8 of it.
SLICE = OLD_CAP // (2 * SHARDS)
SPENT = 8 * COST
UNUSED = SLICE - SPENT  # what the lease holds above what it spent: 17 requests' worth


def lease_events(r: Any, streams: tuple[str, ...], since: dict[str, int]
                 ) -> list[tuple[str, str, int]]:
    """(transfer id, step, amount) of each lease event appended since ``since``
    (stream -> its length then)."""
    out = []
    for s in streams:
        for _, f in r.xrange(s)[since.get(s, 0):]:
            if f[b"type"] == b"lease":
                res = json.loads(f[b"res"])
                out.append((f[b"pid"].decode(), res["dir"], res["amt"]))
    return out


async def spend_under_the_old_cap(engine: Engine, tenant: str, r: Any) -> str:
    """Eight requests under the old cap; returns the lease key, checked to hold a
    whole slice, 17 requests of it unused."""
    assert len(await admitted(engine, "pre", 8, tenant)) == 8
    (lease,) = [str(k.decode()) for k in r.scan_iter(f"{PREFIX}:*:l:org:*")]
    assert int(r.hget(lease, "g")) == SLICE
    assert int(r.hget(lease, "c")) == OLD_CAP  # the cap its refill was leased under
    return lease


def assert_given_back_once(r: Any, engine: Engine, lease: str,
                           since: dict[str, int]) -> None:
    """The lease's unused part went back to the parent once: one give and one back
    of the same transfer, for exactly that amount; the parent's leased and the
    lease's leased are what was spent."""
    parent = parent_of(engine)
    events = lease_events(r, engine.store.keys.streams, since)
    (give,) = [e for e in events if e[1] == "give"]
    assert give[2] == UNUSED
    assert sorted(events) == sorted([give, (give[0], "back", UNUSED)])
    assert int(r.hget(lease, "g")) == SPENT
    assert int(r.hget(parent.key, "l")) == SPENT


async def test_a_cap_cut_mid_window_binds_the_leases_already_given(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap: 200 requests; one busy tenant's lease has grown to a whole slice (1/8 of
    the cap: 25 requests' worth) and the tenant spent 8 of it. Finance cuts the
    cap to 5 requests (a policy reload); the tenant already spent more than that,
    so nothing more may be admitted, as a budget in one shard would answer: the
    lease gives its 17 unused requests' worth back before the first request under
    the new policy holds, and the refill that request asks for applies the cut."""
    engine = engine_for(redis_url, bundle_for(tmp_path / "b", OLD_CAP))
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    lease = await spend_under_the_old_cap(engine, a, r)
    since = {s: r.xlen(s) for s in engine.store.keys.streams}
    engine.policies.set(load_bundle(bundle_for(tmp_path / "b2", NEW_CAP)))
    after = await admitted(engine, "post", 10, a)
    assert after == []
    assert spent(r) == SPENT
    assert_given_back_once(r, engine, lease, since)
    await engine.store.close()


@pytest.mark.parametrize("how", ["sweeper", "first request"])
async def test_a_sidecar_started_after_a_cap_cut_gives_the_leases_above_it_back(
        redis_url: str, tmp_path: pathlib.Path, how: str) -> None:
    """The sidecar that spent under the old cap (200 requests) is gone; a new one
    starts with the cut policy (5 requests) and never saw the old cap. The lease
    says what it was leased under: the new sidecar's sweeper (a fresh one, at its
    first look, though the lease is not idle) or its first request gives the 17
    unused requests' worth back, once, and nothing more is admitted."""
    old = engine_for(redis_url, bundle_for(tmp_path / "b", OLD_CAP))
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    lease = await spend_under_the_old_cap(old, a, r)
    await old.store.close()
    since = {s: r.xlen(s) for s in old.store.keys.streams}
    new = engine_for(redis_url, bundle_for(tmp_path / "b2", NEW_CAP))
    if how == "sweeper":
        fresh = Escrow(new.store)
        got = await fresh.return_idle(new.ids.now_ms(), {"org": NEW_CAP})
        assert got == UNUSED
        assert await fresh.reclaim(new.ids.now_ms(), {"org": NEW_CAP}) == 0  # nothing twice
    after = await admitted(new, "post", 10, a)
    assert after == []
    assert spent(r) == SPENT
    await asyncio.gather(*list(new._background))
    assert_given_back_once(r, new, lease, since)
    await new.store.close()


async def test_sidecars_sweeping_a_cap_cut_at_once_give_each_lease_back_once(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Two sidecars load the cut (200 -> 5 requests) and sweep at the same moment
    (each one's sweep and its reload's give-back race: four at once): the lease's
    17 unused requests' worth goes back once (one give, one back on the streams,
    both for that amount), whoever gets there first; the others give 0. Then
    neither sidecar admits anything."""
    bundle = bundle_for(tmp_path / "b", OLD_CAP)
    e1, e2 = engine_for(redis_url, bundle), engine_for(redis_url, bundle)
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    lease = await spend_under_the_old_cap(e1, a, r)
    since = {s: r.xlen(s) for s in e1.store.keys.streams}
    cut = load_bundle(bundle_for(tmp_path / "b2", NEW_CAP))
    for e in (e1, e2):
        e.policies.set(cut)
    now = e1.ids.now_ms()
    await asyncio.gather(e1.sweep_once(now), e2.sweep_once(now))
    for e in (e1, e2):  # each reload's give-back runs beside the requests
        await asyncio.gather(*list(e._background))
    assert_given_back_once(r, e1, lease, since)
    for i, e in enumerate((e1, e2)):
        assert await admitted(e, f"post{i}", 5, a) == []
    assert spent(r) == SPENT
    for e in (e1, e2):
        await asyncio.gather(*list(e._background))
        await e.store.close()


async def test_a_cap_raised_mid_window_gives_nothing_back(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """Cap raised from 200 to 400 requests: the lease keeps its slice (nothing is
    given back, by the sweeper or the reload) and keeps serving."""
    engine = engine_for(redis_url, bundle_for(tmp_path / "b", OLD_CAP))
    r: Any = redis.Redis.from_url(redis_url)
    a, _ = two_tenants_off_home()
    lease = await spend_under_the_old_cap(engine, a, r)
    since = {s: r.xlen(s) for s in engine.store.keys.streams}
    engine.policies.set(load_bundle(bundle_for(tmp_path / "b2", 2 * OLD_CAP)))
    assert len(await admitted(engine, "post", 10, a)) == 10
    await engine.sweep_once()
    assert lease_events(r, engine.store.keys.streams, since) == []
    assert int(r.hget(lease, "g")) == SLICE
    await engine.store.close()
