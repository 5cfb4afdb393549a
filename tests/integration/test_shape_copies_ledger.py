"""The ledger writer reads decisions that refer to a stored shape copy (real Redis,
the SQLite ledger store).

A decision the authorize script writes names its shape's copy instead of carrying
the tenant, budgets and policy revision. The writer reads each copy once (one MGET
per batch, then from memory), books the decision exactly as an inline one, and
when a copy is gone or is not the text its name says, dead-letters that entry with
the key in the reason (its original fields kept) and books the rest.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore
from tests.helpers import make_engine, read_stream_sync
from tests.integration.conftest import (
    STREAM,
    assert_ledger_matches_stream,
    drain,
    ledger_bundle,
    make_writer,
    traffic,
)

DEAD = STREAM + ":dead"


@pytest.fixture
def store(tmp_path: pathlib.Path) -> Any:
    s = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    s.migrate()
    try:
        yield s
    finally:
        s.close()


async def _decide(redis_url: str, tmp_path: pathlib.Path, *rounds: tuple[int, str],
                  tenants: tuple[str, ...] = ("acme",),
                  between: Callable[[], None] | None = None) -> None:
    """Real decisions (traffic rounds of n calls), ``between`` run between rounds."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        engine = make_engine(client, ledger_bundle(tmp_path / "bundle"))
        for k, (n, tag) in enumerate(rounds):
            if k and between is not None:
                between()
            await traffic(engine, n, tag, tenants=tenants)
    finally:
        await client.aclose()


def _budget_rows(store: LedgerStore) -> dict[str, list[str]]:
    rows = store.query("SELECT permit_id, budget_id FROM ledger_permit_budgets "
                       "ORDER BY permit_id, ordinal")
    out: dict[str, list[str]] = {}
    for pid, bid in rows:
        out.setdefault(str(pid), []).append(str(bid))
    return out


def _stream_budgets(client: redis.Redis) -> dict[str, list[str]]:
    """Each decision's budgets as the stream says, copies read in by this test."""
    out: dict[str, list[str]] = {}
    for _, f in read_stream_sync(client, STREAM):
        if f[b"type"] == b"decision":
            data = json.loads(f[b"data"])
            out[f[b"pid"].decode()] = [b["id"] for b in data.get("budgets", [])]
    return out


async def test_decisions_in_stored_form_are_booked_whole(
        redis_url: str, tmp_path: pathlib.Path, store: LedgerStore) -> None:
    await _decide(redis_url, tmp_path, (40, "s"), tenants=("acme", "globex"))
    sync = redis.Redis.from_url(redis_url)
    raw: Any = sync.xrange(STREAM)
    assert any(f[b"data"].endswith(b'"}') and b'"shape":"' in f[b"data"]
               and f[b"type"] == b"decision" for _, f in raw)
    writer = make_writer(redis_url, store, batch_size=16)
    assert drain(writer) == len(raw)
    assert writer.dead_total == 0
    assert_ledger_matches_stream(store, sync)
    booked = _budget_rows(store)
    want = {pid: ids for pid, ids in _stream_budgets(sync).items() if ids}
    assert want and booked == want
    dims = store.query("SELECT DISTINCT tenant FROM ledger_entries WHERE kind = 'permit'")
    assert {str(t) for (t,) in dims} >= {"acme"}
    # The ledger's mirror of the stream keeps each decision whole.
    kept = [json.loads(str(d)) for (d,) in store.query(
        "SELECT data FROM ledger_events WHERE etype = 'decision'")]
    assert kept and all("shape" not in d and d["tenant"] in ("acme", "globex") for d in kept)


