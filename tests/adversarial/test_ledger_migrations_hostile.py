"""Schema migrations and the upgrade path against a hostile environment.

A ledger is built at each earlier schema version (migrations 1..k only) and
filled through the store's own booking path as it was then (the entry columns
of that version), with a month of traffic from ``tests.adversarial.period_book``
and a closed period. Upgrading it must keep every row and every total (counted
here with plain SQL and with the book's own integers) and leave the append-only
guards in force. Migrations that die halfway, writers that start at once, a
store newer than the code, a locked, a slow and a damaged database are refused
or survived without a partial schema and without a lost entry.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from keel_pdp.cli import main
from keel_pdp.ledger import rows as ledger_rows
from keel_pdp.ledger import store as ledger_store
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.migrations import BOOKKEEPING, LATEST, MIGRATIONS, Migration
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import (
    LedgerStore,
    StoreBroken,
    StoreError,
    StoreUnavailable,
)
from tests.adversarial.period_book import PICO, Month, Permit, month_start_ms, pid, random_month
from tests.integration.pg_fixture import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]

MAR, APR, MAY = (month_start_ms(2026, m) for m in (3, 4, 5))
# Columns each schema version's entries table had (added by migrations 3 and 4).
ADDED = {3: ("caller",), 4: ("actual_pico",)}


def columns_at(version: int) -> tuple[str, ...]:
    later = {c for v, cs in ADDED.items() if v > version for c in cs}
    return tuple(c for c in ledger_rows.ENTRY_COLUMNS if c not in later)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def opened() -> Iterator[list[LedgerStore]]:
    """Stores a test opens, closed at the end whatever happened."""
    out: list[LedgerStore] = []
    yield out
    for s in out:
        s.close()


def store_at(url: str, version: int, opened: list[LedgerStore]) -> LedgerStore:
    """A store migrated to ``version`` only, the way that release migrated it."""
    s = LedgerStore(url)
    opened.append(s)
    with s.tx() as tx:
        tx.script(BOOKKEEPING)
        for m in MIGRATIONS[:version]:
            for stmt in m.statements(s.dialect):
                tx.script(stmt)
            tx.run("INSERT INTO ledger_schema_migrations (version, name, applied_at_ms) "
                   "VALUES (?, ?, ?)", (m.version, m.name, 0))
    return s


def book_at(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``write_batch`` write the entry columns of schema ``version`` (its
    booking path is otherwise unchanged since: periods, events, budgets)."""
    cols = columns_at(version)
    full = ledger_rows.entry_values
    monkeypatch.setattr(ledger_store, "_ENTRY_COLUMNS", cols)
    monkeypatch.setattr(ledger_store, "_entry_values",
                        lambda *a: full(*a)[:len(cols)])


def schema(s: LedgerStore) -> tuple[int, set[int]]:
    rows = s.query("SELECT version FROM ledger_schema_migrations")
    return len(rows), {int(r[0]) for r in rows}


