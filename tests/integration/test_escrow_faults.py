"""Escrow under a hostile caller and broken steps, against a real Redis.

* A transfer step retried (same transfer id) moves nothing twice, on either side.
* A transfer cut between its two steps (the parent leased, the shard never
  credited: a crash, a timeout, a lost master) strands headroom; it never
  lets the budget be spent twice, and the stranded amount is visible as the
  parent's leased minus what the leases hold.
* A store timeout in the middle of a refill answers by the budget's fail mode
  and leaves no hold behind.
* An exception grant on the shared budget raises what the parent may lease.
* A Closeout above its hold is booked in the lease; the next request refills the
  difference first.
* ``budget status`` of a shared budget adds up every shard's lease.
* The ledger dead-letters a malformed lease event with the reason.
"""

from __future__ import annotations

import pathlib
from decimal import Decimal
from typing import Any

import pytest
import redis

from keel_pdp import grants
from keel_pdp.budget.escrow import new_transfer_id
from keel_pdp.budget.status import StatusReader
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.errors import ParseError
from keel_pdp.ledger.events import parse_entry
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import PRICES, budget, write_bundle

pytestmark = pytest.mark.redis

PREFIX = "escf"
SHARDS = 4
INPUT, OUTPUT = 1000, 500
MODEL = "gpt-4o-mini"
PRICE = PRICES["openai"][MODEL]
COST = int(INPUT * Decimal(PRICE["input"]) + OUTPUT * Decimal(PRICE["output"]))  # 450


def _engine(url: str, bundle: pathlib.Path) -> Engine:
    store = BudgetStore.from_url(url, prefix=PREFIX, timeout_s=2.0, shards=SHARDS)
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, store, Metrics())


def _bundle(tmp: pathlib.Path, requests: int, **budget_kw: Any) -> pathlib.Path:
    cap = Decimal(requests * COST) / 1_000_000
    return write_bundle(tmp, [budget("org", f"{cap:.6f}", **budget_kw)],
                        settings={"min_output_tokens": OUTPUT},
                        exception_paths=[{"name": "finance-overage", "approver_role": "finance",
                                          "max_overage_usd": "1.00",
                                          "max_duration_hours": 24}])


def _ask(i: int, tenant: str = "acme") -> AuthorizeInput:
    return AuthorizeInput(f"q-{i}", tenant, "chat", MODEL, "openai", INPUT, OUTPUT)


def _figures(r: Any) -> tuple[dict[str, int], list[dict[str, int]]]:
    (pkey,) = list(r.scan_iter(f"{PREFIX}:*:b:org:0::*"))
    parent = {k.decode(): int(v) for k, v in r.hgetall(pkey).items()
              if k.decode() in ("s", "h", "l")}
    leases = [{k.decode(): int(v) for k, v in r.hgetall(key).items()
               if k.decode() in ("g", "s", "h")}
              for key in r.scan_iter(f"{PREFIX}:*:l:org:0::*")]
    return parent, leases


async def _admitted(engine: Engine, n: int, start: int = 0, tenant: str = "acme") -> int:
    count = 0
    for i in range(start, start + n):
        out = await engine.authorize(_ask(i, tenant))
        count += out.decision is DecisionKind.ALLOW
    return count


