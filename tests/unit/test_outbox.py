"""Decisions taken while Redis is unreachable survive a sidecar crash when the
outbox is journaled, and reach the stream exactly once when Redis is back."""

from __future__ import annotations

import pathlib
from typing import Any

import fakeredis
import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.outbox import Outbox
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from tests.conftest import free_port
from tests.helpers import budget, read_stream, write_bundle


def _engine(client: aioredis.Redis, bundle: pathlib.Path, outbox: pathlib.Path) -> Engine:
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    return Engine(holder, BudgetStore(client, KeySpace("t"), 0.05), Metrics(),
                  outbox_dir=str(outbox))


async def test_journaled_outbox_survives_a_crash_and_replays_once(tmp_path: pathlib.Path) -> None:
    bundle = write_bundle(tmp_path / "b", [budget("open", "10", fail_mode="open")])
    down = aioredis.Redis(port=free_port(), socket_connect_timeout=0.05, socket_timeout=0.05)
    crashed = _engine(down, bundle, tmp_path / "outbox")
    outs = [await crashed.authorize(AuthorizeInput(f"r{i}", "acme", "w", "gpt-4o-mini",
                                                   "openai", 10, 10)) for i in range(3)]
    assert all(o.decision is DecisionKind.ALLOW and o.degraded for o in outs)
    # Per Authorize: the abort of the hold script it sent, then its degraded decision.
    assert crashed.outbox_len == 6
    crashed.relay.close()  # killed: nothing flushed; the kernel lets go of its journal

    up = fakeredis.FakeAsyncRedis()
    restarted = _engine(up, bundle, tmp_path / "outbox")
    assert restarted.outbox_len == 6
    assert await restarted.flush_outbox() == 6
    client: Any = up
    entries = await read_stream(client, restarted.store.keys.stream)
    assert [f[b"pid"].decode() for _, f in entries] == [o.permit_id for o in outs]
    assert list((tmp_path / "outbox").glob("*.jsonl")) == []
    # A third process finds nothing left to replay.
    assert _engine(up, bundle, tmp_path / "outbox").outbox_len == 0


