"""The ledger store: one schema on SQLite (embedded default) or PostgreSQL.

Every write is idempotent on the stream entry id: the events table is keyed by
it, entries are unique on (event id, sequence) and, for the facts a permit has
at most once, on (permit id, kind). Inserts use ON CONFLICT DO NOTHING, so a
batch delivered twice (the writer died between commit and acknowledgement)
books nothing the second time.

A connection-level failure surfaces as ``StoreUnavailable`` so the writer can
back off and retry the same batch; anything else is a bug and propagates. On
SQLite, only busy/locked/I-O/full/can't-open are outages; any other
``OperationalError`` (a syntax error, "no such table") is ``StoreBroken``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keel_pdp.ledger.events import (
    BudgetRow,
    Dims,
    EntryRow,
    StreamEvent,
    derive,
)
from keel_pdp.ledger.migrations import BOOKKEEPING, LATEST, MIGRATIONS
from keel_pdp.ledger.periods import (
    STATES,
    PeriodError,
    bounds_ms,
    check_period,
    next_period,
)

_CHUNK = 500
_ENTRY_COLUMNS = (
    "event_id", "seq", "kind", "permit_id", "ts_ms", "booked_at_ms", "period", "belongs_to",
    "decision", "status", "tenant", "workload", "model", "provider", "request_id",
    "policy_revision", "price_revision", "estimate_micros", "held_micros", "actual_micros",
    "priced_micros", "provider_cost_micros", "amount_micros", "input_tokens",
    "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "max_output_tokens", "price_input_pico", "price_cached_input_pico",
    "price_cache_write_pico", "price_output_pico", "reason", "degraded", "actor", "detail",
    "caller",
)
_BUDGET_COLUMNS = (
    "permit_id", "ordinal", "event_id", "budget_id", "scope", "window_kind", "window_start_ms",
    "window_end_ms", "limit_micros", "mode", "split", "settled_micros", "held_micros", "failed",
    "applied", "granted_micros",
)


class StoreUnavailable(Exception):
    """The store could not be reached or did not accept the transaction; retry later."""


class StoreError(Exception):
    """The store cannot be used as it is (bad URL, schema newer than this code)."""


class StoreBroken(StoreError):
    """The store refused the statement itself (a SQL error, a missing table): a bug
    or a damaged schema, not an outage. Retrying cannot help; the writer stops."""


# SQLite primary result codes that mean "not now" (https://sqlite.org/rescode.html):
# BUSY, LOCKED, IOERR, FULL, CANTOPEN, and PROTOCOL (a WAL lock race). Anything
# else (ERROR: syntax, no such table; CORRUPT, NOTADB, READONLY, ...) will not
# get better by retrying the same batch.
_SQLITE_OUTAGES = {5: "SQLITE_BUSY", 6: "SQLITE_LOCKED", 10: "SQLITE_IOERR",
                   13: "SQLITE_FULL", 14: "SQLITE_CANTOPEN", 15: "SQLITE_PROTOCOL"}


def sqlite_outage(exc: BaseException) -> bool:
    """Whether a sqlite3 error is an outage (retry later) rather than a bug."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _SQLITE_OUTAGES


