"""Idempotency records, format 1 (hash) and 2 (string), in a real Redis.

What must hold whatever the format, and across a rolling upgrade in which sidecars
of the previous release (the scripts of e52fb5a, kept verbatim in
tests/fixtures/scripts_e52fb5a) share the store with this one:

* a retry of a held permit's request is answered with that permit;
* a permit that ended (settled, voided, expired, or gone) is never handed out again;
* an abort releases a hold nobody was told about, and keeps one a replay handed out.

Each expectation is written out here from what the test did, not computed by the
code under test."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.replies import HoldReply, SettleReply, settle_reply
from keel_pdp.budget.store import BudgetStore, HoldCandidate, HoldRequest, hold_shape

PREVIOUS = pathlib.Path(__file__).parent.parent / "fixtures" / "scripts_e52fb5a"
_ids = itertools.count(1)
TTL_S = 600
EST = 1_000


def _previous(name: str) -> str:
    return (PREVIOUS / f"{name}.lua").read_text()


def _request(ks: KeySpace, rid: str, now: int, fingerprint: str = "fp-1") -> HoldRequest:
    n = next(_ids)
    shape = hold_shape((ks.window("b", ("acme",), 0, 0),), (ks.grants("b", ("acme",), 0),),
                       (10**12,), (True,), (4_000_000_000,), ((),), idempotency_ttl_s=TTL_S,
                       permit_retention_s=TTL_S, min_output_tokens=1)
    return HoldRequest(
        permit_id=f"pmt_{n:028x}", idempotency_key=ks.idempotency("acme", rid),
        fingerprint=fingerprint, now_ms=now, expires_at_ms=now + 60_000, event_data="{}",
        shape=shape, candidates=(HoldCandidate(0, 1_000_000, 10, False, "{}", (0,), EST),))


def _again(r: HoldRequest, now: int) -> HoldRequest:
    """A retry of ``r`` (same request id and fingerprint) under a new permit id."""
    return HoldRequest(
        permit_id=f"pmt_{next(_ids):028x}", idempotency_key=r.idempotency_key,
        fingerprint=r.fingerprint, now_ms=now, expires_at_ms=now + 60_000,
        event_data="{}", shape=r.shape, candidates=r.candidates)


def _run(test: Callable[[aioredis.Redis, KeySpace], Awaitable[None]], url: str) -> None:
    async def go() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await test(client, KeySpace("t"))
        finally:
            await client.aclose()
    asyncio.run(go())


def _store(client: aioredis.Redis, ks: KeySpace, records: int) -> BudgetStore:
    return BudgetStore(client, ks, timeout_s=2.0, records=records)


async def _previous_hold(client: aioredis.Redis, store: BudgetStore, r: HoldRequest) -> Any:
    """The previous release's authorize script on this request (same KEYS and ARGV)."""
    keys, args = store.hold_call(r)
    all_keys = [*keys, *r.shape.keys]
    return await client.eval(_previous("authorize"), len(all_keys), *all_keys,
                             *r.shape.args, *args)


async def _previous_settle(client: aioredis.Redis, store: BudgetStore, r: HoldRequest,
                           now: int) -> SettleReply:
    keys, args = store.settle_call(r.permit_id, r.shape.keys[:1], now, EST, "{}",
                                   idempotency_key=r.idempotency_key)
    raw = await client.eval(_previous("closeout"), len(keys), *keys, *args)
    return settle_reply(raw)


async def _settle(store: BudgetStore, r: HoldRequest, now: int) -> SettleReply:
    return await store.settle(r.permit_id, r.shape.keys[:1], now, EST, "{}",
                              idempotency_key=r.idempotency_key)


async def _entries(client: aioredis.Redis, ks: KeySpace) -> list[dict[bytes, bytes]]:
    raw = await client.xrange(ks.stream)
    return [cast(dict[bytes, bytes], fields) for _, fields in cast(list[Any], raw)]


def _ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------ the records