async def test_a_retried_transfer_step_moves_nothing_twice(redis_url: str,
                                                           tmp_path: pathlib.Path) -> None:
    engine = _engine(redis_url, _bundle(tmp_path / "b", 10))
    r: Any = redis.Redis.from_url(redis_url)
    assert await _admitted(engine, 1) == 1  # the first refill creates the lease
    shape_parent = next(p for m in engine._materials._by_shape.values()
                        for p in m.parents if p is not None)
    ks = engine.store.keys
    lease_key = next(k.decode() for k in r.scan_iter(f"{PREFIX}:*:l:org:0::*"))
    shard = ks.key_shard(lease_key)
    parent_before, (lease_before,) = _figures(r)
    tid = new_transfer_id()
    take = [shape_parent.key, ks.transfer(tid, shape_parent.home, "take"),
            ks.streams[shape_parent.home], shape_parent.grants_key]
    credit = [lease_key, ks.transfer(tid, shard, "credit"), ks.streams[shard],
              ks.leases(shard)]
    events_before = sum(r.xlen(s) for s in ks.streams)
    for _ in range(3):  # the same step, retried
        got = await engine.store.escrow("take", take, tid, COST, 10 * COST,
                                        shape_parent.expire_at_s, 1, "{}", lease_key)
        assert got == COST
        assert await engine.store.escrow("credit", credit, tid, got, 0,
                                         shape_parent.expire_at_s, 1, "{}",
                                         shape_parent.key) == COST
    parent, (lease,) = _figures(r)
    assert parent["l"] == parent_before["l"] + COST
    assert lease["g"] == lease_before["g"] + COST
    assert sum(r.xlen(s) for s in ks.streams) == events_before + 2  # one event per side
    # A give-back retried likewise: given once.
    gid = new_transfer_id()
    give = [lease_key, ks.transfer(gid, shard, "give"), ks.streams[shard]]
    amounts = [await engine.store.escrow("give", give, gid, 0, 0, 2_000_000_000, 1, "{}",
                                         shape_parent.key) for _ in range(2)]
    assert amounts[0] == amounts[1] == lease["g"] - lease["h"] - lease.get("s", 0)
    assert _figures(r)[1][0]["g"] == lease["h"] + lease.get("s", 0)
    await engine.store.close()


