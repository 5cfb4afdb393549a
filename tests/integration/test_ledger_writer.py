"""Ledger writer against real Redis and real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore
from tests.helpers import make_engine, with_copies_sync
from tests.integration.conftest import (
    STREAM,
    assert_ledger_matches_stream,
    drain,
    ledger_bundle,
    make_writer,
    stream_totals,
    traffic,
)


@pytest.fixture
async def engine(redis_url: str, tmp_path: pathlib.Path) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield make_engine(client, ledger_bundle(tmp_path / "bundle"))
    finally:
        await client.aclose()


@pytest.fixture
def store(store_url: str) -> Any:
    s = LedgerStore(store_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


async def test_every_event_is_stored_once_with_counts_and_sums_matching_the_stream(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    from keel_pdp import grants
    from keel_pdp.ledger.periods import period_of_ms
    from keel_pdp.ledger.report import build_report

    t = await traffic(engine, 60, "a")
    await engine.sweep_once(time.time_ns() // 1_000_000 + 86_400_000)  # expire the open ones
    g = await grants.record(engine.store, engine.policies.current, grants.GrantRequest(
        "finance-overage", "org-monthly", (), 5_000_000, 3600, "ann", "finance-owner",
        "launch week traffic"))
    writer = make_writer(redis_url, store, batch_size=25)
    handled = drain(writer)
    client = redis.Redis.from_url(redis_url)
    want = stream_totals(client)
    assert handled == want.events and want.types["expiry"] == len(t.open)
    assert want.types["grant"] == 1
    assert_ledger_matches_stream(store, client)
    assert store.query("SELECT permit_id, amount_micros, reason FROM ledger_entries "
                       "WHERE kind = 'exception_grant'") == [
        (g.grant_id, 0, "launch week traffic")]
    report = build_report(store, period_of_ms(time.time_ns() // 1_000_000), ["tenant"])
    assert set(report.groups) == {("acme",), ("globex",)}  # the grant is not a charge
    # Nothing is left pending: every stored entry was acknowledged.
    assert client.xpending(STREAM, "keel-ledger")["pending"] == 0


async def test_redelivery_after_commit_without_ack_books_nothing_twice(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 30, "b")
    writer = make_writer(redis_url, store, batch_size=1000)
    writer.ensure_group()
    batch = writer.read()
    # The process dies after the commit and before XACK ...
    from keel_pdp.ledger.events import parse_entry

    whole = with_copies_sync(redis.Redis.from_url(redis_url), STREAM, batch)
    store.write_batch([parse_entry(i, f) for i, f in whole])
    client = redis.Redis.from_url(redis_url)
    assert client.xpending(STREAM, "keel-ledger")["pending"] == len(batch)
    # ... and a new process with the same consumer name starts over.
    again = make_writer(redis_url, LedgerStore(store.url), batch_size=7)
    assert drain(again) == len(batch)
    assert again.metrics.duplicates._value.get() == len(batch)
    assert again.metrics.stored._value.get() == 0
    assert_ledger_matches_stream(store, client)


async def test_entries_left_pending_by_a_dead_consumer_are_claimed(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 20, "c")
    dead = make_writer(redis_url, store, consumer="dead", batch_size=10)
    dead.ensure_group()
    taken = dead.read()  # read and never acknowledged
    assert taken
    other = make_writer(redis_url, LedgerStore(store.url), consumer="alive",
                        claim_idle_ms=1, claim_interval_s=0.0)
    drain(other)
    client = redis.Redis.from_url(redis_url)
    assert other.metrics.claimed._value.get() >= len(taken)
    assert client.xpending(STREAM, "keel-ledger")["pending"] == 0
    assert_ledger_matches_stream(store, client)


async def test_unparseable_entries_go_to_the_dead_letter_stream_with_the_reason(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 5, "d")
    client = redis.Redis.from_url(redis_url)
    # Hand-written garbage: the only events in these tests not produced by the engine.
    bad = [
        {"type": "decision", "pid": "pmt_x", "ts": "1", "data": "{not json", "res": "{}"},
        {"type": "teleport", "pid": "pmt_y", "ts": "1", "data": "{}", "res": "{}"},
        {"type": "settlement", "pid": "pmt_z", "ts": "1", "data": "{}",
         "res": json.dumps({"st": "SETTLED", "act": 1.5, "amt": 0, "prior": "held"})},
    ]
    bad_ids = [str(client.xadd(STREAM, b).decode()) for b in bad]  # type: ignore[arg-type,union-attr]
    await traffic(engine, 5, "e")
    writer = make_writer(redis_url, store)
    drain(writer)
    writer.refresh_stats()
    dead: Any = client.xrange(STREAM + ":dead")
    assert [d[1][b"src_id"].decode() for d in dead] == bad_ids
    reasons = [d[1][b"reason"].decode() for d in dead]
    assert "not JSON" in reasons[0]
    assert "unknown event type 'teleport'" in reasons[1]
    assert "res.act" in reasons[2] and "expected an integer" in reasons[2]
    assert dead[1][1][b"orig:type"] == b"teleport"
    assert writer.metrics.dead_letter._value.get() == 3
    assert writer.metrics.dead_lettered._value.get() == 3
    assert client.xpending(STREAM, "keel-ledger")["pending"] == 0
    stored = {r[0] for r in store.query("SELECT event_id FROM ledger_events")}
    assert not stored & set(bad_ids)
    assert len(stored) == client.xlen(STREAM) - 3


async def test_trim_keeps_every_entry_a_group_has_not_acknowledged(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 20, "f")
    client = redis.Redis.from_url(redis_url)
    total = client.xlen(STREAM)
    # A second group (another reader) has read the first 5 entries and acked none.
    client.xgroup_create(STREAM, "audit", id="0")
    held_back: Any = client.xreadgroup("audit", "a1", {STREAM: ">"}, count=5)
    oldest_unacked = held_back[0][1][0][0].decode()
    writer = make_writer(redis_url, store, batch_size=8)
    drain(writer)
    assert writer.trim() == 0  # "audit" still needs everything from its first entry
    client.xack(STREAM, "audit", *[i for i, _ in held_back[0][1]])
    # Now "audit" needs what it has not read yet: entries 6.. stay.
    floor = writer.safe_trim_floor()
    assert floor is not None and floor > oldest_unacked
    assert writer.trim() == 5
    assert client.xlen(STREAM) == total - 5
    client.xgroup_destroy(STREAM, "audit")
    await traffic(engine, 4, "g")
    # Fresh entries not yet read by the ledger group must survive a trim.
    fresh = client.xlen(STREAM) - (total - 5)
    writer.trim()
    assert client.xlen(STREAM) == fresh
    drain(writer)
    assert writer.trim() == fresh
    assert client.xlen(STREAM) == 0
    assert store.query("SELECT COUNT(*) FROM ledger_events")[0][0] == total + fresh


async def test_lag_and_pending_metrics_follow_the_group(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 10, "h")
    client = redis.Redis.from_url(redis_url)
    writer = make_writer(redis_url, store, batch_size=4)
    writer.ensure_group()
    writer.refresh_stats()
    assert writer.metrics.lag._value.get() == client.xlen(STREAM)
    writer.read()  # four delivered, not acked
    writer.refresh_stats()
    assert writer.metrics.pending._value.get() == 4
    assert writer.metrics.lag._value.get() == client.xlen(STREAM) - 4
    writer = make_writer(redis_url, store, batch_size=4)  # a restart re-reads the four
    drain(writer)
    writer.refresh_stats()
    assert writer.metrics.pending._value.get() == 0
    assert writer.metrics.lag._value.get() == 0


async def test_an_event_the_store_refuses_is_dead_lettered_alone(
        engine: Any, store: LedgerStore, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = await traffic(engine, 12, "i")
    # A void reason with a NUL byte: PostgreSQL text cannot hold it, so the
    # entry's copy is sanitised (the raw event keeps the escaped original).
    await engine.void(t.open[0], "bad\x00reason")
    client = redis.Redis.from_url(redis_url)
    ids: Any = client.xrange(STREAM)
    poison = ids[3][0].decode()
    from keel_pdp.ledger.store import StoreRejected

    real = LedgerStore.write_batch

    def refuse(self: LedgerStore, events: Any, at_ms: int | None = None) -> int:
        if any(e.event_id == poison for e in events):
            raise StoreRejected("DataError: test refuses this event")
        return real(self, events, at_ms)

    monkeypatch.setattr(LedgerStore, "write_batch", refuse)
    writer = make_writer(redis_url, store, batch_size=50)
    drain(writer)
    dead: Any = client.xrange(STREAM + ":dead")
    assert [d[1][b"src_id"].decode() for d in dead] == [poison]
    assert b"store refused the event" in dead[0][1][b"reason"]
    assert client.xpending(STREAM, "keel-ledger")["pending"] == 0
    assert store.query("SELECT COUNT(*) FROM ledger_events")[0][0] == client.xlen(STREAM) - 1
    reason = store.query("SELECT reason FROM ledger_entries WHERE kind = 'void' "
                         "AND permit_id = ?", (t.open[0],))
    assert reason == [("bad\ufffdreason",)]