async def test_a_missing_copy_is_dead_lettered_by_name_and_the_rest_is_booked(
        redis_url: str, tmp_path: pathlib.Path, store: LedgerStore) -> None:
    sync = redis.Redis.from_url(redis_url)
    deleted: list[str] = []

    def delete_a_copy() -> None:
        # Someone deletes a copy by hand (its mark stays): later decisions refer to it.
        keys = sorted(k.decode() for k in sync.scan_iter(match="t:{pdp}:shape:*"))
        assert keys
        sync.delete(keys[0])
        deleted.append(keys[0])

    await _decide(redis_url, tmp_path, (10, "m"), (10, "n"), between=delete_a_copy)
    (gone,) = deleted
    raw: Any = sync.xrange(STREAM)
    digest = gone.rpartition(":")[2]
    refer = {i for i, f in raw if f[b"data"].endswith(f'"shape":"{digest}"}}'.encode())}
    assert refer
    writer = make_writer(redis_url, store, batch_size=7)
    assert drain(writer) == len(raw)
    dead: Any = sync.xrange(DEAD)
    assert {f[b"src_id"] for _, f in dead} == refer
    for _, f in dead:
        assert gone in f[b"reason"].decode() and "not in Redis" in f[b"reason"].decode()
        assert f[b"orig:data"].endswith(f'"shape":"{digest}"}}'.encode())
    stored = int(store.query("SELECT COUNT(*) FROM ledger_events")[0][0])
    assert stored == len(raw) - len(refer)
    assert sync.xpending(STREAM, "keel-ledger")["pending"] == 0


async def test_a_copy_that_is_not_its_named_text_is_refused(
        redis_url: str, tmp_path: pathlib.Path, store: LedgerStore) -> None:
    await _decide(redis_url, tmp_path, (6, "x"))
    sync = redis.Redis.from_url(redis_url)
    for key in sync.scan_iter(match="t:{pdp}:shape:*"):
        text: Any = sync.get(key)
        copy = json.loads(text)
        copy["tenant"] = "globex"  # books acme's spend to another tenant, if believed
        sync.set(key, json.dumps(copy, separators=(",", ":")), keepttl=True)
    raw: Any = sync.xrange(STREAM)
    writer = make_writer(redis_url, store)
    assert drain(writer) == len(raw)
    dead: Any = sync.xrange(DEAD)
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert reasons and all("not the text it is named by" in r for r in reasons)
    assert store.query("SELECT COUNT(*) FROM ledger_entries WHERE tenant = 'globex'") == [(0,)]


async def test_the_writer_reads_each_copy_once(
        redis_url: str, tmp_path: pathlib.Path, store: LedgerStore) -> None:
    await _decide(redis_url, tmp_path, (30, "o"))
    sync = redis.Redis.from_url(redis_url)
    copies = len(list(sync.scan_iter(match="t:{pdp}:shape:*")))
    writer = make_writer(redis_url, store, batch_size=5)
    calls: list[int] = []
    mget = writer.client.mget

    def counted(keys: Any, *args: Any) -> Any:
        calls.append(len(keys))
        return mget(keys, *args)

    writer.client.mget = counted  # type: ignore[method-assign]
    drain(writer)
    assert sum(calls) == copies
    assert writer.dead_total == 0


async def test_a_redis_error_while_reading_copies_keeps_the_batch_and_retries(
        redis_url: str, tmp_path: pathlib.Path, store: LedgerStore) -> None:
    await _decide(redis_url, tmp_path, (12, "r"))
    sync = redis.Redis.from_url(redis_url)
    raw: Any = sync.xrange(STREAM)
    writer = make_writer(redis_url, store, batch_size=50)
    mget = writer.client.mget
    failures = [redis.ConnectionError("connection reset")] * 2

    def flaky(keys: Any, *args: Any) -> Any:
        if failures:
            raise failures.pop()
        return mget(keys, *args)

    writer.client.mget = flaky  # type: ignore[method-assign]
    assert drain(writer) == len(raw)
    assert not failures and writer.dead_total == 0
    assert_ledger_matches_stream(store, sync)
    assert writer.metrics.errors.labels("redis")._value.get() == 2
