"""The outbox's journal under a hostile host: a sidecar killed mid-write or mid-claim,
garbage and newer-version rows, a full disk, two sidecars (the same pid, as in two
containers) on one ``--outbox-dir``. Redis is a real server started and stopped by
each test; after it is back, every degraded decision the callers were answered must
be in the stream exactly once, and the sidecar must keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind, Outcome
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.conftest import RedisServer, free_port
from tests.helpers import budget, write_bundle

PREFIX = "t"


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, not started yet: the store is down until the
    test starts it."""
    work = tmp_path / "redis"
    work.mkdir()
    srv = RedisServer(free_port(), work)
    try:
        yield srv
    finally:
        srv.kill()


def _engine(port: int, tmp_path: pathlib.Path, outbox: pathlib.Path) -> Engine:
    bundle = tmp_path / "bundle"
    if not bundle.exists():
        write_bundle(bundle, [budget("open", "10", fail_mode="open")])
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    client = aioredis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
    return Engine(holder, BudgetStore(client, KeySpace(PREFIX), 0.05), Metrics(),
                  outbox_dir=str(outbox))


async def _degraded(engine: Engine, tag: str, n: int) -> list[Outcome]:
    outs = [await engine.authorize(AuthorizeInput(f"{tag}{i}", "acme", "w", "gpt-4o-mini",
                                                  "openai", 10, 10)) for i in range(n)]
    assert all(o.decision is DecisionKind.ALLOW and o.degraded for o in outs), outs
    return outs


def _stream_decisions(port: int) -> list[str]:
    client = redis.Redis(port=port)
    stream = KeySpace(PREFIX).stream
    entries: Any = client.xrange(stream)
    return [f[b"pid"].decode() for _, f in entries if f[b"type"] == b"decision"]


def _kill(engine: Engine) -> None:
    """The process dies: nothing flushed, its files closed by the kernel."""
    engine.relay.close()