def test_journals_of_workers_in_their_own_folders_are_claimed_by_any_process(
        tmp_path: pathlib.Path) -> None:
    """Earlier versions gave worker i of ``serve --workers N`` the folder worker-<i>:
    a service restarted with fewer workers (or one process) must replay them too."""
    for i in range(3):
        box = Outbox(directory=str(tmp_path / f"worker-{i}"))
        box.append(("decision", f"p{i}", i, "{}", "{}", ""))
        box.close()  # killed
    live = Outbox(directory=str(tmp_path / "worker-3"))  # a live process: never taken
    live.append(("decision", "live", 9, "{}", "{}", ""))
    claimant = Outbox(directory=str(tmp_path))
    assert sorted(e[1] for e in claimant) == ["p0", "p1", "p2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        next(tmp_path.glob("outbox-*.jsonl")).name, "worker-3"]
    live.close()


def test_full_outbox_drops_the_oldest_and_counts_it(tmp_path: pathlib.Path) -> None:
    box = Outbox(max_events=2, directory=str(tmp_path))
    for i in range(3):
        box.append(("decision", f"p{i}", i, "{}", "{}", ""))
    assert [e[1] for e in box] == ["p1", "p2"]
    assert box.dropped == 1


async def test_fail_open_answer_for_a_too_short_deadline_still_books_its_closeout(
        tmp_path: pathlib.Path) -> None:
    from keel_pdp.decision import Code
    from keel_pdp.pricing import TokenUsage

    bundle = write_bundle(tmp_path / "b", [budget("open", "10", fail_mode="open")])
    client = fakeredis.FakeAsyncRedis()
    engine = _engine(client, bundle, tmp_path / "outbox")
    out = await engine.authorize(AuthorizeInput("r", "acme", "w", "gpt-4o-mini", "openai",
                                                1000, 10), deadline_s=0.001)
    assert out.decision is DecisionKind.ALLOW
    assert out.degraded
    assert out.reasons[0].code is Code.DEADLINE_TOO_SHORT
    res = await engine.closeout(out.permit_id, TokenUsage(1000, 0, 0, 10), "SUCCEEDED", None)
    assert res.status == "SETTLED"  # not UNKNOWN_PERMIT: the provider's cost is booked
    raw: Any = await client.keys("t:{pdp}:b:open:*")
    assert int(await client.hget(raw[0], "s") or 0) == res.actual_cost_micros == 156


async def test_outbox_event_whose_reply_was_lost_reaches_the_stream_once(
        tmp_path: pathlib.Path) -> None:
    """The store ran the record script but its reply timed out: the outbox keeps the
    event and sends it again; the stream must still hold it once (and the degraded
    permit's record once, unbooked)."""
    from keel_pdp.budget.store import StoreUnavailable

    bundle = write_bundle(tmp_path / "b", [budget("open", "10", fail_mode="open")])
    down = aioredis.Redis(port=free_port(), socket_connect_timeout=0.05, socket_timeout=0.05)
    crashed = _engine(down, bundle, tmp_path / "outbox")
    outs = [await crashed.authorize(AuthorizeInput(f"r{i}", "acme", "w", "gpt-4o-mini",
                                                   "openai", 10, 10)) for i in range(2)]
    crashed.relay.close()
    up = fakeredis.FakeAsyncRedis()
    engine = _engine(up, bundle, tmp_path / "outbox")
    real_record, real_abort = engine.store.record, engine.store.abort

    async def lost_reply(*a: Any, **kw: Any) -> str:
        await real_record(*a, **kw)
        raise StoreUnavailable("test: reply lost after the script ran")

    async def lost_abort_reply(*a: Any, **kw: Any) -> Any:
        await real_abort(*a, **kw)
        raise StoreUnavailable("test: reply lost after the script ran")

    engine.store.record = lost_reply  # type: ignore[method-assign]
    engine.store.abort = lost_abort_reply  # type: ignore[method-assign]
    for _ in range(3):
        assert await engine.flush_outbox() == 0  # every attempt "failed"
    engine.store.record, engine.store.abort = real_record, real_abort  # type: ignore[method-assign]
    assert await engine.flush_outbox() == 4
    client: Any = up
    entries = await read_stream(client, engine.store.keys.stream)
    assert [f[b"pid"].decode() for _, f in entries] == [o.permit_id for o in outs]
    for o in outs:
        assert await client.hget(engine.store.keys.permit(o.permit_id), "state") == b"degraded"


async def test_closeout_of_a_degraded_permit_answers_in_time_while_a_long_outbox_replays(
        tmp_path: pathlib.Path) -> None:
    # After an outage a sidecar's outbox holds many fail-open decisions. A Closeout
    # (or Void) of one of them must not wait for the whole replay: it answers
    # within its deadline (PENDING while its own record is not in yet), the replay
    # goes on, and a retry then settles. Seen in the cluster simulation: a
    # Closeout answered 3.9 s after a failover with a 250 ms deadline.
    import asyncio
    import time

    from keel_pdp.pricing import TokenUsage

    bundle = write_bundle(tmp_path / "b", [budget("open", "10", fail_mode="open")])
    client = fakeredis.FakeAsyncRedis()
    engine = _engine(client, bundle, tmp_path / "outbox")
    replay_s = 0.02
    record = engine.store.record

    async def slow_record(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(replay_s)  # a store that answers, slowly
        return await record(*args, **kwargs)

    engine.store.record = slow_record  # type: ignore[method-assign]
    n = 60  # a replay of about 1.2 s
    outs = [await engine.authorize(AuthorizeInput(f"r{i}", "acme", "w", "gpt-4o-mini",
                                                  "openai", 100, 10), deadline_s=0.001)
            for i in range(n)]
    assert all(o.degraded and o.decision is DecisionKind.ALLOW for o in outs)
    deadline = 0.2
    started = time.monotonic()
    res = await engine.closeout(outs[-1].permit_id, TokenUsage(100, 0, 0, 10), "SUCCEEDED",
                                None, deadline_s=deadline)
    took = time.monotonic() - started
    assert res.status == "CLOSEOUT_PERMIT_PENDING", res
    assert took < deadline + 0.1, took  # not the whole replay (n x replay_s)
    void = await engine.void(outs[-2].permit_id, "x", deadline_s=deadline)
    assert void.status == "VOID_STORE_UNAVAILABLE"  # pending: retry
    assert time.monotonic() - started < 2 * deadline + 0.2
    assert engine.outbox_len > 0  # the replay goes on in the background
    await engine.flush_outbox()
    assert engine.outbox_len == 0
    res = await engine.closeout(outs[-1].permit_id, TokenUsage(100, 0, 0, 10), "SUCCEEDED",
                                None, deadline_s=deadline)
    assert res.status == "SETTLED"
    void = await engine.void(outs[-2].permit_id, "x", deadline_s=deadline)
    assert void.status in ("VOIDED", "NOT_VOIDABLE"), void
    entries = await read_stream(client, engine.store.keys.stream)
    decisions = [f[b"pid"].decode() for _, f in entries if f[b"type"] == b"decision"]
    assert decisions == [o.permit_id for o in outs]  # every decision once, in order
