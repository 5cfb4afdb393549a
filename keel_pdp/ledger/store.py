"""The ledger store: what is written to the ledger, and how periods move.

Every write is idempotent on the stream entry id: the events table is keyed by
it, entries are unique on (event id, sequence) and, for the facts a permit has
at most once, on (permit id, kind). Inserts use ON CONFLICT DO NOTHING, so a
batch delivered twice (the writer died between commit and acknowledgement)
books nothing the second time. An amount belonging to a closed period is booked
into the next period that is not closed (``book_targets``).

The database underneath (SQLite, the embedded default, or PostgreSQL), its
transactions and how its failures are sorted (``StoreUnavailable``: retry;
``StoreRejected``: the rows themselves; ``StoreBroken``: a bug) are
``keel_pdp.ledger.connection``; the column order is ``keel_pdp.ledger.rows``.
Both are re-exported here, the import path the rest of the code uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from keel_pdp.ledger.connection import (
    LedgerConnection,
    StoreBroken,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    Tx,
    now_ms,
    sqlite_outage,
)
from keel_pdp.ledger.connection import insert_sql as _insert
from keel_pdp.ledger.events import (
    BudgetRow,
    Dims,
    EntryRow,
    StreamEvent,
    derive,
)
from keel_pdp.ledger.migrations import BOOKKEEPING, LATEST, MIGRATIONS, expected_columns
from keel_pdp.ledger.money import usd
from keel_pdp.ledger.periods import (
    STATES,
    PeriodError,
    bounds_ms,
    check_period,
    next_period,
)
from keel_pdp.ledger.rows import BUDGET_COLUMNS as _BUDGET_COLUMNS
from keel_pdp.ledger.rows import ENTRY_COLUMNS as _ENTRY_COLUMNS
from keel_pdp.ledger.rows import budget_values as _budget_values
from keel_pdp.ledger.rows import entry_values as _entry_values

__all__ = ["LedgerStore", "StoreBroken", "StoreError", "StoreRejected", "StoreUnavailable",
           "Transition", "Tx", "now_ms", "open_store", "sqlite_outage"]

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Transition:
    """A period's move from one state to the next, with the books' summary at that moment."""

    period: str
    from_state: str
    to_state: str
    summary: dict[str, Any]


class LedgerStore(LedgerConnection):
    """The ledger: migrations, idempotent booking of stream events, imported usage
    and manual adjustments, and period states (open -> closing -> closed)."""

    # ---------------------------------------------------------- migrations
    def migrate(self) -> list[int]:
        """Apply the migrations this store has not seen; returns their versions."""
        applied: list[int] = []
        with self.tx() as tx:
            if self.dialect == "postgresql":
                # A migration may rewrite or index every entry: on a large ledger that
                # outlasts the connection's statement timeout, and a migration cut off
                # there would be retried (and cut off) on every start. This transaction
                # only runs without it.
                tx.run("SET LOCAL statement_timeout = 0")
                # One migrator at a time across processes.
                tx.run("SELECT pg_advisory_xact_lock(4242001)")
            tx.script(BOOKKEEPING)
            done = {int(r[0]) for r in tx.run("SELECT version FROM ledger_schema_migrations")}
            if done and max(done) > LATEST:
                raise StoreError(
                    f"ledger schema version {max(done)} is newer than this keel-pdp "
                    f"(knows up to {LATEST}); upgrade keel-pdp")
            for m in MIGRATIONS:
                if m.version in done:
                    continue
                for stmt in m.statements(self.dialect):
                    tx.script(stmt)
                tx.run("INSERT INTO ledger_schema_migrations (version, name, applied_at_ms) "
                       "VALUES (?, ?, ?)", (m.version, m.name, now_ms()))
                applied.append(m.version)
        return applied

    def schema_problems(self) -> list[str]:
        """How the ledger tables differ from what the migrations created (a column's
        type changed by hand, a column or table gone, a column added by hand that no
        insert can fill), one line each; empty when they do not."""
        want = expected_columns(self.dialect)
        problems: list[str] = []
        with self.tx() as tx:
            for table, columns in want.items():
                if self.dialect == "postgresql":
                    rows = tx.run(
                        "SELECT a.attname, format_type(a.atttypid, NULL), a.attnotnull AND NOT "
                        "a.atthasdef AND a.attidentity = '' AND a.attgenerated = '' "
                        "FROM pg_attribute a WHERE a.attrelid = to_regclass(?) "
                        "AND a.attnum > 0 AND NOT a.attisdropped", (table,))
                else:
                    rows = tx.run("SELECT name, type, \"notnull\" AND dflt_value IS NULL "
                                  "AND pk = 0 FROM pragma_table_info(?)", (table,))
                if not rows:
                    problems.append(f"table {table} is missing")
                    continue
                have = {str(n): (str(t).lower(), bool(req)) for n, t, req in rows}
                for col, typ in columns.items():
                    if col not in have:
                        problems.append(f"{table}.{col} is missing")
                    elif have[col][0] != typ:
                        problems.append(f"{table}.{col} is {have[col][0]}, keel-pdp writes {typ}")
                problems.extend(
                    f"{table}.{col} (not keel-pdp's) is NOT NULL without a default: no "
                    "insert of keel-pdp can fill it"
                    for col, (_, required) in have.items() if col not in columns and required)
        return problems

    def check_schema(self) -> None:
        """Raise ``StoreBroken`` naming every difference from the migrated schema."""
        problems = self.schema_problems()
        if problems:
            raise StoreBroken(self._changed_by_hand(problems))

    def _changed_by_hand(self, problems: list[str], refused: str = "") -> str:
        return (f"the ledger schema in {self.where} was changed by hand: "
                f"{'; '.join(problems)}. "
                + (f"The store refused the batch ({refused}); " if refused else "")
                + "keel-pdp cannot book into it: restore the tables as keel-pdp created them "
                "(docs/ledger.md, Failures). This is not an outage (retrying cannot help); "
                "nothing was committed")

    def schema_version(self) -> int:
        with self.tx() as tx:
            tx.script(BOOKKEEPING)
            rows = tx.run("SELECT MAX(version) FROM ledger_schema_migrations")
        return int(rows[0][0] or 0)

    # ---------------------------------------------------------- booking
    def _lock_periods(self, tx: Tx, since: str) -> dict[str, str]:
        lock = " FOR SHARE" if self.dialect == "postgresql" else ""
        rows = tx.run(f"SELECT period, state FROM ledger_periods WHERE period >= ?{lock}",  # noqa: S608
                      (since,))
        return {str(p): str(s) for p, s in rows}

    def _ensure_periods(self, tx: Tx, periods: Iterable[str], at_ms: int) -> None:
        tx.many(_insert("ledger_periods", ("period", "state", "updated_at_ms")),
                [(p, "open", at_ms) for p in sorted(set(periods))])

    def book_targets(self, tx: Tx, belongs: set[str], at_ms: int) -> dict[str, str]:
        """Where an amount belonging to each period is booked: the period itself
        unless it is closed, else the next period that is not closed.

        The period rows consulted are share-locked (PostgreSQL) so a concurrent
        close waits for this transaction, and sees its entries in its summary.
        """
        if not belongs:
            return {}
        wanted = set(belongs)
        while True:
            self._ensure_periods(tx, wanted, at_ms)
            states = self._lock_periods(tx, min(wanted))
            targets: dict[str, str] = {}
            for p in belongs:
                t = p
                while states.get(t) == "closed":
                    t = next_period(t)
                targets[p] = t
            missing = set(targets.values()) - set(states)
            if not missing:
                return targets
            wanted |= missing

    # ---------------------------------------------------------- writing
    def _known_dims(self, tx: Tx, pids: set[str]) -> dict[str, Dims]:
        out: dict[str, Dims] = {}
        ordered = sorted(pids)
        for i in range(0, len(ordered), _CHUNK):
            chunk = ordered[i:i + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            sql = ("SELECT permit_id, tenant, workload, model, provider "  # noqa: S608
                   "FROM ledger_entries WHERE kind IN ('permit', 'denial') "
                   f"AND permit_id IN ({marks})")
            rows = tx.run(sql, chunk)
            for pid, t, w, m, p in rows:
                out[str(pid)] = Dims(t, w, m, p)
        return out

    def write_batch(self, events: Sequence[StreamEvent], at_ms: int | None = None) -> int:
        """Store a batch of parsed events in one transaction; returns how many were new."""
        if not events:
            return 0
        at = now_ms() if at_ms is None else at_ms
        rows: list[EntryRow] = []
        budgets: list[BudgetRow] = []
        for ev in events:
            if ev.rows:
                rows.extend(ev.rows)
                budgets.extend(ev.budgets)
            else:
                r, b = derive(ev)
                rows.extend(r)
                budgets.extend(b)
        known = {r.permit_id: r.dims for r in rows if r.kind in ("permit", "denial")}
        try:
            return self._write(events, rows, budgets, known, at)
        except StoreRejected as exc:
            # Before the rows are taken for bad ones (and dead-lettered one by one):
            # a column whose type was changed by hand refuses every row alike.
            problems = self.schema_problems()
            if problems:
                first = (str(exc).splitlines() or [""])[0]
                raise StoreBroken(self._changed_by_hand(problems, first)) from exc
            raise

    def _write(self, events: Sequence[StreamEvent], rows: list[EntryRow],
               budgets: list[BudgetRow], known: dict[str, Dims], at: int) -> int:
        with self.tx() as tx:
            missing = {r.permit_id for r in rows if r.permit_id not in known}
            if missing:
                known.update(self._known_dims(tx, missing))
            targets = self.book_targets(tx, {r.belongs_to for r in rows}, at)
            new = tx.insert_new(
                "ledger_events", ("event_id", "etype", "permit_id", "ts_ms", "data", "res",
                                  "stored_at_ms"),
                [(e.event_id, e.etype, e.permit_id, e.ts_ms, e.raw_data, e.raw_res, at)
                 for e in events])
            tx.insert_new("ledger_entries", _ENTRY_COLUMNS,
                          [_entry_values(r, known.get(r.permit_id, r.dims),
                                         targets[r.belongs_to], at) for r in rows])
            tx.insert_new("ledger_permit_budgets", _BUDGET_COLUMNS,
                          [_budget_values(b) for b in budgets])
        return new

    def import_entries(self, rows: Sequence[EntryRow], at_ms: int | None = None) -> int:
        """Append entries built from an imported usage export (``ledger import``):
        no stream event behind them, so only the entries are written, booked like
        any other (a closed period's rows go to the next open one). Idempotent on
        (event id, seq) and on (permit, kind): a re-import books nothing. Returns
        how many entries were new."""
        if not rows:
            return 0
        at = now_ms() if at_ms is None else at_ms
        with self.tx() as tx:
            targets = self.book_targets(tx, {r.belongs_to for r in rows}, at)
            return tx.insert_new("ledger_entries", _ENTRY_COLUMNS,
                                 [_entry_values(r, r.dims, targets[r.belongs_to], at)
                                  for r in rows])

    def manual_adjustment(self, *, key: str, belongs_to: str, amount_micros: int, tenant: str,
                          workload: str = "", model: str = "", provider: str = "",
                          reason: str, actor: str, at_ms: int | None = None) -> tuple[int, str]:
        """Book a signed amount by hand; idempotent on ``key``. Returns (entry id, period)."""
        check_period(belongs_to)
        if not reason.strip():
            raise PeriodError("a manual adjustment needs a reason")
        at = now_ms() if at_ms is None else at_ms
        start, _ = bounds_ms(belongs_to)
        event_id = f"manual:{key}"
        row = EntryRow(event_id=event_id, seq=0, kind="manual_adjustment", permit_id="",
                       ts_ms=start, belongs_to=belongs_to,
                       dims=Dims(tenant, workload, model, provider), status="BOOKED",
                       amount_micros=amount_micros, actual_micros=amount_micros,
                       reason=reason[:512])
        with self.tx() as tx:
            target = self.book_targets(tx, {belongs_to}, at)[belongs_to]
            values = list(_entry_values(row, row.dims, target, at))
            values[_ENTRY_COLUMNS.index("actor")] = actor[:128]
            tx.many(_insert("ledger_entries", _ENTRY_COLUMNS), [values])
            got = tx.run("SELECT id, period, belongs_to, amount_micros, tenant, workload, model, "
                         "provider, reason FROM ledger_entries WHERE event_id = ? AND seq = 0",
                         (event_id,))
        # A retry with the same key is answered with the entry booked the first time;
        # the same key for another adjustment books nothing, and must not say it did.
        first = got[0]
        asked = (belongs_to, amount_micros, *(values[_ENTRY_COLUMNS.index(c)] for c in (
            "tenant", "workload", "model", "provider", "reason")))
        if tuple(first[2:]) != asked:
            raise PeriodError(
                f"adjustment key {key!r} was already used by entry {first[0]} ("
                f"{usd(int(first[3]))} USD for {first[4]!r}, period {first[2]}); nothing "
                "was booked: use a new key")
        return int(first[0]), str(first[1])

    # ---------------------------------------------------------- periods
    def periods(self) -> dict[str, str]:
        return {str(p): str(s) for p, s in
                self.query("SELECT period, state FROM ledger_periods ORDER BY period")}

    def period_state(self, period: str) -> str:
        check_period(period)
        rows = self.query("SELECT state FROM ledger_periods WHERE period = ?", (period,))
        return str(rows[0][0]) if rows else "open"

    def transitions(self, period: str) -> list[tuple[str, str, int, str, dict[str, Any]]]:
        rows = self.query(
            "SELECT from_state, to_state, at_ms, actor, summary FROM ledger_period_transitions "
            "WHERE period = ? ORDER BY id", (period,))
        return [(str(a), str(b), int(c), str(d), json.loads(e)) for a, b, c, d, e in rows]

    def transition(self, period: str, to_state: str, *, actor: str = "",
                   force: bool = False, at_ms: int | None = None) -> Transition:
        """Move a period forward: open -> closing -> closed (closed is final)."""
        check_period(period)
        if to_state not in STATES or to_state == "open":
            raise PeriodError(f"a period can only move to closing or closed, not {to_state!r}")
        at = now_ms() if at_ms is None else at_ms
        _, end = bounds_ms(period)
        if at < end and not force:
            raise PeriodError(
                f"period {period} has not ended yet; closing it now books every later "
                "decision of the month as an adjustment (use --force to do it anyway)")
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        with self.tx() as tx:
            self._ensure_periods(tx, [period], at)
            sql = f"SELECT state FROM ledger_periods WHERE period = ?{lock}"  # noqa: S608
            cur = str(tx.run(sql, (period,))[0][0])
            if STATES.index(to_state) <= STATES.index(cur):
                raise PeriodError(f"period {period} is {cur}; it cannot move to {to_state}")
            summary = self._summary(tx, period)
            tx.run("UPDATE ledger_periods SET state = ?, updated_at_ms = ? WHERE period = ?",
                   (to_state, at, period))
            tx.run("INSERT INTO ledger_period_transitions (period, from_state, to_state, at_ms, "
                   "actor, summary) VALUES (?, ?, ?, ?, ?, ?)",
                   (period, cur, to_state, at, actor[:128],
                    json.dumps(summary, separators=(",", ":"), sort_keys=True)))
        return Transition(period, cur, to_state, summary)

    def period_totals(self, period: str) -> dict[str, Any]:
        check_period(period)
        with self.tx() as tx:
            out = self._summary(tx, period)
            late = tx.run(
                "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM ledger_entries "
                "WHERE belongs_to = ? AND period <> ?", (period, period))
        out["late_out_micros"] = int(late[0][0])
        return out

    def _summary(self, tx: Tx, period: str) -> dict[str, Any]:
        booked = tx.run(
            "SELECT COUNT(*), COALESCE(MAX(id), 0), "
            "CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT), "
            "CAST(COALESCE(SUM(CASE WHEN belongs_to <> period THEN amount_micros ELSE 0 END), 0)"
            " AS BIGINT) FROM ledger_entries WHERE period = ?", (period,))[0]
        opened = tx.run(
            "SELECT COUNT(*), CAST(COALESCE(SUM(p.held_micros), 0) AS BIGINT) "
            "FROM ledger_entries p WHERE p.kind = 'permit' AND p.belongs_to = ? "
            "AND NOT EXISTS (SELECT 1 FROM ledger_entries t WHERE t.permit_id = p.permit_id "
            "AND t.kind IN ('settlement', 'void', 'expiry'))", (period,))[0]
        return {"entries": int(booked[0]), "max_entry_id": int(booked[1]),
                "booked_micros": int(booked[2]), "adjustments_in_micros": int(booked[3]),
                "open_permits": int(opened[0]), "open_accrual_micros": int(opened[1])}


def open_store(url: str, *, migrate: bool = True) -> LedgerStore:
    store = LedgerStore(url)
    if migrate:
        store.migrate()
    return store