async def test_garbage_torn_and_empty_journals_keep_every_good_entry(
        tmp_path: pathlib.Path, server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    box = tmp_path / "outbox"
    crashed = _engine(server.port, tmp_path, box)
    outs = await _degraded(crashed, "r", 3)
    _kill(crashed)
    [journal] = list(box.glob("*.jsonl"))
    # Bytes that are not even UTF-8, then a row torn by the kill.
    journal.write_bytes(journal.read_bytes() + b"\xff\xfe\x00garbage\x80\n"
                        + b'["decision","0123')
    (box / "outbox-4242.jsonl").write_bytes(b"")  # killed right after creating it
    (box / "outbox-4343.jsonl").write_bytes(os.urandom(512))
    with caplog.at_level(logging.ERROR, logger="keel_pdp.outbox"):
        restarted = _engine(server.port, tmp_path, box)  # must start
    assert restarted.outbox_len == 6  # per Authorize: the abort, then the decision
    assert "unreadable" in caplog.text
    server.start()
    assert await restarted.flush_outbox() == 6
    assert _stream_decisions(server.port) == [o.permit_id for o in outs]
    res = await restarted.closeout(outs[0].permit_id, TokenUsage(10, 0, 0, 10), "SUCCEEDED",
                                   None)
    assert res.status == "SETTLED"


async def test_a_claim_killed_after_its_rename_loses_nothing(
        tmp_path: pathlib.Path, server: RedisServer) -> None:
    box = tmp_path / "outbox"
    crashed = _engine(server.port, tmp_path, box)
    outs = await _degraded(crashed, "r", 2)
    _kill(crashed)
    [journal] = list(box.glob("*.jsonl"))
    # The next process renamed it to claim it and was killed (a liveness probe, an
    # OOM kill) before it wrote its own journal: what it had read is gone with it.
    journal.rename(box / f"claimed-777-0badc0de-{journal.name}")
    restarted = _engine(server.port, tmp_path, box)
    assert restarted.outbox_len == 4
    server.start()
    assert await restarted.flush_outbox() == 4
    assert _stream_decisions(server.port) == [o.permit_id for o in outs]
    assert list(box.iterdir()) == []


async def test_a_row_this_version_cannot_replay_is_set_aside_not_blocking(
        tmp_path: pathlib.Path, server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    box = tmp_path / "outbox"
    box.mkdir()
    # A newer version's rows first: an entry kind and a spec this one does not know.
    newer = [["abort", "01J0000000000000000000000A", 1, "{}", "", '{"v":2}'],
             ["decision", "01J0000000000000000000000B", 1, "{}", "{}", "not json"]]
    (box / "outbox-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in newer))
    first = _engine(server.port, tmp_path, box)
    outs = await _degraded(first, "r", 2)
    server.start()
    with caplog.at_level(logging.ERROR, logger="keel_pdp.outbox"):
        assert await first.flush_outbox() == 4  # the four it can replay
    assert first.outbox_len == 0
    assert _stream_decisions(server.port) == [o.permit_id for o in outs]
    # The rows it could not replay are kept for an operator, named in the log.
    [kept] = list(box.glob("rejected-*.jsonl"))
    assert kept.name in caplog.text
    assert [json.loads(line) for line in kept.read_text().splitlines()] == newer
    res = await first.closeout(outs[1].permit_id, TokenUsage(10, 0, 0, 10), "SUCCEEDED", None)
    assert res.status == "SETTLED"
    # A restart does not pick them up again (and does not block on them).
    assert _engine(server.port, tmp_path, box).outbox_len == 0


async def test_a_full_disk_still_answers_by_the_fail_modes_and_replays_from_memory(
        tmp_path: pathlib.Path, server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    box = tmp_path / "outbox"
    engine = _engine(server.port, tmp_path, box)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.ERROR, logger="keel_pdp.outbox"):
        outs = await _degraded(engine, "full", 3)  # not a DENY: the budget is fail-open
    assert "journal" in caplog.text
    assert engine.outbox_len == 6  # nothing lost while the process lives
    errors: Any = engine.metrics.outbox_journal_errors
    assert errors._value.get() >= 3
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    server.start()
    assert await engine.flush_outbox() == 6
    assert _stream_decisions(server.port) == [o.permit_id for o in outs]


async def test_two_sidecars_with_the_same_pid_on_one_outbox_dir_lose_nothing(
        tmp_path: pathlib.Path, server: RedisServer) -> None:
    # Two containers (each its sidecar as pid 1) mounting the same volume as
    # --outbox-dir: in this process both engines have the same pid too.
    box = tmp_path / "outbox"
    a = _engine(server.port, tmp_path, box)
    a_outs = await _degraded(a, "a", 2)
    b = _engine(server.port, tmp_path, box)
    b_outs = await _degraded(b, "b", 2)
    server.start()
    await a.flush_outbox()  # a's store is back first; b is killed before it replays
    assert a.outbox_len == 0
    _kill(b)
    c = _engine(server.port, tmp_path, box)  # b's replacement
    await c.flush_outbox()
    decisions = _stream_decisions(server.port)
    assert sorted(decisions) == sorted(o.permit_id for o in a_outs + b_outs)
    assert len(decisions) == len(set(decisions))


async def test_a_replay_killed_halfway_then_restarted_books_each_decision_and_closeout_once(
        tmp_path: pathlib.Path, server: RedisServer) -> None:
    box = tmp_path / "outbox"
    first = _engine(server.port, tmp_path, box)
    outs = await _degraded(first, "r", 10)
    server.start()
    real_record = first.store.record
    recorded = 0
    stuck = asyncio.Event()

    async def dies_after_five(*a: Any, **kw: Any) -> str:
        nonlocal recorded
        if recorded == 5:
            stuck.set()
            await asyncio.Event().wait()  # the process is killed here
        recorded += 1
        return await real_record(*a, **kw)

    first.store.record = dies_after_five  # type: ignore[method-assign]
    replay = asyncio.create_task(first.flush_outbox())
    await asyncio.wait_for(stuck.wait(), 10)
    _kill(first)
    replay.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await replay
    assert len(_stream_decisions(server.port)) == 5
    second = _engine(server.port, tmp_path, box)
    assert second.outbox_len == 20  # all of it again: replays are idempotent
    assert await second.flush_outbox() == 20
    assert _stream_decisions(server.port) == [o.permit_id for o in outs]
    usage = TokenUsage(10, 0, 0, 10)
    for o in outs:
        assert (await second.closeout(o.permit_id, usage, "SUCCEEDED", None)).status == "SETTLED"
        again = await second.closeout(o.permit_id, usage, "SUCCEEDED", None)
        assert again.status == "ALREADY_SETTLED"
    # gpt-4o-mini: 0.15 USD / M input, 0.60 USD / M output, rounded up once per permit
    each = -(-(10 * 150_000 + 10 * 600_000) // 1_000_000)
    client = redis.Redis(port=server.port)
    [window] = client.keys(f"{PREFIX}:{{pdp}}:b:open:*")
    assert int(client.hget(window, "s") or 0) == 10 * each == 80
    assert int(client.hget(window, "h") or 0) == 0
    entries: Any = client.xrange(KeySpace(PREFIX).stream)
    order = [(f[b"type"].decode(), f[b"pid"].decode()) for _, f in entries]
    for o in outs:
        mine = [t for t, pid in order if pid == o.permit_id]
        assert mine == ["decision", "settlement"], (o.permit_id, mine)


async def test_expiry_sweeps_go_on_while_a_long_outbox_replays(
        tmp_path: pathlib.Path, server: RedisServer) -> None:
    # After a long outage the outbox may take minutes to replay; holds past their
    # TTL must still be released meanwhile, or they block their budgets.
    box = tmp_path / "outbox"
    write_bundle(tmp_path / "bundle", [budget("open", "10", fail_mode="open")],
                 settings={"hold_ttl_seconds": 5})
    engine = _engine(server.port, tmp_path, box)
    await _degraded(engine, "r", 100)
    server.start()
    real_record = engine.store.record

    async def slow(*a: Any, **kw: Any) -> str:
        await asyncio.sleep(0.2)  # a store far away: 100 entries take 20 s
        return await real_record(*a, **kw)

    engine.store.record = slow  # type: ignore[method-assign]
    held = await engine.authorize(AuthorizeInput("h", "acme", "w", "gpt-4o-mini", "openai",
                                                 10, 10))
    assert held.decision is DecisionKind.ALLOW and not held.degraded
    background = asyncio.create_task(engine.run_background(0.2))
    try:
        client = redis.Redis(port=server.port)
        state: Any = b"held"
        for _ in range(100):  # 10 s: twice its TTL, half the replay
            await asyncio.sleep(0.1)
            state = client.hget(KeySpace(PREFIX).permit(held.permit_id), "state") or b""
            if state == b"expired":
                break
        assert state == b"expired"
        assert engine.outbox_len > 0  # the replay still runs
    finally:
        background.cancel()
        engine.relay.close()
        with contextlib.suppress(asyncio.CancelledError):
            await background


async def test_an_outbox_dir_removed_while_degraded_is_written_again(
        tmp_path: pathlib.Path, server: RedisServer) -> None:
    box = tmp_path / "outbox"
    engine = _engine(server.port, tmp_path, box)
    before = await _degraded(engine, "before", 2)
    shutil.rmtree(box)  # a cleanup job, an operator, a volume remounted
    after = await _degraded(engine, "after", 2)
    _kill(engine)
    restarted = _engine(server.port, tmp_path, box)
    assert restarted.outbox_len == 8
    server.start()
    assert await restarted.flush_outbox() == 8
    assert _stream_decisions(server.port) == [o.permit_id for o in before + after]


async def test_a_claim_takes_only_what_fits_and_the_rest_once_that_is_replayed(
        server: RedisServer, tmp_path: pathlib.Path) -> None:
    # Three sidecars killed during one outage leave three journals of 4 entries
    # each (per Authorize: the abort of its hold script, then its degraded
    # decision). The next process has room for 6: taking all 12 would make its own
    # next appends drop journaled decisions to make room (and, with thousands of
    # journals, fill its memory).
    outbox = tmp_path / "outbox"
    issued: list[str] = []
    crashed = [_engine(server.port, tmp_path, outbox) for _ in range(3)]  # alive together
    for k, engine in enumerate(crashed):
        issued += [o.permit_id for o in await _degraded(engine, f"k{k}-", 2)]
    for engine in crashed:
        _kill(engine)
    assert len(list(outbox.glob("outbox-*.jsonl"))) == 3

    holder = PolicyHolder(tmp_path / "bundle")
    holder.set(load_bundle(tmp_path / "bundle"))
    client = aioredis.Redis(port=server.port, socket_connect_timeout=0.2, socket_timeout=0.5)
    restarted = Engine(holder, BudgetStore(client, KeySpace(PREFIX), 0.05), Metrics(),
                       outbox_size=6, outbox_dir=str(outbox))
    assert restarted.outbox_len == 4  # one journal: a second would make 8
    assert len(list(outbox.glob("outbox-*.jsonl"))) == 3  # its own + the two left
    # Still down: a new degraded decision (2 entries) fits beside the claimed ones.
    issued += [o.permit_id for o in await _degraded(restarted, "live-", 1)]
    assert restarted.outbox_len == 6 and restarted.relay._box.dropped == 0

    server.start()
    peak = 0
    replay = restarted.relay._replay

    async def watched(*ev: Any) -> None:
        nonlocal peak
        peak = max(peak, restarted.outbox_len)
        await replay(*ev)

    restarted.relay._replay = watched  # type: ignore[method-assign,assignment]
    assert await restarted.flush_outbox() == 14  # 6, then the two journals left
    assert peak <= 6
    assert sorted(_stream_decisions(server.port)) == sorted(issued)
    assert list(outbox.glob("outbox-*.jsonl")) == []
    assert restarted.relay._box.dropped == 0
