"""The ledger writer against a real PostgreSQL that refuses it in ways other than
an outage or a constraint: a read-only server (a standby after a failover), a
full disk, a lock held past lock_timeout, a privilege revoked, a column whose
type was changed by hand, a table renamed.

Every failure must reach the operator as a message that names the problem and
what to do, never as a driver traceback, and must cost nothing: the batch in hand
stays pending in the consumer group (never acknowledged, never dead-lettered),
and once the fault is gone the ledger holds every event exactly once. Faults that
heal without anyone touching the ledger are retried; the others stop the writer
with exit 2.

The writer connects as its own login role, which owns the ledger database (as a
deployment's writer role does); the faults are made by the superuser.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore
from tests.conftest import ROOT
from tests.helpers import make_engine
from tests.integration.conftest import (
    STREAM,
    PostgresServer,
    assert_ledger_matches_stream,
    drain,
    ledger_bundle,
    make_writer,
    traffic,
)
from tests.integration.pg_fixture import pg_server

__all__ = ["pg_server"]

GROUP = "keel-ledger"
BATCH = 10


@dataclass
class Ledger:
    """A ledger database owned by the writer's own login role."""

    role: str
    writer_url: str  # as the writer's role
    admin_url: str  # as the superuser: makes the faults, reads the books
    admin: psycopg.Connection[Any]

    def sql(self, text: str) -> None:
        self.admin.execute(text)

    def events(self) -> int:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SELECT COUNT(*) FROM ledger_events").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def ledger(pg_server: PostgresServer) -> Iterator[Ledger]:
    if not pg_server.running():
        pg_server.start()
    name = "t_" + uuid.uuid4().hex[:12]
    role = "w_" + name
    admin = psycopg.connect(pg_server.url(), autocommit=True)
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    admin.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
    admin.close()
    base = f"postgresql://{{}}@127.0.0.1:{pg_server.port}/{name}"
    conn = psycopg.connect(base.format("postgres"), autocommit=True)
    try:
        yield Ledger(role, base.format(role), base.format("postgres"), conn)
    finally:
        conn.close()


