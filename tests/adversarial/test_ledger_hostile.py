"""The ledger writer against a hostile stream: poison entries, entries deleted or
trimmed before the ledger read them, and a second writer on the same group.

Every genuine event comes from the real engine over a real Redis; the hostile
entries are written by hand. The ledger is checked against what the stream says,
read independently of the ledger's parser (``stream_totals`` over a copy of the
genuine entries only). Each test runs on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore
from tests.conftest import ROOT
from tests.helpers import make_engine, read_stream_sync
from tests.integration.conftest import (
    STREAM,
    drain,
    ledger_bundle,
    make_writer,
    store_totals,
    stream_totals,
    traffic,
)
from tests.integration.pg_fixture import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]

GROUP = "keel-ledger"
GENUINE = "t:{pdp}:genuine"  # a copy of the engine's entries, for the expected totals


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def engine(redis_url: str, tmp_path: pathlib.Path) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield make_engine(client, ledger_bundle(tmp_path / "bundle"))
    finally:
        await client.aclose()


@pytest.fixture
def store(store_url: str) -> Any:
    s = LedgerStore(store_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def copy_genuine(client: redis.Redis, skip: set[str]) -> None:
    """Copy the stream's entries other than ``skip`` to GENUINE, in order (whole:
    shape copies read in)."""
    raw: Any = read_stream_sync(client, STREAM)
    for eid, fields in raw:
        if eid.decode() not in skip:
            client.xadd(GENUINE, fields)


def dead_letters(client: redis.Redis) -> dict[str, str]:
    """src_id -> reason of every entry of the dead-letter stream."""
    raw: Any = client.xrange(STREAM + ":dead")
    return {f[b"src_id"].decode(): f[b"reason"].decode() for _, f in raw}


# ------------------------------------------------------------------ poison entries
_FAR_PID = "pmt_ffffffffffff" + "0" * 16  # issued in the year 10889: no calendar month
POISON = {
    # str.isdigit() accepts it; int() does not.
    "superscript-ts": {"type": "void", "pid": "pmt_x", "ts": "²", "data": "{}",
                       "res": '{"amt":1}'},
    # Fifteen digits of epoch milliseconds are past the year 9999.
    "ts-past-year-9999": {"type": "void", "pid": "pmt_x", "ts": "999999999999999",
                          "data": "{}", "res": '{"amt":1}'},
    "permit-id-past-year-9999": {"type": "void", "pid": _FAR_PID, "ts": "1",
                                 "data": "{}", "res": '{"amt":1}'},
    # Nested deeper than the JSON decoder's recursion limit.
    "deeply-nested-json": {"type": "void", "pid": "pmt_x", "ts": "1",
                           "data": "[" * 100_000, "res": '{"amt":1}'},
    # An integral number with 5,001 digits, written with an exponent.
    "amount-1e5000": {"type": "void", "pid": "pmt_x", "ts": "1", "data": "{}",
                      "res": '{"amt":1e5000}'},
}


@pytest.mark.parametrize("case", sorted(POISON))
async def test_a_poison_entry_is_dead_lettered_and_every_other_event_is_stored(
        case: str, engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 12, f"{case}-a")
    client = redis.Redis.from_url(redis_url)
    poison = client.xadd(STREAM, POISON[case]).decode()  # type: ignore[arg-type,union-attr]
    await traffic(engine, 12, f"{case}-b")
    copy_genuine(client, {poison})
    writer = make_writer(redis_url, store, batch_size=5)
    drain(writer)  # raises (the writer process dies) when the entry is not handled
    assert list(dead_letters(client)) == [poison]
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    assert store_totals(store) == stream_totals(client, GENUINE)


def test_a_number_with_a_huge_exponent_is_refused_at_once() -> None:
    """``1e999999999`` is an integral JSON number; turning it into an int builds a
    billion-digit string: the writer would spin (and grow) on one entry forever."""
    code = (
        "from keel_pdp.ledger.events import parse_entry, ParseError\n"
        "try:\n"
        "    parse_entry('1-0', {b'type': b'void', b'pid': b'pmt_x', b'ts': b'1',\n"
        "                        b'data': b'{}', b'res': b'{\"amt\":1e999999999}'})\n"
        "except ParseError as exc:\n"
        "    print('refused:', exc)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing one entry with amt = 1e999999999 did not finish in 20 s")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: res.amt" in out.stdout and "out of range" in out.stdout


# ------------------------------------------------------------------ deleted entries
async def test_a_pending_entry_deleted_before_it_is_claimed_is_reported_not_dropped(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    """A writer reads a batch and dies; the entries are deleted from the stream (an
    operator's XTRIM MAXLEN, an XDEL) before the next writer claims them. XAUTOCLAIM
    drops deleted entries from the group without returning them: unless the writer
    reports them, decisions vanish from the ledger with no trace."""
    await traffic(engine, 20, "del")
    client = redis.Redis.from_url(redis_url)
    dead = make_writer(redis_url, store, consumer="dead", batch_size=10)
    dead.ensure_group()
    taken = [eid for eid, _ in dead.read()]
    assert len(taken) == 10
    gone = taken[3:5]
    assert client.xdel(STREAM, *gone) == 2
    copy_genuine(client, set())
    alive = make_writer(redis_url, LedgerStore(store.url), consumer="alive",
                        claim_idle_ms=1, claim_interval_s=0.0)
    drain(alive)
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    assert store_totals(store) == stream_totals(client, GENUINE)
    reasons = dead_letters(client)
    assert sorted(reasons) == sorted(gone), "the deleted entries must be reported"
    assert all("deleted" in r for r in reasons.values())
    assert alive.metrics.dead_lettered._value.get() == 2



# ------------------------------------------------------------------ trimmed entries
async def test_entries_trimmed_while_the_writer_is_down_are_reported_as_lost(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    """The writer stores a first batch and stops; traffic goes on; someone trims the
    stream to its last 5 entries (XTRIM MAXLEN). The restarted writer must say how
    many entries it never saw, not carry on as if the stream were whole."""
    await traffic(engine, 12, "trim-a")
    client = redis.Redis.from_url(redis_url)
    first = make_writer(redis_url, store, batch_size=10)
    assert first.step() == 10
    await traffic(engine, 12, "trim-b")
    total = client.xlen(STREAM)
    assert client.xtrim(STREAM, maxlen=5, approximate=False) == total - 5
    copy_genuine(client, set())
    again = make_writer(redis_url, LedgerStore(store.url))
    drain(again)
    lost = total - 10 - 5  # entries added after the group's position, minus those left
    raw: Any = client.xrange(STREAM + ":dead")
    assert len(raw) == 1, "the loss must be recorded once"
    fields = raw[0][1]
    assert fields[b"lost"] == str(lost).encode()
    assert f"{lost} entries after" in fields[b"reason"].decode()
    assert again.metrics.lost._value.get() == lost
    assert store.query("SELECT COUNT(*) FROM ledger_events")[0][0] == 10 + 5
    drain(again)  # nothing new: reported once, not at every read
    assert client.xlen(STREAM + ":dead") == 1


async def test_an_undelivered_entry_deleted_with_xdel_is_reported(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 12, "xdel")
    client = redis.Redis.from_url(redis_url)
    writer = make_writer(redis_url, store, batch_size=4)
    assert writer.step() == 4
    ids: Any = client.xrange(STREAM)
    victim = ids[7][0].decode()
    assert client.xdel(STREAM, victim) == 1
    copy_genuine(client, set())
    drain(writer)
    raw: Any = client.xrange(STREAM + ":dead")
    assert len(raw) == 1
    assert b"deleted from the stream before the ledger read them" in raw[0][1][b"reason"]
    assert writer.metrics.lost._value.get() == 1
    assert store_totals(store) == stream_totals(client, GENUINE)


async def test_the_writers_own_trim_is_not_taken_for_a_loss(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    await traffic(engine, 12, "own-trim")
    client = redis.Redis.from_url(redis_url)
    writer = make_writer(redis_url, store, batch_size=5)
    drain(writer)
    assert writer.trim() > 0 and client.xlen(STREAM) == 0
    await traffic(engine, 6, "own-trim-b")
    drain(writer)
    assert writer.trim() > 0 and client.xlen(STREAM) == 0
    drain(make_writer(redis_url, LedgerStore(store.url)))  # a restart after the trims
    assert client.xlen(STREAM + ":dead") == 0
    assert writer.metrics.lost._value.get() == 0


def copy_to_genuine(client: redis.Redis, entries: Any) -> None:
    for _, fields in entries:
        client.xadd(GENUINE, fields)


def loss_records(client: redis.Redis) -> list[dict[bytes, bytes]]:
    raw: Any = client.xrange(STREAM + ":dead")
    return [f for _, f in raw if b"lost" in f]


async def test_a_loss_is_reported_once_across_racing_writers_restarts_and_a_further_trim(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    """The writer stores a first batch; then the whole stream is trimmed by someone
    else (XTRIM MAXLEN 0) while the writer is down. Nothing follows the gap, so the
    group's position stays before it: every writer that starts sees the same loss.
    Two writers starting at once, a restart, and a restart after the stream was
    trimmed further (new entries added and cut while the group still stood there)
    must report each lost entry once: one dead-letter record per loss, the metric
    counting each entry once, the records' counts adding up to what the ledger
    misses, and the ledger holding exactly the entries that survived."""
    import threading

    await traffic(engine, 12, "once-a")
    client = redis.Redis.from_url(redis_url)
    first = make_writer(redis_url, store, batch_size=10)
    assert first.step() == 10
    stored: Any = client.xrange(STREAM, count=10)
    copy_to_genuine(client, stored)
    await traffic(engine, 12, "once-b")
    appended = client.xlen(STREAM)
    client.xtrim(STREAM, maxlen=0, approximate=False)
    lost_first = appended - 10

    racers = [make_writer(redis_url, LedgerStore(store.url), consumer=f"racer-{i}")
              for i in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(w: Any) -> None:
        try:
            barrier.wait(10)
            drain(w)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(w,)) for w in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert [f[b"lost"] for f in loss_records(client)] == [str(lost_first).encode()]
    assert sum(w.metrics.lost._value.get() for w in racers) == lost_first

    restarted = make_writer(redis_url, LedgerStore(store.url))
    drain(restarted)
    assert restarted.metrics.lost._value.get() == 0, "a restart must not report it again"
    assert len(loss_records(client)) == 1

    # Traffic goes on while the writer is down, and the stream is trimmed again.
    more = await traffic(engine, 6, "once-c")
    added = client.xlen(STREAM)
    assert added > 2 and more.permits
    client.xtrim(STREAM, maxlen=2, approximate=False)
    survivors: Any = client.xrange(STREAM)
    copy_to_genuine(client, survivors)
    again = make_writer(redis_url, LedgerStore(store.url))
    drain(again)
    records = loss_records(client)
    assert [int(f[b"lost"]) for f in records] == [lost_first, added - 2]
    assert b"more entries after" in records[1][b"reason"]
    assert again.metrics.lost._value.get() == added - 2
    drain(make_writer(redis_url, LedgerStore(store.url)))  # one more restart
    assert len(loss_records(client)) == 2
    # Exact: the ledger holds the survivors, once; the records count the rest.
    assert store_totals(store) == stream_totals(client, GENUINE)
    assert store.query("SELECT COUNT(*) FROM ledger_events")[0][0] == 10 + 2
    assert sum(int(f[b"lost"]) for f in records) == appended + added - 10 - 2


async def test_deleted_entries_are_reported_once_while_read_past_and_after_a_restart(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    """Two undelivered entries are deleted with XDEL, one of them the last entry of
    the stream. The writer reads on in small batches (its position moves at every
    read, but stays before the deleted tail) and restarts: one report in all."""
    await traffic(engine, 12, "xdel-once")
    client = redis.Redis.from_url(redis_url)
    writer = make_writer(redis_url, store, batch_size=2)
    assert writer.step() == 2
    raw: Any = client.xrange(STREAM)
    ids: list[bytes] = [eid for eid, _ in raw]
    assert client.xdel(STREAM, ids[7], ids[-1]) == 2
    copy_genuine(client, set())
    drain(writer)
    drain(make_writer(redis_url, LedgerStore(store.url), batch_size=2))  # a restart
    records = loss_records(client)
    assert len(records) == 1, [r[b"reason"] for r in records]
    assert records[0][b"lost"] == b""
    assert ids[-1] in records[0][b"reason"]
    assert writer.metrics.lost._value.get() == 1
    assert store_totals(store) == stream_totals(client, GENUINE)


# ------------------------------------------------------------------ writer failover
async def test_a_settlement_stored_before_its_decision_keeps_the_permits_dimensions(
        engine: Any, store: LedgerStore, redis_url: str, tmp_path: pathlib.Path) -> None:
    """A writer reads the batch holding a permit's decision and dies before it
    commits; its replacement has another consumer name (a new pod) and reads the
    new entries, among them the permit's settlement, long before the dead one's
    pending entries are idle enough to claim. The settlement is booked first, when
    the ledger does not know the permit yet. Finance's views of it (reconciliation
    against the provider's export, the overrun section) must still charge it to
    the permit's tenant, workload, provider and model."""
    from keel_pdp.decision import AuthorizeInput
    from keel_pdp.ledger.periods import period_of_ms
    from keel_pdp.ledger.sections import overrun_lines
    from keel_pdp.pricing import TokenUsage
    from keel_pdp.reconcile.internal_ledger import from_ledger
    from keel_pdp.reconcile.period import Period

    res = await engine.authorize(AuthorizeInput(
        "order-1", "acme", "chat", "gpt-4.1", "openai", 1000, 100))
    assert res.permit_id
    client = redis.Redis.from_url(redis_url)
    old = make_writer(redis_url, store, consumer="writer-old", batch_size=10)
    old.ensure_group()
    assert [f[b"type"] for _, f in old.read() if f] == [b"decision"]  # then it dies
    # Output far above the permit's max: the settlement is flagged as an overrun.
    await engine.closeout(res.permit_id, TokenUsage(input_tokens=1000, output_tokens=900),
                          "SUCCEEDED", None)
    new = make_writer(redis_url, LedgerStore(store.url), consumer="writer-new",
                      claim_interval_s=0.0)  # claim_idle_ms: the default minute
    drain(new)
    assert client.xpending(STREAM, GROUP)["pending"] == 1  # the decision, not yet claimed
    claimer = make_writer(redis_url, LedgerStore(store.url), consumer="writer-new",
                          claim_idle_ms=1, claim_interval_s=0.0)
    drain(claimer)
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    # Independently of the ledger: the permit's dimensions and settled cost as the
    # stream has them.
    raw: Any = read_stream_sync(client, STREAM)
    by_type = {f[b"type"]: f for _, f in raw}
    data = json_obj(by_type[b"decision"][b"data"])
    settled = json_obj(by_type[b"settlement"][b"res"])
    want = ("acme", "chat", "openai", "gpt-4.1")
    assert (data["tenant"], data["workload"], data["provider"], data["model"]) == want
    period = period_of_ms(int(by_type[b"settlement"][b"ts"]))
    lines = [ln for ln in from_ledger(store.url, Period.parse(period))
             if ln.permit_id == res.permit_id]
    assert lines, "the settlement must reach reconciliation"
    assert {(ln.tenant, ln.workload, ln.provider, ln.model) for ln in lines} == {want}
    over = [o for o in overrun_lines(store, period) if o.permit_id == res.permit_id]
    assert [(o.tenant, o.workload, o.actual_micros) for o in over] == [
        ("acme", "chat", int(settled["act"]))]


def json_obj(raw: bytes) -> Any:
    import json

    return json.loads(raw)


async def test_a_permit_id_with_a_nul_byte_is_stored_or_dead_lettered_never_stalls(
        engine: Any, store: LedgerStore, redis_url: str) -> None:
    """PostgreSQL text cannot hold NUL; SQLite can. Either way the entry is settled
    one way or the other and the events around it are stored."""
    await traffic(engine, 8, "nul-a")
    client = redis.Redis.from_url(redis_url)
    poison = client.xadd(STREAM, {"type": "void", "pid": "pmt_\x00nul", "ts": "1",  # type: ignore[union-attr]
                                  "data": "{}", "res": '{"amt":5}'}).decode()
    await traffic(engine, 8, "nul-b")
    copy_genuine(client, {poison})
    drain(make_writer(redis_url, store, batch_size=6))
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    stored = {r[0] for r in store.query("SELECT event_id FROM ledger_events")}
    assert (poison in stored) != (poison in dead_letters(client))
    got = store_totals(store)
    want = stream_totals(client, GENUINE)
    if poison in stored:  # the void of an unknown permit: 5 micro-USD released
        want.events += 1
        want.types["void"] = want.types.get("void", 0) + 1
        want.released += 5
    assert got == want