async def test_a_transfer_cut_in_half_strands_headroom_and_never_overshoots(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    n = 10
    engine = _engine(redis_url, _bundle(tmp_path / "b", n))
    r: Any = redis.Redis.from_url(redis_url)
    assert await _admitted(engine, 1) == 1
    parent = next(p for m in engine._materials._by_shape.values()
                  for p in m.parents if p is not None)
    ks = engine.store.keys
    # The parent leases 3 requests' worth to a shard that never gets the credit
    # (the sidecar died between the two steps).
    tid = new_transfer_id()
    lost = await engine.store.escrow(
        "take", [parent.key, ks.transfer(tid, parent.home, "take"), ks.streams[parent.home],
                 parent.grants_key], tid, 3 * COST, n * COST, parent.expire_at_s, 1, "{}",
        "nowhere")
    assert lost == 3 * COST
    admitted = 1 + await _admitted(engine, 3 * n, start=1)
    p, leases = _figures(r)
    held = sum(x.get("h", 0) + x.get("s", 0) for x in leases)
    assert held == admitted * COST
    assert admitted == n - 3  # the stranded three are not spent, nothing above the cap
    assert p["l"] <= n * COST
    assert p["l"] - sum(x["g"] for x in leases) == lost  # visible: leased, held nowhere
    await engine.store.close()


async def test_a_timeout_inside_a_refill_answers_by_the_fail_mode_and_holds_nothing(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    engine = _engine(redis_url, _bundle(tmp_path / "b", 10, fail_mode="closed"))
    r: Any = redis.Redis.from_url(redis_url)
    real = engine.store.escrow
    calls = {"n": 0}

    async def flaky(step: str, *a: Any, **kw: Any) -> int:
        calls["n"] += 1
        if step == "credit":
            raise StoreUnavailable("TimeoutError: the credit's answer was lost")
        return await real(step, *a, **kw)

    engine.store.escrow = flaky  # type: ignore[method-assign]
    out = await engine.authorize(_ask(1))
    assert out.decision is DecisionKind.DENY and out.degraded
    assert calls["n"] >= 2
    await engine.flush_outbox()
    # Nothing is held anywhere; the parent's lease to the shard is stranded.
    parent, leases = _figures(r)
    assert all(x.get("h", 0) == 0 and x.get("g", 0) == 0 for x in leases)
    assert parent["l"] > 0
    engine.store.escrow = real  # type: ignore[method-assign]
    again = await engine.authorize(_ask(2))
    assert again.decision is DecisionKind.ALLOW and not again.degraded
    await engine.store.close()


async def test_an_exception_grant_on_the_shared_budget_lets_the_parent_lease_more(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    bundle = _bundle(tmp_path / "b", 4, exception_path="finance-overage")
    engine = _engine(redis_url, bundle)
    assert await _admitted(engine, 10) == 4
    snapshot = load_bundle(bundle)
    await grants.record(engine.store, snapshot, grants.GrantRequest(
        exception_path="finance-overage", budget_id="org", scope=(),
        amount_micros=2 * COST, duration_seconds=3600, approver="fin@example.com",
        approver_role="finance", justification="quarter-end batch, approved by CFO"))
    assert await _admitted(engine, 10, start=10) == 2
    r: Any = redis.Redis.from_url(redis_url)
    parent, leases = _figures(r)
    assert sum(x.get("h", 0) for x in leases) == 6 * COST
    assert parent["l"] <= 6 * COST
    await engine.store.close()


async def test_an_overrun_is_booked_in_the_lease_and_refilled_before_the_next_hold(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    engine = _engine(redis_url, _bundle(tmp_path / "b", 50))
    r: Any = redis.Redis.from_url(redis_url)
    first = await engine.authorize(_ask(1))
    assert first.decision is DecisionKind.ALLOW
    _, (lease,) = _figures(r)
    # Spend everything the lease has, and then some: the provider reports twice the
    # hold (below the overrun ceiling: booked and flagged).
    over = lease["g"] + COST
    done = await engine.closeout(first.permit_id, TokenUsage(input_tokens=INPUT,
                                                             output_tokens=OUTPUT),
                                 "SUCCEEDED", over)
    assert done.status == "SETTLED"
    _, (lease,) = _figures(r)
    assert lease["s"] == over > lease["g"]
    nxt = await engine.authorize(_ask(2))
    assert nxt.decision is DecisionKind.ALLOW
    parent, (lease,) = _figures(r)
    assert lease["s"] + lease["h"] <= lease["g"] == parent["l"]
    await engine.store.close()


async def test_budget_status_of_a_shared_budget_adds_up_every_shards_lease(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    bundle = _bundle(tmp_path / "b", 100)
    engine = _engine(redis_url, bundle)
    tenants = [f"team-{i}" for i in range(12)]
    assert len({engine.store.keys.tenant_shard(t) for t in tenants}) > 1
    for i, t in enumerate(tenants):
        assert (await engine.authorize(_ask(i, t))).decision is DecisionKind.ALLOW
    (org,) = await StatusReader(engine.store).status(load_bundle(bundle))
    assert org.held_micros == len(tenants) * COST and org.settled_micros == 0
    await engine.store.close()


def test_a_malformed_lease_event_is_refused_with_its_reason() -> None:
    good = {b"type": b"lease", b"pid": b"lse_" + b"0" * 20, b"ts": b"1",
            b"data": b"{}", b"res": b'{"dir":"take","amt":5,"l":5,"avail":0}'}
    assert parse_entry("1-0", good).etype == "lease"
    for field, value, words in ((b"res", b'{"dir":"steal","amt":5}', "res.dir"),
                                (b"res", b'{"dir":"take","amt":-5}', "amt"),
                                (b"pid", b"pmt_" + b"0" * 28, "transfer id")):
        with pytest.raises(ParseError, match=words):
            parse_entry("1-0", {**good, field: value})


async def test_an_absurd_request_pulls_nothing_out_of_the_shared_budget(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    engine = _engine(redis_url, _bundle(tmp_path / "b", 10))
    r: Any = redis.Redis.from_url(redis_url)
    assert await _admitted(engine, 1) == 1
    parent_before, leases_before = _figures(r)

    def kinds() -> list[bytes]:
        return [f[b"type"] for s in engine.store.keys.streams for _, f in r.xrange(s)]

    before = kinds()
    # 100,000 input tokens: far more than the whole cap. It is refused, and the
    # shared budget lends nothing to its shard meanwhile (a partial grant would
    # starve every other shard until it came back).
    huge = AuthorizeInput("absurd", "acme", "chat", MODEL, "openai", 100_000, OUTPUT)
    out = await engine.authorize(huge)
    assert out.decision is DecisionKind.DENY
    assert out.reasons[0].code.name == "BUDGET_EXHAUSTED"
    parent, leases = _figures(r)
    assert parent == parent_before and leases == leases_before
    after = kinds()
    # one more decision (the refusal), no transfer
    assert len(after) == len(before) + 1
    assert after.count(b"lease") == before.count(b"lease")
    assert await _admitted(engine, 1, start=100) == 1
    await engine.store.close()


def test_a_sidecar_or_writer_with_another_shard_count_refuses_to_run(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    # A writer reading 1 stream while sidecars write 4 would never see 3/4 of the
    # decisions; a sidecar with another count would look for permits elsewhere.
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    bundle = _bundle(tmp_path / "b", 10)
    env = {**os.environ, "KEEL_KEY_PREFIX": PREFIX}
    r: Any = redis.Redis.from_url(redis_url)
    r.set(f"{PREFIX}:{{pdp}}:layout", "4")
    serve = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-port", "0", "--key-shards", "2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2, serve.stdout + serve.stderr
    out = serve.stdout + serve.stderr
    assert "--key-shards 2" in out and "written with 4 key shard(s)" in out
    writer = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "ledger", "--redis-url", redis_url,
         "--store", f"sqlite:///{tmp_path}/l.db", "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=60)
    assert writer.returncode == 2, writer.stdout + writer.stderr
    assert "--key-shards 1" in writer.stdout + writer.stderr
    # The recorded layout is left as it was.
    assert r.get(f"{PREFIX}:{{pdp}}:layout") == b"4"
    # A store written before the layout was recorded (one shard: its stream is
    # there, no layout key): a sidecar with 2 shards would strand its permits.
    r.delete(f"{PREFIX}:{{pdp}}:layout")
    r.xadd(f"{PREFIX}:{{pdp}}:events", {"type": "decision"})
    old = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-port", "0", "--key-shards", "2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert old.returncode == 2 and "written with 1 key shard(s)" in old.stdout + old.stderr
    assert r.get(f"{PREFIX}:{{pdp}}:layout") == b"1"


async def test_requests_short_at_once_share_one_refill_and_a_stuck_one_ends_in_time(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    import asyncio
    import time

    engine = _engine(redis_url, _bundle(tmp_path / "b", 100))
    real = engine.store.escrow
    takes: list[int] = []
    gate = asyncio.Event()

    async def slow_take(step: str, *a: Any, **kw: Any) -> int:
        if step == "take":
            takes.append(1)
            await gate.wait()
        return await real(step, *a, **kw)

    engine.store.escrow = slow_take  # type: ignore[method-assign]
    first = asyncio.create_task(engine.authorize(_ask(1)))
    second = asyncio.create_task(engine.authorize(_ask(2)))
    await asyncio.sleep(0.05)
    gate.set()
    outs = await asyncio.gather(first, second)
    assert [o.decision for o in outs] == [DecisionKind.ALLOW, DecisionKind.ALLOW]
    assert len(takes) == 1  # one refill for both

    # A refill that never ends: a request waiting on it answers by the fail mode
    # inside its deadline (STORE_UNAVAILABLE), not with an internal error.
    gate.clear()
    takes.clear()
    r: Any = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{PREFIX}:*:l:org:0::*"):
        r.hset(key, "g", 0)  # the lease is spent: the next request must refill
    stuck = asyncio.create_task(engine.authorize(_ask(3), deadline_s=0.2))
    await asyncio.sleep(0.02)
    began = time.monotonic()
    waiting = await engine.authorize(_ask(4), deadline_s=0.2)
    assert time.monotonic() - began < 0.5
    assert waiting.degraded and waiting.reasons[0].code.name == "STORE_UNAVAILABLE"
    gate.set()
    await stuck
    engine.store.escrow = real  # type: ignore[method-assign]
    await engine.store.close()