@pytest.fixture
async def stream(redis_url: str, tmp_path: pathlib.Path) -> redis.Redis:
    """40 genuine events of the real engine in the decision stream."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await traffic(make_engine(client, ledger_bundle(tmp_path / "bundle")), 40, "pg-fault")
    finally:
        await client.aclose()
    sync = redis.Redis.from_url(redis_url)
    assert sync.xlen(STREAM) > 2 * BATCH
    return sync


def first_batch(redis_url: str, ledger: Ledger) -> None:
    """A writer stores one batch, then stops (the faults hit the next one)."""
    store = LedgerStore(ledger.writer_url)
    store.migrate()
    assert make_writer(redis_url, store, batch_size=BATCH).step() == BATCH
    store.close()
    assert ledger.events() == BATCH


def pending(client: redis.Redis) -> int:
    summary: Any = client.xpending(STREAM, GROUP)
    return int(summary["pending"])


def settle_exactly_once(redis_url: str, ledger: Ledger, client: redis.Redis) -> None:
    """A writer started after the repair: the ledger holds every event once."""
    store = LedgerStore(ledger.writer_url)
    try:
        store.migrate()
        drain(make_writer(redis_url, store, batch_size=BATCH))
        assert pending(client) == 0
        assert client.xlen(STREAM + ":dead") == 0, "nothing may be dead-lettered"
        assert_ledger_matches_stream(store, client)
        assert ledger.events() == client.xlen(STREAM)
    finally:
        store.close()


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------ faults that heal
@dataclass(frozen=True)
class Fault:
    make: Callable[[Ledger], Any]
    heal: Callable[[Ledger, Any], None]
    says: tuple[str, ...]  # what the operator reads
    url_suffix: str = ""


def _read_only(led: Ledger) -> None:
    # A failover: the writer's server turns into a standby under it.
    led.sql(f'ALTER DATABASE "{led.writer_url.rsplit("/", 1)[1]}" '
            "SET default_transaction_read_only = on")
    led.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = "
            f"'{led.role}'")


def _read_write(led: Ledger, _: Any) -> None:
    led.sql(f'ALTER DATABASE "{led.writer_url.rsplit("/", 1)[1]}" '
            "RESET default_transaction_read_only")


def _disk_full(led: Ledger) -> None:
    # What PostgreSQL answers when it cannot extend a table's file.
    led.sql("CREATE FUNCTION fault_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device' "
            "USING ERRCODE = 'disk_full'; END $$")
    led.sql("CREATE TRIGGER fault_disk_full BEFORE INSERT ON ledger_entries "
            "FOR EACH STATEMENT EXECUTE FUNCTION fault_disk_full()")


def _space_freed(led: Ledger, _: Any) -> None:
    led.sql("DROP TRIGGER fault_disk_full ON ledger_entries")


def _locked(led: Ledger) -> psycopg.Connection[Any]:
    holder = psycopg.connect(led.admin_url)
    holder.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
    return holder


def _unlocked(led: Ledger, holder: psycopg.Connection[Any]) -> None:
    holder.rollback()
    holder.close()


HEALING = {
    "read-only-after-failover": Fault(_read_only, _read_write,
                                      ("read-only", "standby", "target_session_attrs")),
    "disk-full": Fault(_disk_full, _space_freed,
                       ("out of disk space", "No space left on device", "data volume")),
    "lock-timeout": Fault(_locked, _unlocked, ("lock_timeout", "pg_locks"),
                          "?options=-c%20lock_timeout%3D200"),
}


@pytest.mark.parametrize("case", sorted(HEALING))
def test_a_fault_that_heals_keeps_the_batch_and_says_what_to_do(
        case: str, stream: redis.Redis, ledger: Ledger, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    fault = HEALING[case]
    first_batch(redis_url, ledger)
    store = LedgerStore(ledger.writer_url + fault.url_suffix)
    writer = make_writer(redis_url, store, batch_size=BATCH)
    store.migrate()
    made = fault.make(ledger)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(writer.run())
        except BaseException as exc:  # a raw driver error: reported below
            outcome.append(exc)

    caplog.set_level(logging.WARNING, logger="keel_pdp.ledger")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        errors = writer.metrics.errors.labels("store")
        wait_until("the writer retried the batch three times",
                   lambda: bool(outcome) or errors._value.get() >= 3)
        assert not outcome, f"the writer ended on a fault that heals: {outcome}"
        assert writer.metrics.up.labels("store")._value.get() == 0
        assert ledger.events() == BATCH, "nothing may be stored while the fault lasts"
        assert pending(stream) == BATCH, "the batch in hand stays pending"
        said = "\n".join(r.getMessage() for r in caplog.records)
        for phrase in fault.says:
            assert phrase in said, said[-2000:]
        assert "Traceback" not in said
        fault.heal(ledger, made)
        wait_until("the writer stored the whole stream",
                   lambda: ledger.events() == stream.xlen(STREAM) and pending(stream) == 0)
    finally:
        writer.stop()
        thread.join(30)
        store.close()
    assert outcome == [0]
    assert writer.metrics.up.labels("store")._value.get() == 1
    settle_exactly_once(redis_url, ledger, stream)


# ------------------------------------------------------------------ faults that stop it
def _revoke(led: Ledger) -> None:
    led.sql(f'REVOKE INSERT ON ledger_entries FROM "{led.role}"')


def _grant(led: Ledger, _: Any) -> None:
    led.sql(f'GRANT INSERT ON ledger_entries TO "{led.role}"')


def _retype(led: Ledger) -> None:
    # Someone "fixes" the event time into a timestamp.
    led.sql("ALTER TABLE ledger_events ALTER COLUMN ts_ms TYPE timestamptz "
            "USING to_timestamp(ts_ms / 1000.0)")


def _restore_type(led: Ledger, _: Any) -> None:
    led.sql("ALTER TABLE ledger_events ALTER COLUMN ts_ms TYPE bigint "
            "USING round(extract(epoch FROM ts_ms) * 1000)::bigint")


def _rename(led: Ledger) -> None:
    led.sql("ALTER TABLE ledger_permit_budgets RENAME TO ledger_permit_budgets_old")


def _rename_back(led: Ledger, _: Any) -> None:
    led.sql("ALTER TABLE ledger_permit_budgets_old RENAME TO ledger_permit_budgets")


STOPPING = {
    "privilege-revoked": Fault(_revoke, _grant, (
        "lacks a privilege", "permission denied for table ledger_entries", "GRANT",
        "42501")),
    "column-type-changed": Fault(_retype, _restore_type, (
        "changed by hand", "ledger_events.ts_ms is timestamp with time zone, keel-pdp "
        "writes bigint")),
    "table-renamed": Fault(_rename, _rename_back, (
        "not the one keel-pdp created", "ledger_permit_budgets", "42P01")),
}


@pytest.mark.parametrize("case", sorted(STOPPING))
def test_a_fault_only_an_operator_can_fix_stops_the_writer_and_loses_nothing(
        case: str, stream: redis.Redis, ledger: Ledger, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    fault = STOPPING[case]
    first_batch(redis_url, ledger)
    made = fault.make(ledger)
    store = LedgerStore(ledger.writer_url)  # a writer (re)started after the change
    writer = make_writer(redis_url, store, batch_size=BATCH)
    # Bounded: were the fault taken for an outage (or the rows for bad ones), the
    # writer would go on until stopped.
    timer = threading.Timer(20.0, writer.stop)
    timer.start()
    caplog.set_level(logging.ERROR, logger="keel_pdp.ledger")
    try:
        code = writer.run()
    finally:
        timer.cancel()
        store.close()
    assert code == 2
    assert not writer.stopping.is_set(), "it must stop on the fault, not on the timer"
    said = "\n".join(r.getMessage() for r in caplog.records)
    for phrase in fault.says:
        assert phrase in str(writer.failure) and phrase in said, said[-2000:]
    assert "stay pending" in said
    assert ledger.events() == BATCH
    assert pending(stream) == BATCH, "the batch in hand stays pending"
    assert stream.xlen(STREAM + ":dead") == 0, "nothing may be dead-lettered"
    fault.heal(ledger, made)
    settle_exactly_once(redis_url, ledger, stream)


@pytest.mark.parametrize("case", ["privilege-revoked", "column-type-changed"])
def test_the_writer_command_exits_2_with_the_problem_not_a_traceback(
        case: str, stream: redis.Redis, ledger: Ledger, redis_url: str) -> None:
    fault = STOPPING[case]
    first_batch(redis_url, ledger)
    made = fault.make(ledger)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in [k for k in env if k.startswith("KEEL_")]:
        del env[name]
    proc = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "ledger", "--redis-url", redis_url,
         "--store", ledger.writer_url, "--key-prefix", "t", "--consumer", "w1",
         "--batch-size", str(BATCH), "--block", "0.05", "--no-trim"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert last, proc.stderr[-3000:]
    for phrase in fault.says:
        assert phrase in last[-1], last[-1]
    assert ledger.events() == BATCH
    assert stream.xlen(STREAM + ":dead") == 0
    fault.heal(ledger, made)
    settle_exactly_once(redis_url, ledger, stream)


def test_the_writer_is_held_to_the_schema_the_migrations_create(ledger: Ledger) -> None:
    store = LedgerStore(ledger.writer_url)
    try:
        store.migrate()
        assert store.schema_problems() == []
        ledger.sql("ALTER TABLE ledger_entries ADD COLUMN note TEXT NOT NULL")
        ledger.sql("ALTER TABLE ledger_entries ADD COLUMN remark TEXT")  # harmless
        ledger.sql("ALTER TABLE ledger_entries DROP COLUMN caller")
        assert store.schema_problems() == [
            "ledger_entries.caller is missing",
            "ledger_entries.note (not keel-pdp's) is NOT NULL without a default: no insert "
            "of keel-pdp can fill it"]
    finally:
        store.close()


def test_a_sqlite_ledger_matches_the_schema_the_migrations_create(
        tmp_path: pathlib.Path) -> None:
    store = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    try:
        store.migrate()
        assert store.schema_problems() == []
    finally:
        store.close()



def test_a_message_names_the_database_never_the_password() -> None:
    store = LedgerStore("postgresql://writer:s3cret-pw@db.internal:6543/ledger")
    assert store.where == "writer@db.internal:6543/ledger"
