"""SQLite ledger errors: only busy/locked/I-O/full/can't-open are outages.

An outage (``StoreUnavailable``) makes the writer back off and retry the same
batch; a SQL error (syntax, no such table) can never succeed on retry and must
stop the writer with a message naming the problem (``StoreBroken``).
"""

from __future__ import annotations

import pathlib
import sqlite3

import pytest

from keel_pdp.ledger.store import LedgerStore, StoreBroken, StoreError, StoreUnavailable


@pytest.fixture
def store(tmp_path: pathlib.Path) -> LedgerStore:
    s = LedgerStore(f"sqlite:///{tmp_path}/ledger.db", connect_timeout_s=0.2)
    s.migrate()
    return s


def test_a_missing_table_is_a_broken_store_not_an_outage(
        store: LedgerStore, tmp_path: pathlib.Path) -> None:
    with pytest.raises(StoreBroken) as err:
        store.query("SELECT COUNT(*) FROM no_such_ledger_table")
    text = str(err.value)
    assert "no such table: no_such_ledger_table" in text
    assert str(tmp_path / "ledger.db") in text
    assert "SQLITE_ERROR" in text
    assert not isinstance(err.value, StoreUnavailable)
    assert isinstance(err.value, StoreError)
    # The store still works for correct statements.
    assert store.query("SELECT 1") == [(1,)]


def test_a_syntax_error_is_a_broken_store(store: LedgerStore) -> None:
    with pytest.raises(StoreBroken, match="syntax error"):
        store.query("SELEC 1")


def test_a_locked_database_is_an_outage(store: LedgerStore, tmp_path: pathlib.Path) -> None:
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, timeout=0.1)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match=r"locked|busy|BUSY"):
            store.query("INSERT INTO ledger_periods (period, state, updated_at_ms) "
                        "VALUES ('2099-01', 'open', 0)")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.ping()


def test_a_file_that_cannot_be_opened_is_an_outage(tmp_path: pathlib.Path) -> None:
    s = LedgerStore(f"sqlite:///{tmp_path}/not-mounted-yet/ledger.db")
    with pytest.raises(StoreUnavailable, match=r"CANTOPEN|unable to open"):
        s.query("SELECT 1")
    (tmp_path / "not-mounted-yet").mkdir()
    assert s.ping()  # the volume appeared: the same store object recovers


def test_a_full_disk_is_an_outage(store: LedgerStore) -> None:
    pages = store.query("PRAGMA page_count")[0][0]
    store.connection().execute(f"PRAGMA max_page_count = {int(pages)}")

    def fill() -> None:
        with store.tx() as tx:
            tx.run("CREATE TABLE filler (x BLOB)")
            for _ in range(50):
                tx.run("INSERT INTO filler VALUES (zeroblob(65536))")

    with pytest.raises(StoreUnavailable, match=r"SQLITE_FULL|full"):
        fill()
    # Nothing of the failed transaction stayed.
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'filler'") == []
