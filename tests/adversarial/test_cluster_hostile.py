"""The Redis Cluster client against hostile nodes: small fake RESP servers on
127.0.0.1 that answer what a real cluster rarely or never does (a malformed slot
map, a redirect out of range or without a host, endless TRYAGAIN/CLUSTERDOWN,
MOVED ping-pong, silence, a connection dropped after the write, garbage).

What must hold whatever a node answers (DESIGN.md, invariants 4, 7 and 10):

* a script that was written is never sent again (it may have run: a hold or a
  settlement would be applied twice), even when the map then names another
  owner for its slot;
* every call ends within its own timeout with an error the budget store turns
  into ``StoreUnavailable`` (so each budget's fail mode decides), never with an
  exception of another kind, never a hang;
* the slot map is not read again for every call while it cannot be read.

Every server here listens on 127.0.0.1 only and is closed by its test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from keel_pdp.budget.cluster import key_slot
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.resp import RespConnectionError, RespError, RespNotSent
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from tests.conftest import free_port
from tests.fake_cluster import DROP, SILENT, FakeNode, cluster, error, nodes, resp

STORE_FAILURES = (TimeoutError, RespError, OSError)  # what BudgetStore maps to StoreUnavailable
SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
KEY = "k:{hostile}"
SLOT = key_slot(KEY)


# ------------------------------------------------------------ malformed maps

BAD_MAPS = {
    "no master": [[0, 16383]],
    "not an entry": [5],
    "slots past 16383": [[0, 20000, ["127.0.0.1", 1]]],
    "negative slots": [[-5, -1, ["127.0.0.1", 1]]],
    "reversed range": [[100, 5, ["127.0.0.1", 1]]],
    "port 99999": [[0, 16383, ["127.0.0.1", 99999]]],
    "negative port": [[0, 16383, ["127.0.0.1", -1]]],
    "master not a list": [[0, 16383, 7]],
}


@pytest.mark.parametrize("bad", list(BAD_MAPS), ids=list(BAD_MAPS))
async def test_a_malformed_slot_map_is_refused_and_the_next_seed_is_asked(bad: str) -> None:
    # Before: an IndexError/TypeError stopped the search at the first seed (the
    # good one was never asked), and a port out of range installed a map whose
    # every call raised OverflowError, which is not a store failure; slots out
    # of range grew or shifted the map silently.
    async with nodes(None, lambda node, cmd: resp(b"good")) as (liar, good):
        liar.slots = BAD_MAPS[bad]
        good.own_all()
        c = cluster(liar.address, good.address)
        try:
            assert await c.command("GET", KEY, timeout_s=2) == b"good"
            assert c.masters == [good.address]
            assert len(c._slots) == 16384
        finally:
            await c.close()
        # Only liars: a clear store failure naming the entry, never a crash.
        c = cluster(liar.address)
        try:
            with pytest.raises(RespConnectionError, match="CLUSTER SLOTS entry"):
                await c.command("GET", KEY, timeout_s=2)
        finally:
            await c.close()


@pytest.mark.parametrize("reply", [
    "MOVED 99999 127.0.0.1:1", f"MOVED {SLOT} 127.0.0.1:99999",
    f"ASK {SLOT} 127.0.0.1:99999", "MOVED", "ASK x y"])
async def test_a_redirect_out_of_range_is_a_store_failure_not_a_crash(reply: str) -> None:
    # Before: "MOVED 99999 ..." raised IndexError (the map has 16384 slots) and a
    # port out of range OverflowError: neither is a store failure, so Authorize
    # ended in the internal-error path with a traceback logged per call.
    async with nodes(lambda node, cmd: error(reply)) as (liar,):
        liar.own_all()
        c = cluster(liar.address)
        store = BudgetStore(None, KeySpace("t"), 0.5, transport=c)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=reply.split()[0]):
                await store.window(KEY)
            assert time.monotonic() - started < 1.0
            assert liar.count(b"HMGET") == 1  # not bounced around
        finally:
            await store.close()


# ------------------------------------------------- redirect without a host


async def test_a_redirect_without_a_host_goes_to_the_host_that_sent_it() -> None:
    # With cluster-preferred-endpoint-type unknown-endpoint Redis writes
    # "MOVED 3999 :6381" (and "?" when a hostname is preferred but unknown): the
    # same host as the node that answered, another port. Before: the client
    # tried to connect to the host "" or "?", failed, and the call failed
    # (every MOVED and ASK of such a cluster ended in the fail mode).
    async with nodes(None, lambda node, cmd: resp(b"from-target")) as (source, target):
        for host in ("", "?"):
            for kind in ("MOVED", "ASK"):
                source.handler = (lambda node, cmd, k=kind, h=host:
                                  error(f"{k} {SLOT} {h}:{target.port}"))
                source.slots = [[0, 16383, ["?", source.port]]]
                target.slots = source.slots
                c = cluster(source.address)
                try:
                    assert await c.command("GET", KEY, timeout_s=2) == b"from-target", (
                        kind, host)
                    assert c.redirects[kind] == 1
                finally:
                    await c.close()


# ------------------------------------------------------ refresh throttling


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


@pytest.mark.parametrize("seed", ["refuses CLUSTER SLOTS", "unreachable"])
async def test_failed_slot_map_reads_are_not_repeated_for_every_call(seed: str) -> None:
    # Before: while the map could not be read, every call started a new read
    # (one CLUSTER SLOTS to the node per call, at the callers' rate) and logged
    # a warning for each: 11,000 warnings in half a second with a dead seed.
    counter = _Count()
    log = logging.getLogger("keel_pdp.budget.cluster")
    log.addHandler(counter)
    async with nodes(None) as (node,):
        if seed == "refuses CLUSTER SLOTS":
            node.slots = None  # answers -ERR, the connection stays up
            address = node.address
        else:
            address = ("127.0.0.1", free_port())
        c = cluster(address, refresh_interval_s=0.1)
        calls = 0
        try:
            started = time.monotonic()
            while time.monotonic() - started < 0.5:
                calls += 1
                t0 = time.monotonic()
                with pytest.raises((OSError, TimeoutError)):
                    await c.command("GET", KEY, timeout_s=0.025)
                # Fails at once or by its deadline, never hangs (slack for a busy machine).
                assert time.monotonic() - t0 < 1.0
            reads = node.count(b"CLUSTER")
            print(f"{seed}: {calls} calls, {reads} CLUSTER SLOTS, {counter.records} warnings")
            assert calls > 20
            # One read per refresh interval at most (0.5 s / 0.1 s, and slack).
            assert counter.records <= 10
            assert reads <= 10
            if seed == "refuses CLUSTER SLOTS":
                # Once the map can be read, calls succeed again within an interval.
                node.own_all()
                await asyncio.sleep(0.15)
                assert await c.command("GET", KEY, timeout_s=1) == 1
        finally:
            log.removeHandler(counter)
            await c.close()


async def test_refreshes_do_not_ask_the_same_stalled_master_first_every_time() -> None:
    # The known masters were shuffled, then listed in the client's own node
    # order anyway: a master that stalls cost every refresh its whole timeout.
    async with nodes(None, None, None) as masters:
        bounds = [(0, 5460), (5461, 10922), (10923, 16383)]
        slots = [[lo, hi, ["127.0.0.1", m.port]] for (lo, hi), m in zip(bounds, masters,
                                                                         strict=True)]
        for m in masters:
            m.slots = slots
        c = cluster(masters[0].address, refresh_timeout_s=0.05)
        try:
            await c.refresh()
            stalled = masters[0]  # the seed: the first node the client knew
            stalled._answer = lambda cmd: SILENT  # type: ignore[method-assign]
            asked = 0
            for _ in range(12):
                before = stalled.count(b"CLUSTER")
                await c.refresh(timeout_s=2)
                asked += stalled.count(b"CLUSTER") > before  # asked only when first
            assert asked < 12  # about 4 in 12; all 12 has odds of 2e-6
        finally:
            await c.close()


# ----------------------------------------------- a written script: once only


def _owner_moves_to(target: FakeNode) -> list[list[Any]]:
    return [[0, 16383, ["127.0.0.1", target.port]]]


@pytest.mark.parametrize("fault", ["drop after the write", "garbage reply",
                                   "half a reply, then drop"])
@pytest.mark.parametrize("wait", [False, True], ids=["eval", "eval+WAIT"])
async def test_a_script_whose_reply_is_lost_is_never_sent_again(fault: str, wait: bool) -> None:
    # The tempting mistake: the node's connection is gone and the map now names
    # another owner, so "retry over there". The script may have run (a hold or
    # a settlement applied): it must fail, once, and never reach the new owner.
    async with nodes(None, None) as (source, target):
        def lose(node: FakeNode, cmd: list[bytes]) -> bytes | str:
            node.slots = _owner_moves_to(target)  # the next map names the target
            if fault == "drop after the write":
                return DROP
            if fault == "garbage reply":
                return b"%%%not resp\r\n"
            node.drop_after_write = True
            return b"$20\r\n{\"d\":\"AL"

        source.handler = lose
        source.own_all()
        target.slots = _owner_moves_to(target)
        c = cluster(source.address, refresh_interval_s=0.0)
        script = c.script(SCRIPT)
        try:
            await c.refresh()
            started = time.monotonic()
            call = (c.eval_script_wait(script, [KEY], [5], 1.0, None, 1, 100) if wait
                    else c.eval_script(script, [KEY], [5], timeout_s=1.0))
            with pytest.raises(RespConnectionError) as info:
                await call
            assert not isinstance(info.value, RespNotSent)
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.1)  # the map refresh the failure started
            assert c.owner_of(KEY) == target.address
            assert len(source.scripts_run()) == 1
            assert target.scripts_run() == []
            # The next call goes to the new owner, once.
            target.handler = lambda node, cmd: resp(7)
            assert await c.eval_script(script, [KEY], [5], timeout_s=1.0) == 7
            assert len(target.scripts_run()) == 1 and len(source.scripts_run()) == 1
        finally:
            await c.close()


async def test_a_script_timed_out_on_a_silent_master_is_sent_once_within_its_deadline(
        ) -> None:
    async with nodes(lambda node, cmd: SILENT, None) as (silent, other):
        silent.own_all()
        c = cluster(silent.address, other.address)
        script = c.script(SCRIPT)
        try:
            await c.refresh()
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await c.eval_script(script, [KEY], [5], timeout_s=0.05)
                assert time.monotonic() - started < 0.05 + 0.5  # deadline + slack
            assert len(silent.scripts_run()) == 3  # one per call, none re-sent
            assert other.scripts_run() == []
        finally:
            await c.close()


# ----------------------------------------------------- bounded redirection


async def test_moved_ping_pong_stops_after_the_redirect_limit() -> None:
    async with nodes(None, None) as (a, b):
        a.handler = lambda node, cmd: error(f"MOVED {SLOT} 127.0.0.1:{b.port}")
        b.handler = lambda node, cmd: error(f"MOVED {SLOT} 127.0.0.1:{a.port}")
        a.own_all()
        b.slots = a.slots
        c = cluster(a.address, max_redirects=5)
        script = c.script(SCRIPT)
        try:
            started = time.monotonic()
            with pytest.raises(RespError, match="MOVED"):
                await c.eval_script(script, [KEY], [1], timeout_s=2.0)
            assert time.monotonic() - started < 1.5
            assert len(a.scripts_run()) + len(b.scripts_run()) == 6  # first + 5 redirects
        finally:
            await c.close()


@pytest.mark.parametrize("answer", ["TRYAGAIN", "CLUSTERDOWN", "ASK then TRYAGAIN"])
async def test_endless_retry_replies_end_within_the_callers_deadline(answer: str) -> None:
    # Each of these means "not run", so re-sending is safe, but only until the
    # deadline: then a TimeoutError naming the last reply.
    async with nodes(None, None) as (source, target):
        if answer == "ASK then TRYAGAIN":
            source.handler = lambda node, cmd: error(f"ASK {SLOT} 127.0.0.1:{target.port}")
            target.handler = lambda node, cmd: error("TRYAGAIN keys are moving")
        else:
            source.handler = lambda node, cmd: error(f"{answer} try later")
        source.own_all()
        target.slots = source.slots
        c = cluster(source.address)
        script = c.script(SCRIPT)
        try:
            await c.refresh()
            for timeout in (0.02, 0.1):
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await c.eval_script(script, [KEY], [1], timeout_s=timeout)
                assert time.monotonic() - started < timeout + 0.5  # slack for a busy machine
            # The map is read at most once per refresh interval meanwhile.
            assert source.count(b"CLUSTER") <= 5
            if answer == "ASK then TRYAGAIN":
                # ASKING right before every script sent to the migration target.
                seen = [c_[0].upper() for c_ in target.seen
                        if c_[0].upper() in (b"ASKING", b"EVALSHA")]
                assert seen and len(seen) % 2 == 0
                assert seen[::2] == [b"ASKING"] * (len(seen) // 2)
                assert seen[1::2] == [b"EVALSHA"] * (len(seen) // 2)
        finally:
            await c.close()


async def test_a_silent_seed_never_holds_a_call_past_its_deadline() -> None:
    # A seed that accepts TCP and never answers, listed first.
    async with nodes(None, lambda node, cmd: resp(b"ok")) as (silent, good):
        silent._answer = lambda cmd: SILENT  # type: ignore[method-assign]
        good.own_all()
        c = cluster(silent.address, good.address, connect_timeout_s=0.2)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await c.command("GET", KEY, timeout_s=0.05)
            assert time.monotonic() - started < 0.05 + 0.5  # deadline + slack
            deadline = time.monotonic() + 3
            while True:  # the read in the background moves on to the next seed
                try:
                    assert await c.command("GET", KEY, timeout_s=0.05) == b"ok"
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
        finally:
            await c.close()


async def test_many_calls_during_a_slot_move_each_run_once_on_the_new_owner() -> None:
    async with nodes(None, None) as (source, target):
        source.handler = lambda node, cmd: error(f"MOVED {SLOT} 127.0.0.1:{target.port}")
        target.handler = lambda node, cmd: resp(cmd[-1])  # echoes the call's last ARGV
        source.own_all()
        target.slots = _owner_moves_to(target)
        c = cluster(source.address)
        script = c.script(SCRIPT)
        try:
            await c.refresh()
            source.slots = target.slots  # the move is done: both now say so
            replies = await asyncio.gather(*(
                c.eval_script(script, [KEY], [f"call-{i}"], timeout_s=2.0)
                for i in range(500)))
            assert replies == [f"call-{i}".encode() for i in range(500)]
            ran = [cmd[-1] for cmd in target.scripts_run()]
            assert sorted(ran) == sorted(f"call-{i}".encode() for i in range(500))
            assert len(source.scripts_run()) <= 500  # each bounced at most once
            assert source.count(b"CLUSTER") + target.count(b"CLUSTER") <= 3
        finally:
            await c.close()
