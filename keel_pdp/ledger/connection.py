"""One connection to the ledger database, SQLite or PostgreSQL, and its transactions.

This module exists so that the rest of the ledger never cares which database it
talks to: the URL picks the dialect, SQL is written once with ``?`` placeholders,
and every driver failure is sorted into one of three answers the writer can act
on. A connection-level failure surfaces as ``StoreUnavailable`` (back off, retry
the same batch); data the store refuses is ``StoreRejected`` (dead-letter it);
anything else is a bug and propagates. On SQLite only busy/locked/I-O/full/
can't-open are outages; any other SQLite error (a syntax error, "no such table", a
damaged or foreign file) is ``StoreBroken``.

What is stored, and how, is ``keel_pdp.ledger.store``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from keel_pdp.errors import LedgerRejected, LedgerStoreBroken, LedgerStoreError, LedgerUnavailable

# The ledger store's errors are nodes of keel_pdp.errors (LedgerError); their names
# here are the ones the ledger code has always used.
StoreUnavailable = LedgerUnavailable
StoreError = LedgerStoreError
StoreBroken = LedgerStoreBroken
StoreRejected = LedgerRejected


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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT of one row that skips rows conflicting with a unique key."""
    # Table and column names are module constants, never input.
    marks = ", ".join("?" for _ in columns)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "  # noqa: S608
            "ON CONFLICT DO NOTHING")


class Tx:
    """A cursor inside one transaction; SQL uses ``?`` placeholders on both dialects."""

    def __init__(self, store: LedgerConnection, cur: Any) -> None:
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
            return self.many(insert_sql(table, columns), rows)
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


class LedgerConnection:
    """A connection to the ledger database named by a URL, reconnecting after
    connection-level failures; hands out transactions (``tx``) whose failures are
    already sorted into outage, rejected data and bug."""

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
        # Any other SQLite error, not only OperationalError: a damaged file ("database
        # disk image is malformed", "file is not a database") is a DatabaseError.
        if self.dialect == "sqlite" and isinstance(exc, sqlite3.DatabaseError) and \
                not isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
            raise StoreBroken(
                f"the SQLite ledger {self._path} refused a statement: {exc}{_sqlite_name(exc)}. "
                "This is not an outage (retrying cannot help): the file or its schema is "
                "damaged, or the statement is wrong; nothing of the batch was "
                "committed") from exc

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