def _sqlite_name(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f" [{name}]" if name else ""


class StoreRejected(Exception):
    """The store refused the data itself (a constraint or a value it cannot hold);
    retrying the same rows cannot succeed."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _insert(table: str, columns: Sequence[str]) -> str:
    # Table and column names are module constants, never input.
    marks = ", ".join("?" for _ in columns)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "  # noqa: S608
            "ON CONFLICT DO NOTHING")


@dataclass(frozen=True, slots=True)
class Transition:
    period: str
    from_state: str
    to_state: str
    summary: dict[str, Any]


class Tx:
    """A cursor inside one transaction; SQL uses ``?`` placeholders on both dialects."""

    def __init__(self, store: LedgerStore, cur: Any) -> None:
        self._store = store
        self._cur = cur

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self._store.sql(sql), tuple(params))
        if self._cur.description is None:
            return []
        return [tuple(r) for r in self._cur.fetchall()]

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        self._cur.executemany(self._store.sql(sql), rows)
        return int(self._cur.rowcount or 0)

    def script(self, sql: str) -> None:
        """DDL with no parameters (PostgreSQL bodies may contain '%')."""
        self._cur.execute(sql)

    def insert_new(self, table: str, columns: Sequence[str],
                   rows: Sequence[Sequence[Any]]) -> int:
        """Insert rows, skipping any that conflict with a unique key; returns how many
        were new. PostgreSQL goes through COPY into a temporary table (one round trip
        for the rows instead of one statement each), in the order given."""
        if not rows:
            return 0
        if self._store.dialect != "postgresql":
            return self.many(_insert(table, columns), rows)
        # Table and column names are module constants, never input.
        cols = ", ".join(columns)
        tmp = f"ledger_load_{table}"
        self._cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {tmp} ON COMMIT DELETE ROWS AS "  # noqa: S608
            f"SELECT {cols}, 0 AS ord FROM {table} WITH NO DATA")
        with self._cur.copy(f"COPY {tmp} ({cols}, ord) FROM STDIN") as copy:
            for i, row in enumerate(rows):
                copy.write_row((*row, i))
        self._cur.execute(
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {tmp} "  # noqa: S608
            "ORDER BY ord ON CONFLICT DO NOTHING")
        return int(self._cur.rowcount or 0)


class LedgerStore:
    """A connection to the ledger, reconnecting after connection-level failures."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            if not url.startswith("sqlite:///"):
                raise StoreError(f"store URL {url!r}: use sqlite:///relative/path or "
                                 "sqlite:////absolute/path")
            self.dialect = "sqlite"
            self._path = url[len("sqlite:///"):]
            if not self._path:
                raise StoreError(f"store URL {url!r} names no file")
        elif parts.scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self._path = ""
        else:
            raise StoreError(f"store URL {url!r}: scheme must be sqlite:/// or postgresql://")
        self._conn: Any = None

    # ---------------------------------------------------------- connection
    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            conn: Any = sqlite3.connect(self._path, isolation_level=None,
                                   timeout=self.connect_timeout_s)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            return conn
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True,
                               connect_timeout=max(1, int(self.connect_timeout_s)))
        conn.execute("SET statement_timeout = 30000")
        return conn

    def connection(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except Exception as exc:
                if self._unavailable(exc):
                    raise StoreUnavailable(f"{type(exc).__name__}: {exc}"
                                           f"{_sqlite_name(exc)}") from exc
                self._raise_broken(exc)
                raise
        return self._conn

    def _unavailable(self, exc: BaseException) -> bool:
        if self.dialect == "sqlite":
            return sqlite_outage(exc)
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def _rejected(self, exc: BaseException) -> bool:
        if self.dialect == "sqlite":
            return isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError)
        import psycopg

        return isinstance(exc, psycopg.IntegrityError | psycopg.DataError)

    def _raise_broken(self, exc: BaseException) -> None:
        if self.dialect == "sqlite" and isinstance(exc, sqlite3.OperationalError):
            raise StoreBroken(
                f"the SQLite ledger {self._path} refused a statement: {exc}{_sqlite_name(exc)}. "
                "This is not an outage (retrying cannot help): the schema is damaged or "
                "the statement is wrong; nothing of the batch was committed") from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        """One transaction (SQLite: BEGIN IMMEDIATE, so writers are serialised)."""
        conn = self.connection()
        try:
            if self.dialect == "sqlite":
                cur = conn.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(self, cur)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            else:
                with conn.transaction(), conn.cursor() as cur:
                    yield Tx(self, cur)
        except Exception as exc:
            if self._unavailable(exc):
                self.close()
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}"
                                       f"{_sqlite_name(exc)}") from exc
            if self._rejected(exc):
                raise StoreRejected(f"{type(exc).__name__}: {exc}") from exc
            self._raise_broken(exc)
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.tx() as tx:
            return tx.run(sql, params)

    def ping(self) -> bool:
        try:
            self.query("SELECT 1")
            return True
        except StoreUnavailable:
            return False

    # ---------------------------------------------------------- migrations
    def migrate(self) -> list[int]:
        """Apply the migrations this store has not seen; returns their versions."""
        applied: list[int] = []
        with self.tx() as tx:
            if self.dialect == "postgresql":
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
            got = tx.run("SELECT id, period FROM ledger_entries WHERE event_id = ? AND seq = 0",
                         (event_id,))
        return int(got[0][0]), str(got[0][1])

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


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL; the raw event keeps the original.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _entry_values(r: EntryRow, dims: Dims, period: str, at: int) -> tuple[Any, ...]:
    price = r.price_pico or (None, None, None, None)
    return (
        r.event_id, r.seq, r.kind, _text(r.permit_id), r.ts_ms, at, period, r.belongs_to,
        r.decision, _text(r.status), _text(dims.tenant), _text(dims.workload),
        _text(dims.model), _text(dims.provider), _text(r.request_id),
        _text(r.policy_revision), _text(r.price_revision), r.estimate_micros, r.held_micros,
        r.actual_micros, r.priced_micros, r.provider_cost_micros, r.amount_micros,
        r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
        r.reasoning_tokens, r.max_output_tokens, price[0], price[1], price[2], price[3],
        _text(r.reason), 1 if r.degraded else 0, "",
        json.dumps(r.detail, separators=(",", ":"), sort_keys=True, default=str),
        _text(r.caller),
    )


def _budget_values(b: BudgetRow) -> tuple[Any, ...]:
    return (b.permit_id, b.ordinal, b.event_id, b.budget_id, b.scope, b.window_kind,
            b.window_start_ms, b.window_end_ms, b.limit_micros, b.mode, b.split,
            b.settled_micros, b.held_micros, 1 if b.failed else 0, 1 if b.applied else 0,
            b.granted_micros)


def open_store(url: str, *, migrate: bool = True) -> LedgerStore:
    store = LedgerStore(url)
    if migrate:
        store.migrate()
    return store
