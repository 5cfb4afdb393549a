"""One connection to the ledger database, SQLite or PostgreSQL, and its transactions.

This module exists so that the rest of the ledger never cares which database it
talks to: the URL picks the dialect, SQL is written once with ``?`` placeholders,
and every driver failure is sorted into one of three answers the writer can act
on, each with a message that names the problem and what to do about it:

* ``StoreUnavailable``: it may heal without anyone touching the ledger (the
  server is down, restarting, read-only after a failover, out of disk, a lock
  or statement timeout): close the connection, back off, retry the same batch.
* ``StoreRejected``: the rows themselves (a constraint, a value the column
  cannot hold): dead-letter them.
* ``StoreBroken``: only an operator can fix it (a privilege revoked, a table or
  column changed by hand, a damaged file): stop, retrying cannot help.

On SQLite only busy/locked/I-O/full/can't-open are outages; any other SQLite
error (a syntax error, "no such table", a damaged or foreign file) is broken. On
PostgreSQL the SQLSTATE decides (``_PG_ERRORS``). An exception that is no
database error at all is a bug and propagates as it is.

What is stored, and how, is ``keel_pdp.ledger.store``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal
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


# PostgreSQL errors by SQLSTATE (https://www.postgresql.org/docs/current/errcodes-appendix.html):
# the code itself when listed, else its two-character class; anything else is broken.
# Each names the problem and what the operator does; "{role}" is the connecting role.
Verdict = Literal["outage", "rejected", "broken"]
_PG_ERRORS: dict[str, tuple[Verdict, str, str]] = {
    "08": ("outage", "the connection failed", "check the server and the network"),
    "57": ("outage", "the server is shutting down, restarting or recovering",
           "wait for it to accept connections again"),
    "57014": ("outage",
              "a statement ran past its time limit (statement_timeout, 30 s on the "
              "writer's connection) or an administrator cancelled it",
              "look for sessions that hold locks on the ledger tables and for a server "
              "under load (pg_stat_activity)"),
    "57P04": ("broken", "the ledger database was dropped",
              "restore it from a backup; the stream entries not yet stored stay pending"),
    "55P03": ("outage", "a lock on a ledger table was not granted within lock_timeout",
              "find the session that holds it (pg_locks joined to pg_stat_activity): a "
              "manual LOCK, a long transaction or report"),
    "53100": ("outage", "the server is out of disk space",
              "free or grow its data volume (WAL and temporary files included)"),
    "53": ("outage", "the server is out of a resource (memory, connection slots, lock table)",
           "see the server's log; raise the limit or lower the load"),
    "58": ("outage", "the server had an I/O or system error",
           "check the server's disk and log"),
    "40": ("outage", "the transaction was rolled back (a serialization failure or a deadlock)",
           "nothing, if it is rare"),
    "25006": ("outage",
              "the server accepts no writes on this connection: it is a standby (after "
              "a failover) or default_transaction_read_only is on",
              "point the store URL at the primary (with several hosts in the URL, "
              "target_session_attrs=read-write makes libpq pick it) or turn read-only off"),
    "28": ("outage", "the server refused the login (role, password or pg_hba.conf)",
           "fix the credentials in the store URL or the server's pg_hba.conf"),
    "3D": ("outage", "the database does not exist", "create it, or fix the store URL"),
    "22": ("rejected", "", ""),
    "23": ("rejected", "", ""),
    "42501": ("broken", "role {role} lacks a privilege the ledger needs",
              "grant it: the ledger writer needs SELECT and INSERT on every ledger_* "
              "table, USAGE on their sequences and, to migrate the schema, CREATE on "
              "it (GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}; GRANT "
              "USAGE ON ALL SEQUENCES IN SCHEMA public TO {role})"),
    "42": ("broken",
           "the ledger schema is not the one keel-pdp created (a table or column "
           "missing, renamed or of another type) or a statement is wrong",
           "restore the schema keel-pdp created (docs/ledger.md, Failures)"),
    "XX": ("broken", "the server reports an internal error or damaged data",
           "see the server's log; restore damaged data from a backup"),
}
_PG_OTHER: tuple[Verdict, str, str] = (
    "broken", "the server refused the transaction", "see the server's log")


def pg_verdict(sqlstate: str | None) -> tuple[Verdict, str, str]:
    """What a PostgreSQL error with ``sqlstate`` means for the ledger: the verdict,
    the problem and what to do (see ``_PG_ERRORS``)."""
    if not sqlstate:
        return _PG_OTHER
    return _PG_ERRORS.get(sqlstate) or _PG_ERRORS.get(sqlstate[:2]) or _PG_OTHER


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
                err = self._sorted(exc)
                if err is None:
                    raise
                raise err from exc
        return self._conn

    @property
    def where(self) -> str:
        """The database, for messages: the SQLite file, or PostgreSQL's
        role@host:port/database (never the password)."""
        if self.dialect == "sqlite":
            return self._path
        try:
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(self.url)
        except Exception:
            return "(the store URL)"
        role = str(info.get("user") or "")
        host = str(info.get("host") or "localhost")
        port = str(info.get("port") or "5432")
        return f"{role + '@' if role else ''}{host}:{port}/{info.get('dbname') or role}"

    def _role(self) -> str:
        try:
            return str(self._conn.info.user)
        except Exception:
            return self.where.partition("@")[0] if "@" in self.where else "(the store role)"

    def _sorted(self, exc: BaseException) -> StoreUnavailable | StoreRejected | StoreBroken | None:
        """``exc`` as the ledger error it is (None: no database error, a bug)."""
        if self.dialect == "sqlite":
            if sqlite_outage(exc):
                return StoreUnavailable(f"{type(exc).__name__}: {exc}{_sqlite_name(exc)}")
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
                return StoreRejected(f"{type(exc).__name__}: {exc}")
            # Any other SQLite error, not only OperationalError: a damaged file
            # ("database disk image is malformed", "file is not a database") is a
            # DatabaseError.
            if isinstance(exc, sqlite3.DatabaseError):
                return StoreBroken(
                    f"the SQLite ledger {self._path} refused a statement: {exc}"
                    f"{_sqlite_name(exc)}. This is not an outage (retrying cannot help): "
                    "the file or its schema is damaged, or the statement is wrong; "
                    "nothing of the batch was committed")
            return None
        import psycopg

        if not isinstance(exc, psycopg.Error):
            return None
        sqlstate = getattr(exc, "sqlstate", None)
        if not sqlstate:
            # Raised by the client: a connection that failed or broke (no server
            # answer, so no SQLSTATE), a value it cannot send (a NUL in text), or a bug.
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                return StoreUnavailable(f"{type(exc).__name__}: {exc}")
            if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
                return StoreRejected(f"{type(exc).__name__}: {exc}")
            return StoreBroken(f"the PostgreSQL ledger {self.where}: {type(exc).__name__}: "
                               f"{exc}; nothing of the transaction was committed")
        verdict, problem, action = pg_verdict(sqlstate)
        if verdict == "rejected":
            return StoreRejected(f"{type(exc).__name__}: {exc}")
        primary = getattr(getattr(exc, "diag", None), "message_primary", None) or \
            (str(exc).splitlines() or [type(exc).__name__])[0]
        role = self._role()
        said = (f"the PostgreSQL ledger {self.where}: {problem.format(role=role)}: {primary} "
                f"(SQLSTATE {sqlstate} {type(exc).__name__})")
        if verdict == "outage":
            return StoreUnavailable(f"{said}; {action.format(role=role)}. Retried on a new "
                                    "connection; nothing of the transaction was committed")
        todo = action.format(role=role)
        return StoreBroken(f"{said}. {todo[:1].upper()}{todo[1:]}. This is not an outage "
                           "(retrying cannot help); nothing of the transaction was committed")

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
            err = self._sorted(exc)
            if err is None:
                raise
            if isinstance(err, StoreUnavailable):
                # A new connection: the old one may be gone, or lead to a standby.
                self.close()
            raise err from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.tx() as tx:
            return tx.run(sql, params)

    def ping(self) -> bool:
        try:
            self.query("SELECT 1")
            return True
        except StoreUnavailable:
            return False
