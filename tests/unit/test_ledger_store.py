"""The SQLite ledger store: migrations, idempotent batches, booking into the next
open period, append-only guards (the same code runs against PostgreSQL in the
integration tests)."""

from __future__ import annotations

import json
import pathlib

import pytest

from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.migrations import LATEST
from keel_pdp.ledger.periods import bounds_ms
from keel_pdp.ledger.store import LedgerStore, StoreError


def pid_at(ms: int, n: int = 0) -> str:
    return f"pmt_{ms:012x}{n:016x}"


def release(eid: str, pid: str, amt: int, ts: int) -> dict[bytes, bytes]:
    f = {"type": "void", "pid": pid, "ts": str(ts), "data": '{"v":1}',
         "res": json.dumps({"st": "RELEASED", "amt": amt, "state": "voided"})}
    return {k.encode(): v.encode() for k, v in f.items()}


@pytest.fixture
def store(tmp_path: pathlib.Path) -> LedgerStore:
    s = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    assert s.migrate() == list(range(1, LATEST + 1))
    return s


def test_migrations_apply_once(store: LedgerStore) -> None:
    assert store.migrate() == []
    assert store.schema_version() == LATEST


def test_a_store_newer_than_the_code_is_refused(store: LedgerStore) -> None:
    store.query("INSERT INTO ledger_schema_migrations VALUES (?, ?, ?)", (LATEST + 1, "x", 0))
    with pytest.raises(StoreError, match="newer than this keel-pdp"):
        store.migrate()


def test_bad_urls_are_refused() -> None:
    with pytest.raises(StoreError):
        LedgerStore("mysql://x")
    with pytest.raises(StoreError):
        LedgerStore("sqlite://relative.db")


def test_a_batch_delivered_twice_is_stored_once(store: LedgerStore) -> None:
    start, _ = bounds_ms("2026-03")
    evs = [parse_entry(f"{start}-{i}", release("", pid_at(start, i), 10 + i, start))
           for i in range(5)]
    assert store.write_batch(evs) == 5
    assert store.write_batch(evs[2:] + evs[:2]) == 0
    assert store.query("SELECT COUNT(*), SUM(amount_micros) FROM ledger_entries")[0] == (5, -60)


def test_the_same_fact_appended_twice_under_two_stream_ids_books_once(
        store: LedgerStore) -> None:
    start, _ = bounds_ms("2026-03")
    pid = pid_at(start)
    store.write_batch([parse_entry(f"{start}-0", release("", pid, 10, start)),
                       parse_entry(f"{start}-1", release("", pid, 10, start))])
    assert store.query("SELECT COUNT(*) FROM ledger_events")[0][0] == 2
    assert store.query("SELECT COUNT(*) FROM ledger_entries")[0][0] == 1


def test_amounts_for_closed_periods_go_to_the_next_period_that_is_not_closed(
        store: LedgerStore) -> None:
    jan, _ = bounds_ms("2026-01")
    after = bounds_ms("2026-04")[0]
    store.transition("2026-01", "closed", at_ms=after)
    store.transition("2026-02", "closed", at_ms=after)
    store.transition("2026-03", "closing", at_ms=after)
    store.write_batch([parse_entry(f"{after}-0", release("", pid_at(jan), 7, after))])
    row = store.query("SELECT period, belongs_to FROM ledger_entries")[0]
    assert row == ("2026-03", "2026-01")  # closing still accepts late amounts
    store.transition("2026-03", "closed", at_ms=after)
    store.write_batch([parse_entry(f"{after}-1", release("", pid_at(jan, 1), 7, after))])
    assert store.query("SELECT period FROM ledger_entries ORDER BY id")[-1] == ("2026-04",)
    entry, booked = store.manual_adjustment(key="k", belongs_to="2026-02", amount_micros=-5,
                                            tenant="acme", reason="credit", actor="me",
                                            at_ms=after)
    assert booked == "2026-04"
    assert store.manual_adjustment(key="k", belongs_to="2026-02", amount_micros=-5,
                                   tenant="acme", reason="credit", actor="me",
                                   at_ms=after) == (entry, booked)
    states = store.periods()
    assert states["2026-03"] == "closed" and states["2026-04"] == "open"
    assert [t[:2] for t in store.transitions("2026-03")] == [("open", "closing"),
                                                              ("closing", "closed")]


def test_entries_cannot_be_rewritten_or_deleted(store: LedgerStore) -> None:
    start, _ = bounds_ms("2026-03")
    store.write_batch([parse_entry(f"{start}-0", release("", pid_at(start), 10, start))])
    for sql in ("UPDATE ledger_entries SET amount_micros = 0", "DELETE FROM ledger_entries",
                "DELETE FROM ledger_events"):
        with pytest.raises(Exception, match="append-only"), store.tx() as tx:
            tx.run(sql)
    assert store.query("SELECT amount_micros FROM ledger_entries")[0][0] == -10