def test_format_2_writes_one_string_with_the_records_ttl(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        r = _request(ks, "r-1", _ms())
        res = await _store(client, ks, 2).hold(r)
        assert res.decision == "ALLOW"
        assert await client.type(r.idempotency_key) == b"string"
        answer = (await _entries(client, ks))[-1][b"res"]
        assert await client.get(r.idempotency_key) == b"fp-1\n" + answer
        assert TTL_S - 5 <= await client.ttl(r.idempotency_key) <= TTL_S
    _run(body, redis_url)


def test_format_1_writes_the_hash_earlier_releases_read(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        now = _ms()
        r = _request(ks, "r-1", now)
        await _store(client, ks, 1).hold(r)
        rec = await client.hgetall(r.idempotency_key)
        assert set(rec) == {b"fp", b"res", b"pid", b"exp"}
        assert rec[b"pid"] == r.permit_id.encode() and rec[b"exp"] == str(now + 60_000).encode()
        assert TTL_S - 5 <= await client.ttl(r.idempotency_key) <= TTL_S
    _run(body, redis_url)


@pytest.mark.parametrize("records", [1, 2])
def test_a_retry_of_a_held_permit_is_answered_with_it(redis_url: str, records: int) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, records)
        r = _request(ks, "r-1", _ms())
        first = await store.hold(r)
        again = await store.hold(_again(r, _ms()))
        assert (again.outcome, again.permit_id) == ("replay", first.permit_id)
        assert await client.hget(ks.window("b", ("acme",), 0, 0), "h") == str(EST).encode()
        other = await store.hold(_request(ks, "r-1", _ms(), fingerprint="fp-2"))
        assert other.outcome == "reused"
    _run(body, redis_url)


async def _end(how: str, client: aioredis.Redis, store: BudgetStore, ks: KeySpace,
               r: HoldRequest, now: int) -> None:
    if how == "settled":
        assert (await _settle(store, r, now)).status == "SETTLED"
    elif how == "voided":
        out = await store.release(r.permit_id, r.shape.keys[:1], now, "voided", "{}",
                                  idempotency_key=r.idempotency_key)
        assert out.status == "RELEASED"
    elif how == "expired":
        out = await store.release(r.permit_id, r.shape.keys[:1], r.expires_at_ms + 1,
                                  "expired", "{}", idempotency_key=r.idempotency_key)
        assert out.status == "RELEASED"
    else:  # the permit record is gone (its retention passed)
        assert await client.delete(ks.permit(r.permit_id)) == 1


@pytest.mark.parametrize("records", [1, 2])
@pytest.mark.parametrize("how", ["settled", "voided", "expired", "gone"])
def test_a_permit_that_ended_is_never_handed_out_again(redis_url: str, records: int,
                                                       how: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, records)
        now = _ms()
        r = _request(ks, "r-1", now)
        await store.hold(r)
        await _end(how, client, store, ks, r, now)
        again: HoldReply = await store.hold(_again(r, now + 1))
        assert again.outcome == "ended"
        assert again.permit_id == r.permit_id
        assert again.ended_state == ("expired" if how == "gone" else how)
        # nothing was held for the retry
        types = [e[b"type"] for e in await _entries(client, ks)]
        assert types.count(b"decision") == 1
    _run(body, redis_url)


def test_format_2_closeout_neither_reads_nor_marks_the_record(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, 2)
        r = _request(ks, "r-1", _ms())
        await store.hold(r)
        before = await client.get(r.idempotency_key)
        assert (await _settle(store, r, _ms())).status == "SETTLED"
        assert await client.get(r.idempotency_key) == before
    _run(body, redis_url)


def test_format_1_closeout_marks_the_record_ended(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, 1)
        r = _request(ks, "r-1", _ms())
        await store.hold(r)
        assert (await _settle(store, r, _ms())).status == "SETTLED"
        assert await client.hget(r.idempotency_key, "st") == b"settled"
    _run(body, redis_url)


def test_format_1_closeout_of_a_format_2_record_settles_and_leaves_it(redis_url: str) -> None:
    # While `keel-pdp records --upgrade` reaches the sidecars one restart at a time.
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        r = _request(ks, "r-1", _ms())
        await _store(client, ks, 2).hold(r)
        before = await client.get(r.idempotency_key)
        assert (await _settle(_store(client, ks, 1), r, _ms())).status == "SETTLED"
        assert await client.get(r.idempotency_key) == before
        again = await _store(client, ks, 1).hold(_again(r, _ms()))
        assert (again.outcome, again.ended_state) == ("ended", "settled")
    _run(body, redis_url)


def test_format_2_permits_leave_out_what_the_amount_and_the_request_already_say(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        for records, extra in ((1, {b"est", b"ik"}), (2, set())):
            r = _request(ks, f"r-{records}", _ms())
            await _store(client, ks, records).hold(r)
            fields = set(await client.hkeys(ks.permit(r.permit_id)))
            assert fields == {b"state", b"amount", b"keys", b"wx", b"exp", b"meta", b"k",
                              *extra}, records
    _run(body, redis_url)


@pytest.mark.parametrize("records", [1, 2])
@pytest.mark.parametrize(("actual", "status", "flags"), [
    (EST, "SETTLED", ()),
    (3 * EST, "SETTLED", ("COST_ABOVE_HOLD",)),
    # the overrun ceiling: estimate x 4 + 50,000 (the settle call's defaults)
    (4 * EST + 50_000 + 1, "IMPLAUSIBLE", ()),
])
def test_a_closeout_judges_overruns_by_the_permits_estimate_in_either_format(
        redis_url: str, records: int, actual: int, status: str,
        flags: tuple[str, ...]) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, records)
        r = _request(ks, "r-1", _ms())
        await store.hold(r)
        out = await store.settle(r.permit_id, r.shape.keys[:1], _ms(), actual, "{}",
                                 idempotency_key=r.idempotency_key)
        assert (out.status, out.estimate_micros, out.flags) == (status, EST, flags)
        if status == "IMPLAUSIBLE":
            assert out.ceiling_micros == 4 * EST + 50_000
            assert await client.hget(ks.window("b", ("acme",), 0, 0), "h") == str(EST).encode()
        else:
            assert await client.hget(ks.window("b", ("acme",), 0, 0), "s") == \
                str(actual).encode()
    _run(body, redis_url)


# ------------------------------------------------------------------ aborts


@pytest.mark.parametrize("records", [1, 2])
def test_an_abort_releases_an_answer_nobody_had_and_drops_the_record(
        redis_url: str, records: int) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, records)
        r = _request(ks, "r-1", _ms())
        await store.hold(r)
        out = await store.abort(r.permit_id, r.idempotency_key, r.shape.keys[:1], _ms(), "{}", 2.0)
        assert (out.status, out.amount_micros) == ("RELEASED", EST)
        assert not await client.exists(r.idempotency_key)
        assert await client.hget(ks.window("b", ("acme",), 0, 0), "h") == b"0"
        # the retry is decided afresh
        again = await store.hold(_again(r, _ms()))
        assert again.outcome == "decided" and again.permit_id != r.permit_id
    _run(body, redis_url)


