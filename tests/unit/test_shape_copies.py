"""Decision events refer to a stored copy of their shape's members.

The members every request of one shape shares (tenant, workload, model, policy
revision, the budgets with their windows and scopes) are stored once per shape, in
the stream's slot, under the hash of their text; the authorize script appends an
event that ends ``"shape":"<digest>"}`` instead of carrying them. The rules these
tests hold the product to, over fakeredis, redis-py + Redis and the RESP client:

* the copy read back gives the event a reader would have had inline, member for
  member, and is named by the BLAKE2b-128 of its text (computed here);
* no event is ever written that refers to a copy that is not there: a copy lost
  (a failover, a flush) is sent again and the call still decides; without it the
  script writes nothing at all;
* a copy in use never expires (re-sent hourly), a replay does not count as sent;
* a reader that does not resolve the reference is refused by name, never booked
  short; a copy that is not the text its name says is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.budget.cluster_slots import key_slot
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import SHAPE_COPY_REFRESH_S, SHAPE_COPY_TTL_S
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.errors import ParseError
from keel_pdp.events import entry_with_shape
from keel_pdp.ledger.events import parse_entry
from tests.helpers import budget, make_engine, record_authorize_calls, write_bundle

STREAM = "t:{pdp}:events"
DAY = 86_400


def _bundle(tmp_path: pathlib.Path, budgets: list[dict[str, Any]] | None = None) -> pathlib.Path:
    return write_bundle(tmp_path / "bundle", budgets if budgets is not None else [
        budget("org-monthly", "1000.00", window="monthly"),
        budget("tenant-daily", "50.00", per=["tenant"]),
    ])


def _req(rid: str, tenant: str = "acme", workload: str = "chat") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, "gpt-4o-mini", "openai", 1000, 200)


async def _entries(client: Any) -> list[tuple[Any, dict[bytes, bytes]]]:
    return [(i, f) for i, f in await client.xrange(STREAM)]


def _ref(data: bytes) -> str:
    """The digest an event's data ends with (read by this test, not the product)."""
    text = data.decode()
    _, sep, tail = text.rpartition('"shape":"')
    assert sep and tail.endswith('"}') and len(tail) == 34, text[-80:]
    return tail[:32]


def _copy_key(digest: str) -> str:
    # The documented layout: the stream's name with "events" replaced by "shape:<digest>".
    return f"t:{{pdp}}:shape:{digest}"


async def _lose_copies(client: Any) -> int:
    """What a failover that loses the last writes does to the copies: the copy and
    its mark go together (one script wrote both)."""
    lost = 0
    async for key in client.scan_iter(match="t:{pdp}:shape:*"):
        digest = key.decode().rpartition(":")[2]
        await client.delete(key)
        async for window in client.scan_iter(match="t:{pdp}:b:*"):
            lost += int(await client.hdel(window, f"c:{digest}"))
    return lost


