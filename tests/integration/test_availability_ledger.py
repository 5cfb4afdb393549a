"""The ledger writer against real Redis and a SQLite ledger whose schema is broken.

A SQL error is not an outage: the writer must stop with a clear error instead of
retrying the same batch forever, and lose nothing (the batch stays pending in the
consumer group and is stored once the schema is repaired).
"""

from __future__ import annotations

import pathlib
import threading
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore, StoreBroken
from tests.helpers import make_engine
from tests.integration.conftest import (
    STREAM,
    assert_ledger_matches_stream,
    drain,
    ledger_bundle,
    make_writer,
    traffic,
)


async def test_a_missing_table_stops_the_writer_and_loses_nothing(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        engine = make_engine(client, ledger_bundle(tmp_path / "bundle"))
        await traffic(engine, 30, "broken")
    finally:
        await client.aclose()
    store = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    store.migrate()
    store.query("ALTER TABLE ledger_entries RENAME TO ledger_entries_moved")
    writer = make_writer(redis_url, store, batch_size=10)
    # Bounded: were the error taken for an outage, the writer would retry until stopped.
    timer = threading.Timer(5.0, writer.stop)
    timer.start()
    try:
        with pytest.raises(StoreBroken) as err:
            drain(writer)
    finally:
        timer.cancel()
    assert "no such table: ledger_entries" in str(err.value)
    assert not writer.stopping.is_set()  # it stopped on the error, not on the timer
    sync = redis.Redis.from_url(redis_url)
    pending: Any = sync.xpending(STREAM, "keel-ledger")
    assert pending["pending"] == 10  # the batch it could not store is still held for it

    # Repaired: a new writer (same consumer name) stores everything exactly once.
    store.query("ALTER TABLE ledger_entries_moved RENAME TO ledger_entries")
    store.close()
    repaired = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    drain(make_writer(redis_url, repaired, batch_size=10))
    assert_ledger_matches_stream(repaired, sync)
    repaired.close()