@pytest.mark.parametrize("records", [1, 2])
def test_an_abort_keeps_a_permit_a_replay_handed_out(redis_url: str, records: int) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        store = _store(client, ks, records)
        r = _request(ks, "r-1", _ms())
        await store.hold(r)
        assert (await store.hold(_again(r, _ms()))).outcome == "replay"
        out = await store.abort(r.permit_id, r.idempotency_key, r.shape.keys[:1], _ms(), "{}", 2.0)
        assert (out.status, out.state) == ("NOOP", "held")
        assert await client.exists(r.idempotency_key)
        assert await client.hget(ks.window("b", ("acme",), 0, 0), "h") == str(EST).encode()
        assert await client.hget(ks.permit(r.permit_id), "state") == b"held"
    _run(body, redis_url)


# ------------------------------------------------------------------ rolling upgrade


def test_previous_release_and_format_1_share_records_both_ways(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        new = _store(client, ks, 1)
        # Decided by the previous release, replayed and closed out by this one; the
        # previous release's replay then sees it ended.
        r = _request(ks, "r-1", _ms())
        first = await _previous_hold(client, new, r)
        assert b'"d":"ALLOW"' in first
        assert (await new.hold(_again(r, _ms()))).permit_id == r.permit_id
        assert (await _settle(new, r, _ms())).status == "SETTLED"
        old_again = await _previous_hold(client, new, _again(r, _ms()))
        assert b'"r":"ended"' in old_again and b'"st":"settled"' in old_again
        # Decided by this release, replayed and closed out by the previous one.
        r2 = _request(ks, "r-2", _ms())
        await new.hold(r2)
        assert b'"r":"replay"' in await _previous_hold(client, new, _again(r2, _ms()))
        assert (await _previous_settle(client, new, r2, _ms())).status == "SETTLED"
        again = await new.hold(_again(r2, _ms()))
        assert (again.outcome, again.ended_state) == ("ended", "settled")
    _run(body, redis_url)


def test_format_2_replays_a_record_the_previous_release_wrote(redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        new = _store(client, ks, 2)
        r = _request(ks, "r-1", _ms())
        await _previous_hold(client, new, r)
        assert await client.type(r.idempotency_key) == b"hash"
        again = await new.hold(_again(r, _ms()))
        assert (again.outcome, again.permit_id) == ("replay", r.permit_id)
        # ended by a format 2 closeout (no mark): this release still refuses it
        assert (await _settle(new, r, _ms())).status == "SETTLED"
        assert await client.hget(r.idempotency_key, "st") is None
        ended = await new.hold(_again(r, _ms()))
        assert (ended.outcome, ended.ended_state) == ("ended", "settled")
    _run(body, redis_url)


def test_why_format_2_waits_for_the_whole_fleet(redis_url: str) -> None:
    # The previous release reads only its own record and relies on its mark: its
    # Closeout stops half-way on a format 2 record, and format 2 marks nothing.
    # `keel-pdp records --upgrade` is for a fleet that no longer runs it.
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        new = _store(client, ks, 2)
        r = _request(ks, "r-1", _ms())
        await new.hold(r)
        with pytest.raises(Exception, match="WRONGTYPE"):
            await _previous_settle(client, new, r, _ms())
        # A record the previous release wrote, its permit ended by format 2: the
        # previous release's replay would hand the permit out again.
        r2 = _request(ks, "r-2", _ms())
        await _previous_hold(client, new, r2)
        assert (await _settle(new, r2, _ms())).status == "SETTLED"
        assert b'"r":"replay"' in await _previous_hold(client, new, _again(r2, _ms()))
        # This release refuses it.
        assert (await new.hold(_again(r2, _ms()))).outcome == "ended"
    _run(body, redis_url)


# ------------------------------------------------------------------ the deployment's format


def test_a_new_deployment_declares_format_2_an_old_one_waits_for_the_upgrade(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis, ks: KeySpace) -> None:
        fresh = _store(client, ks, 1)
        assert await fresh.layout_problem() is None
        assert await fresh.adopt_records() == 2
        assert fresh.records == 2
        # A store an earlier release wrote: its stream and layout, no records key.
        old = KeySpace("old")
        await client.xadd(old.single_shard_stream, {"type": "decision"})
        await client.set(old.layout, "1")
        store = _store(client, old, 2)
        assert await store.layout_problem() is None
        assert await store.adopt_records() == 1
        r = _request(old, "r-1", _ms())
        await store.hold(r)
        assert await client.type(r.idempotency_key) == b"hash"
        await store.declare_records(2)
        assert await store.adopt_records() == 2
        r2 = _request(old, "r-2", _ms())
        await store.hold(r2)
        assert await client.type(r2.idempotency_key) == b"string"
    _run(body, redis_url)


def test_keel_pdp_records_shows_and_upgrades(redis_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "keel_pdp.cli", "records",
                               "--redis-url", redis_url, "--key-prefix", "old", *args],
                              capture_output=True, text=True, timeout=60)

    shown = cli()
    assert shown.returncode == 0, shown.stderr
    assert "idempotency records format 1 (old:{pdp}:records: not set)" in shown.stdout
    up = cli("--upgrade")
    assert up.returncode == 0 and "format 1 -> 2" in up.stdout
    again = cli("--upgrade")
    assert "idempotency records format 2 (old:{pdp}:records: 2)" in again.stdout