async def test_the_event_refers_to_its_copy_and_the_copy_gives_back_the_whole_event(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    bundle = _bundle(tmp_path)
    engine = make_engine(aio_client, bundle)
    out = await engine.authorize(_req("r1"))
    assert out.decision is DecisionKind.ALLOW
    ((_, fields),) = await _entries(aio_client)
    digest = _ref(fields[b"data"])
    compact = json.loads(fields[b"data"])
    assert "tenant" not in compact and "budgets" not in compact
    copy_text: Any = await aio_client.get(_copy_key(digest))
    assert copy_text is not None
    # Named by the hash of its text.
    assert hashlib.blake2b(copy_text, digest_size=16).hexdigest() == digest
    ttl = await aio_client.ttl(_copy_key(digest))
    assert SHAPE_COPY_TTL_S - 60 <= ttl <= SHAPE_COPY_TTL_S
    copy = json.loads(copy_text)
    assert (copy["tenant"], copy["workload"], copy["model"]) == ("acme", "chat", "gpt-4o-mini")
    assert [b["id"] for b in copy["budgets"]] == ["org-monthly", "tenant-daily"]
    assert copy["budgets"][1]["split"] == ["acme"]

    # The same request decided by a sidecar writing inline carries exactly the
    # request's own members plus the copy's.
    await aio_client.flushall()
    inline = make_engine(aio_client, bundle, stored_shapes=False)
    assert (await inline.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    ((_, whole),) = await _entries(aio_client)
    full = json.loads(whole[b"data"])
    assert [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")] == []
    own = {k for k in compact if k != "shape"}
    assert set(full) == own | set(copy) and not own & set(copy)
    assert {k: full[k] for k in copy} == copy

    # What the ledger parses from the stored form is what it parses from the inline one.
    resolved = entry_with_shape(fields, digest, copy_text, _copy_key(digest))
    a, b = parse_entry("1-0", resolved), parse_entry("1-0", whole)
    assert len(a.budgets) == len(b.budgets) == 2
    assert [(x.budget_id, x.scope, x.window_start_ms, x.limit_micros) for x in a.budgets] == \
        [(x.budget_id, x.scope, x.window_start_ms, x.limit_micros) for x in b.budgets]
    assert a.rows[0].dims == b.rows[0].dims
    assert a.rows[0].policy_revision == b.rows[0].policy_revision != ""


async def test_a_copy_lost_with_its_mark_is_sent_again_and_the_call_still_decides(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    engine = make_engine(aio_client, _bundle(tmp_path))
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    assert await _lose_copies(aio_client) == 1  # one mark, in one window hash
    calls = record_authorize_calls(engine)
    out = await engine.authorize(_req("r2"))
    assert out.decision is DecisionKind.ALLOW
    assert calls == ["shape", "decided"]  # refused without the copy, then decided
    entries = await _entries(aio_client)
    assert len(entries) == 2
    for _, fields in entries:
        assert await aio_client.get(_copy_key(_ref(fields[b"data"]))) is not None


async def test_without_its_copy_the_script_writes_nothing(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    engine = make_engine(aio_client, _bundle(tmp_path))
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    await _lose_copies(aio_client)
    before = {k: await aio_client.hgetall(k)
              async for k in aio_client.scan_iter(match="t:{pdp}:b:*")}
    planned = engine.plan(_req("r2"), engine.ids.now_ms())
    assert planned is not None
    hold, _, _ = engine.prepare_hold(*planned)
    keys, args = engine.store.hold_call(hold)  # the store has sent it: no copy goes
    reply = await engine.store.transport.eval_script(engine.store._authorize, keys, args, 2.0,
                                                     hold.shape)
    assert json.loads(reply) == {"r": "shape"}
    assert await aio_client.xlen(STREAM) == 1
    assert not await aio_client.exists(keys[0], keys[1])  # no idempotency record, no permit
    assert await aio_client.zcard(keys[2]) == 1  # only the first permit's expiry
    after = {k: await aio_client.hgetall(k)
             async for k in aio_client.scan_iter(match="t:{pdp}:b:*")}
    assert after == before
    assert [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")] == []


async def test_a_replay_does_not_count_as_sending_the_copy(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    bundle = _bundle(tmp_path)
    first = make_engine(aio_client, bundle)
    assert (await first.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    await _lose_copies(aio_client)
    # Another sidecar's first call of this shape is a replay: its copy went along
    # but the script answered before writing it.
    other = make_engine(aio_client, bundle)
    replay = await other.authorize(_req("r1"))
    assert replay.replayed
    assert [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")] == []
    calls = record_authorize_calls(other)
    assert (await other.authorize(_req("r2"))).decision is DecisionKind.ALLOW
    assert calls == ["decided"]  # it sent the copy again at once: no refusal first
    assert len([k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")]) == 1


async def test_a_copy_in_use_is_sent_again_after_an_hour_and_not_before(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    engine = make_engine(aio_client, _bundle(tmp_path))
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    (key,) = [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")]
    await aio_client.expire(key, 100)
    assert (await engine.authorize(_req("r2"))).decision is DecisionKind.ALLOW
    assert 0 < await aio_client.ttl(key) <= 100  # sent within the hour: left as it was
    sent = engine.store._copies_sent
    (name,) = sent
    sent[name] = time.monotonic() - SHAPE_COPY_REFRESH_S - 1
    assert (await engine.authorize(_req("r3"))).decision is DecisionKind.ALLOW
    assert await aio_client.ttl(key) >= SHAPE_COPY_TTL_S - 60


async def test_a_shape_without_budgets_looks_its_copy_up_itself(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # No budget applies to acme: no window hash carries the mark.
    engine = make_engine(aio_client, _bundle(tmp_path, [
        budget("other-daily", "5.00", scope={"tenant": "globex"})]))
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    (key,) = [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")]
    got: Any = await aio_client.get(key)
    assert json.loads(got)["tenant"] == "acme"
    await aio_client.delete(key)
    calls = record_authorize_calls(engine)
    assert (await engine.authorize(_req("r2"))).decision is DecisionKind.ALLOW
    assert calls == ["shape", "decided"]
    assert await aio_client.exists(key)


async def test_inline_events_store_no_copy(aio_client: aioredis.Redis,
                                           tmp_path: pathlib.Path) -> None:
    engine = make_engine(aio_client, _bundle(tmp_path), stored_shapes=False)
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    ((_, fields),) = await _entries(aio_client)
    data = json.loads(fields[b"data"])
    assert data["tenant"] == "acme" and "shape" not in data
    assert [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")] == []
    windows = [k async for k in aio_client.scan_iter(match="t:{pdp}:b:*")]
    for w in windows:
        names: Any = await aio_client.hkeys(w)
        assert not [f for f in names if f.startswith(b"c:")]
    assert parse_entry("1-0", fields).budgets


async def test_a_reader_that_does_not_read_the_copy_in_is_refused_by_name(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    engine = make_engine(aio_client, _bundle(tmp_path))
    assert (await engine.authorize(_req("r1"))).decision is DecisionKind.ALLOW
    ((_, fields),) = await _entries(aio_client)
    with pytest.raises(ParseError, match="stored shape copy"):
        parse_entry("1-0", fields)
    digest = _ref(fields[b"data"])
    key = _copy_key(digest)
    with pytest.raises(ParseError, match=f"{key}.*not in Redis"):
        entry_with_shape(fields, digest, None, key)
    text: Any = await aio_client.get(key)
    copy = json.loads(text)
    copy["tenant"] = "someone-else"
    with pytest.raises(ParseError, match="not the text it is named by"):
        entry_with_shape(fields, digest, json.dumps(copy), key)


@pytest.mark.parametrize("shards", [1, 64, 1024])
def test_a_copy_lives_in_the_slot_of_the_stream_that_refers_to_it(shards: int) -> None:
    ks = KeySpace("keel", shards)
    for shard in range(shards):
        assert key_slot(ks.shape_copy(shard, "ab" * 16)) == key_slot(ks.streams[shard])