def entry_columns(s: LedgerStore) -> list[str]:
    if s.dialect == "sqlite":
        return [str(r[1]) for r in s.query("PRAGMA table_info(ledger_entries)")]
    return [str(r[0]) for r in s.query(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'ledger_entries' AND table_schema = current_schema()")]


def books(s: LedgerStore) -> dict[str, Any]:
    """Everything that must survive an upgrade, counted with plain SQL."""
    return {
        "counts": [s.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in (
            "ledger_events", "ledger_entries", "ledger_permit_budgets", "ledger_periods",
            "ledger_period_transitions")],
        "sums": sorted(tuple(r) for r in s.query(
            "SELECT period, belongs_to, kind, COUNT(*), "
            "CAST(SUM(amount_micros) AS BIGINT), CAST(SUM(held_micros) AS BIGINT), "
            "CAST(SUM(actual_micros) AS BIGINT) FROM ledger_entries "
            "GROUP BY period, belongs_to, kind")),
        "ids": [int(r[0]) for r in s.query("SELECT id FROM ledger_entries ORDER BY id")],
        "periods": s.periods(),
        "transitions": s.transitions("2026-03"),
    }


def booked_by_period(month: Month, arrive: Sequence[int], closed_at: int) -> dict[str, int]:
    """Where the book says each amount lands: March closes at ``closed_at``."""
    out: dict[str, int] = defaultdict(int)
    for e, at in zip(month.entries, arrive, strict=True):
        target = "2026-04" if e.belongs_to == "2026-03" and at >= closed_at else e.belongs_to
        out[target] += e.micros
    return dict(out)


@pytest.mark.parametrize("version", list(range(1, LATEST)))
def test_a_ledger_at_each_older_schema_upgrades_with_every_row_and_total_kept(
        url: str, version: int, monkeypatch: pytest.MonkeyPatch,
        opened: list[LedgerStore]) -> None:
    rng = random.Random(7000 + version)
    march = random_month(rng, 2026, 3, 40)
    for i, fate in enumerate(("settled", "overrun", "expired_late", "degraded")):
        issued = APR - 86_400_000 + i
        held = 0 if fate == "degraded" else 2_000_000
        # Late actuals: settled after March was closed.
        march.add(Permit(pid(issued, 100 + i), "acme", "chat", issued, held, 2_000_000, fate,
                         2_000_000 * PICO + rng.randrange(-PICO * 1000, PICO * 1000)),
                  settle_at=APR + 86_400_000)
    # The old release books March, closes it, then books late events of March
    # (settlements and expiries arriving in April) and some April traffic.
    old = store_at(url, version, opened)
    with monkeypatch.context() as m:
        book_at(version, m)
        early = [e for e in march.entries if e.arrives_ms < APR]
        late = [e for e in march.entries if e.arrives_ms >= APR]
        assert len(late) == 4
        old.write_batch([parse_entry(e.event_id, e.fields) for e in early])
        old.transition("2026-03", "closed", actor="finance", at_ms=APR + 1)
        old.write_batch([parse_entry(e.event_id, e.fields) for e in late])
    old.query("INSERT INTO ledger_permit_budgets (permit_id, ordinal, event_id, budget_id, "
              "window_start_ms, window_end_ms, limit_micros) VALUES (?, 0, ?, 'org', ?, ?, ?)",
              (march.permits[0].pid, march.entries[0].event_id, MAR, APR, 1_000_000_000))
    arrive = [MAR if e.arrives_ms < APR else APR + 2 for e in march.entries]
    want = booked_by_period(march, arrive, APR + 1)
    before = books(old)
    totals_before = {p: old.period_totals(p) for p in ("2026-03", "2026-04")}
    assert before["counts"][1] == len(march.entries) + sum(
        1 for e in march.entries if e.kind == "correction")  # settlement + correction
    old.close()

    new = LedgerStore(url)
    opened.append(new)
    assert new.migrate() == list(range(version + 1, LATEST + 1))
    assert schema(new) == (LATEST, set(range(1, LATEST + 1)))
    assert books(new) == before
    for p, t in totals_before.items():
        assert new.period_totals(p) == t
        assert t["booked_micros"] == want.get(p, 0)
    # Old entries read with their booked amounts (no exact column then).
    assert new.query("SELECT COUNT(*) FROM ledger_entries WHERE actual_pico IS NOT NULL") == [
        (0,)]
    assert new.query("SELECT COUNT(*) FROM ledger_entries WHERE caller <> ''") == [(0,)]
    report = build_report(new, "2026-04", ["tenant"])
    assert report.total.booked_line_micros == want["2026-04"]
    # The upgraded writer books on top, into the period March's late amounts go to.
    may = random_month(random.Random(version), 2026, 5, 5)
    assert new.write_batch([parse_entry(e.event_id, e.fields) for e in may.entries]) == len(
        may.entries)
    assert new.period_totals("2026-03") == totals_before["2026-03"]

    # The append-only guards are still in force after the upgrade, on old and new rows.
    for table, column in (("ledger_events", "etype"), ("ledger_entries", "amount_micros"),
                          ("ledger_permit_budgets", "limit_micros"),
                          ("ledger_period_transitions", "actor")):
        for stmt in (f"UPDATE {table} SET {column} = {column}", f"DELETE FROM {table}"):
            with pytest.raises(Exception, match="append-only"):
                new.query(stmt)
    with pytest.raises(Exception, match="append-only"):
        new.query("UPDATE ledger_entries SET actual_pico = 1")
    assert new.period_totals("2026-03") == totals_before["2026-03"]


def with_migrations(monkeypatch: pytest.MonkeyPatch, migrations: tuple[Migration, ...]) -> None:
    monkeypatch.setattr(ledger_store, "MIGRATIONS", migrations)
    monkeypatch.setattr(ledger_store, "LATEST", migrations[-1].version)


def test_a_migration_that_fails_halfway_leaves_the_previous_schema_and_resumes(
        url: str, monkeypatch: pytest.MonkeyPatch, opened: list[LedgerStore]) -> None:
    old = store_at(url, LATEST - 1, opened)
    march = random_month(random.Random(11), 2026, 3, 10)
    with monkeypatch.context() as m:
        book_at(LATEST - 1, m)
        old.write_batch([parse_entry(e.event_id, e.fields) for e in march.entries])
    before = books(old)
    last = MIGRATIONS[-1]
    # The last migration's statements run, then the next one fails (a statement the
    # server refuses), before its version row is written.
    broken = Migration(last.version, last.name, (*last.sqlite, "SELEC broken"),
                       (*last.postgresql, "SELEC broken"))
    with monkeypatch.context() as m:
        with_migrations(m, (*MIGRATIONS[:-1], broken))
        with pytest.raises(Exception, match="syntax error"):
            LedgerStore(url).migrate()
    check = LedgerStore(url)
    opened.append(check)
    assert schema(check) == (LATEST - 1, set(range(1, LATEST)))
    assert "actual_pico" not in entry_columns(check)
    assert books(check) == before
    # The next start applies it in full.
    assert check.migrate() == [LATEST]
    assert "actual_pico" in entry_columns(check)
    assert books(check) == before


KILLED_SQLITE = textwrap.dedent("""
    import os, sys
    from keel_pdp.ledger import store as ledger_store
    from keel_pdp.ledger.migrations import MIGRATIONS, Migration
    last = MIGRATIONS[-1]
    # Killed (no cleanup at all) between the last migration's statements.
    dying = Migration(last.version, last.name, (*last.sqlite, "SELECT keel_die()"), ())
    ledger_store.MIGRATIONS = (*MIGRATIONS[:-1], dying)
    s = ledger_store.LedgerStore(sys.argv[1])
    s.connection().create_function("keel_die", 0, lambda: os._exit(9))
    s.migrate()
""")

KILLED_PG = textwrap.dedent("""
    import sys
    from keel_pdp.ledger import store as ledger_store
    from keel_pdp.ledger.migrations import MIGRATIONS, Migration
    last = MIGRATIONS[-1]
    slow = Migration(last.version, last.name, (),
                     (*last.postgresql, "SELECT pg_sleep(20) /* keel-migration-kill */"))
    ledger_store.MIGRATIONS = (*MIGRATIONS[:-1], slow)
    ledger_store.LedgerStore(sys.argv[1]).migrate()
""")


def test_a_writer_killed_between_migration_statements_leaves_no_half_schema(
        url: str, monkeypatch: pytest.MonkeyPatch, opened: list[LedgerStore]) -> None:
    old = store_at(url, LATEST - 1, opened)
    march = random_month(random.Random(12), 2026, 3, 10)
    with monkeypatch.context() as m:
        book_at(LATEST - 1, m)
        old.write_batch([parse_entry(e.event_id, e.fields) for e in march.entries])
    before = books(old)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    if old.dialect == "sqlite":
        old.close()
        proc = subprocess.run([sys.executable, "-c", KILLED_SQLITE, url], env=env,
                              timeout=60, check=False)
        assert proc.returncode == 9
    else:
        child = subprocess.Popen([sys.executable, "-c", KILLED_PG, url], env=env)
        try:
            deadline = time.monotonic() + 30
            # Wait until the child is inside its migration, past the ALTER TABLE.
            while not old.query("SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE ?",
                                ("%keel-migration-kill */",))[0][0]:
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    check = LedgerStore(url)
    opened.append(check)
    deadline = time.monotonic() + 30
    while True:  # the server notices the dropped connection and rolls back
        try:
            assert schema(check) == (LATEST - 1, set(range(1, LATEST)))
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert "actual_pico" not in entry_columns(check)
    assert books(check) == before
    assert check.migrate() == [LATEST]
    assert books(check) == before


@pytest.mark.parametrize("from_version", [0, 2])
def test_writers_starting_at_once_against_postgresql_migrate_once(
        pg_url: str, from_version: int, opened: list[LedgerStore]) -> None:
    if from_version:
        store_at(pg_url, from_version, opened).close()
    n = 6
    barrier = threading.Barrier(n)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def start() -> None:
        s = LedgerStore(pg_url)
        try:
            s.connection()
            barrier.wait(timeout=30)
            results.append(s.migrate())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results, key=len) == [[]] * (n - 1) + [
        list(range(from_version + 1, LATEST + 1))]
    check = LedgerStore(pg_url)
    opened.append(check)
    assert schema(check) == (LATEST, set(range(1, LATEST + 1)))
    assert check.query("SELECT COUNT(*) FROM pg_trigger WHERE tgname LIKE ?",
                       ("ledger_%_append_only",)) == [(4,)]


def test_a_store_newer_than_the_code_is_refused_and_nothing_is_written(
        url: str, opened: list[LedgerStore], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    s = LedgerStore(url)
    opened.append(s)
    s.migrate()
    s.query("INSERT INTO ledger_schema_migrations VALUES (?, ?, ?)", (LATEST + 1, "next", 0))
    before = books(s)
    s.close()
    # The code as the previous release shipped it meets the upgraded store.
    with monkeypatch.context() as m:
        with_migrations(m, MIGRATIONS[:-1])
        with pytest.raises(StoreError, match=rf"version {LATEST + 1} is newer"):
            LedgerStore(url).migrate()
    with pytest.raises(StoreError, match=rf"version {LATEST + 1} is newer than this keel-pdp"):
        LedgerStore(url).migrate()
    assert main(["ledger", "period", "close", "--store", url, "--period", "2026-01",
                 "--to", "closed"]) == 1
    assert "upgrade keel-pdp" in capsys.readouterr().err
    check = LedgerStore(url)
    opened.append(check)
    assert books(check) == before
    assert check.periods() == {}


def test_a_locked_sqlite_ledger_is_waited_for_then_migrated(
        tmp_path: pathlib.Path, opened: list[LedgerStore]) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    store_at(url, 2, opened).close()
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, timeout=0.1)
    try:
        other.execute("BEGIN EXCLUSIVE")
        s = LedgerStore(url, connect_timeout_s=0.2)
        opened.append(s)
        with pytest.raises(StoreUnavailable):
            s.migrate()
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert s.migrate() == list(range(3, LATEST + 1))


def test_a_file_that_is_not_a_ledger_database_is_a_broken_store(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.db"
    junk = b"this is a log file someone pointed the ledger at\n" * 200
    path.write_bytes(junk)
    with pytest.raises(StoreBroken) as err:
        LedgerStore(f"sqlite:///{path}").migrate()
    assert str(path) in str(err.value)
    assert "not a database" in str(err.value)
    # The command line answers with one line, not a traceback; the file is untouched.
    assert main(["ledger", "period", "status", "--store", f"sqlite:///{path}"]) == 1
    assert "not a database" in capsys.readouterr().err
    assert path.read_bytes() == junk


def test_a_damaged_sqlite_ledger_stops_with_a_broken_store_error(
        tmp_path: pathlib.Path, opened: list[LedgerStore]) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    s = LedgerStore(url)
    s.migrate()
    march = random_month(random.Random(13), 2026, 3, 30)
    s.write_batch([parse_entry(e.event_id, e.fields) for e in march.entries])
    s.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    path = tmp_path / "ledger.db"
    data = bytearray(path.read_bytes())
    page = 4096
    # Scribble over the index pages of the entries table (a failing disk).
    for i in range(page * 3, len(data)):
        data[i] = 0xA5
    path.write_bytes(bytes(data))
    s = LedgerStore(url)
    opened.append(s)
    # Starting (migrate) or booking meets the damage and stops (nothing to retry),
    # naming the file.
    def start_and_book() -> None:
        s.migrate()
        s.write_batch([parse_entry(e.event_id, e.fields) for e in march.entries])

    with pytest.raises(StoreBroken) as err:
        start_and_book()
    assert str(path) in str(err.value)
    assert "malformed" in str(err.value)
    assert not isinstance(err.value, StoreUnavailable)


def test_a_slow_migration_is_not_cut_off_by_the_statement_timeout(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[LedgerStore]) -> None:
    """Migration 3 indexes every entry; on a large ledger that takes longer than the
    30-second statement timeout the writer's connection runs under. Here the timeout
    is 1 s and the migration takes 2 s."""
    store_at(pg_url, LATEST - 1, opened).close()
    connect = LedgerStore._connect

    def short_timeout(self: LedgerStore) -> Any:
        conn = connect(self)
        if self.dialect == "postgresql":
            conn.execute("SET statement_timeout = 1000")
        return conn

    monkeypatch.setattr(LedgerStore, "_connect", short_timeout)
    last = MIGRATIONS[-1]
    slow = Migration(last.version, last.name, last.sqlite,
                     ("SELECT pg_sleep(2)", *last.postgresql))
    with_migrations(monkeypatch, (*MIGRATIONS[:-1], slow))
    s = LedgerStore(pg_url)
    opened.append(s)
    assert s.migrate() == [LATEST]
    # Ordinary statements still run under the connection's timeout.
    with pytest.raises(StoreUnavailable, match="statement timeout"):
        s.query("SELECT pg_sleep(2)")


def test_a_command_line_tool_never_upgrades_a_ledger_in_use(
        url: str, opened: list[LedgerStore], capsys: pytest.CaptureFixture[str]) -> None:
    """A newer keel-pdp used to read a report must not migrate the production ledger
    under the writers of the previous version (they would then refuse to start: the
    schema is newer than theirs). The writer migrates when it starts; the tool asks
    for that instead."""
    s = store_at(url, LATEST - 1, opened)
    assert schema(s) == (LATEST - 1, set(range(1, LATEST)))
    for argv in (["ledger", "report", "--store", url, "--period", "2026-01"],
                 ["ledger", "period", "status", "--store", url]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"version {LATEST - 1}" in err and "upgrade the ledger writer first" in err
    assert schema(s) == (LATEST - 1, set(range(1, LATEST)))  # nothing applied
    # once the writer has migrated it, the tool reads it
    writer = LedgerStore(url)
    opened.append(writer)
    writer.migrate()
    assert main(["ledger", "period", "status", "--store", url]) == 0
