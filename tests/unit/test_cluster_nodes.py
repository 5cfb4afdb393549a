"""The cluster client's node table over a scripted sequence of slot maps, on
fake nodes (tests/fake_cluster.py, loopback only).

A node that leaves the cluster (its slots resharded away, then deleted or
forgotten) used to keep its connection open until the sidecar restarted. What
must hold now:

* a node that a complete map no longer names is dropped and its connection
  closed;
* a map that is partial (slots without an owner), empty, malformed or refused
  closes nothing: it may come from a node that has just joined, been reset or
  lost its view for a moment;
* a call in flight on a departing node is answered there (or redirected by its
  ``MOVED``), never failed by the close, never run a second time elsewhere; a
  call its caller has given up on does not keep the node open;
* a node named again later (same host and port) gets a new connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from keel_pdp.budget.cluster import ClusterClient, key_slot
from keel_pdp.budget.resp import RespConnectionError
from tests.fake_cluster import FakeNode, cluster, error, nodes, resp

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
HALF = 8192


def key_in(low: int, high: int) -> str:
    """A key whose slot is in ``low``..``high``."""
    return next(k for k in (f"k:{{{i}}}" for i in range(10_000)) if low <= key_slot(k) <= high)


KEY_A, KEY_B = key_in(0, HALF - 1), key_in(HALF, 16383)


def name_replies(node: FakeNode, cmd: list[bytes]) -> bytes:
    """Every node answers with its port (WAIT: one replica acknowledged)."""
    if cmd[0].upper() == b"WAIT":
        return resp(1)
    return resp(str(node.port))


def split(a: FakeNode, b: FakeNode) -> list[list[Any]]:
    return [[0, HALF - 1, ["127.0.0.1", a.port]], [HALF, 16383, ["127.0.0.1", b.port]]]


def show(slot_map: list[list[Any]] | None, *on: FakeNode) -> None:
    for node in on:
        node.slots = slot_map


async def until(check: Callable[[], bool], what: str, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.01)


async def served_by(c: ClusterClient, key: str) -> int:
    return int(await c.command("GET", key, timeout_s=2))


async def test_a_node_left_out_of_a_complete_map_is_closed_and_reconnected_when_back(
        ) -> None:
    async with nodes(name_replies, name_replies) as (a, b):
        show(split(a, b), a, b)
        c = cluster(a.address, refresh_interval_s=0.0)
        try:
            await c.refresh()
            assert await served_by(c, KEY_A) == a.port
            assert await served_by(c, KEY_B) == b.port
            assert (a.clients, b.clients) == (1, 1)
            first_b = c._nodes[b.address]

            # B's slots are resharded to A, then B is deleted: both say so.
            show(a.own_all().slots, a, b)
            await c.refresh()
            await until(lambda: b.clients == 0 and c.retired == 1, "the connection to B closed")
            assert c.nodes == [a.address] and c.masters == [a.address]
            assert a.clients == 1  # the node that stays keeps its one connection
            assert await served_by(c, KEY_B) == a.port

            # B comes back on the same port (a new process) and gets slots again.
            await b.stop()
            await b.start()
            show(split(a, b), a, b)
            await c.refresh()
            assert await served_by(c, KEY_B) == b.port
            assert b.clients == 1
            assert c._nodes[b.address] is not first_b
            assert sorted(c.nodes) == sorted([a.address, b.address])
            assert c.connects == 3  # A once, B twice
        finally:
            await c.close()
        await until(lambda: (a.clients, b.clients) == (0, 0), "all closed with the client")


BAD_MAPS: dict[str, Any] = {
    "partial (slots without an owner)": "partial",
    "empty": [],
    "malformed": [[0, 16383]],
    "refused (-ERR)": None,
}


@pytest.mark.parametrize("bad", list(BAD_MAPS), ids=list(BAD_MAPS))
async def test_a_partial_or_refused_map_closes_nothing(bad: str) -> None:
    async with nodes(name_replies, name_replies) as (a, b):
        show(split(a, b), a, b)
        c = cluster(a.address, b.address, refresh_interval_s=0.0)
        try:
            await c.refresh()
            assert await served_by(c, KEY_A) == a.port
            assert await served_by(c, KEY_B) == b.port
            # Both nodes answer the bad map, so no refresh can find a good one.
            wrong = BAD_MAPS[bad]
            show([[0, 100, ["127.0.0.1", a.port]]] if wrong == "partial" else wrong, a, b)
            for _ in range(3):
                if wrong == "partial":
                    await c.refresh()  # used for routing, as before
                else:
                    with pytest.raises(RespConnectionError):
                        await c.refresh()
            await asyncio.sleep(0.2)
            assert (a.clients, b.clients) == (1, 1)
            assert c.retired == 0
            assert sorted(c.nodes) == sorted([a.address, b.address])
            # The good map again: both served on the connections they had.
            show(split(a, b), a, b)
            await c.refresh()
            assert await served_by(c, KEY_A) == a.port
            assert await served_by(c, KEY_B) == b.port
            assert c.connects == 2 and (a.clients, b.clients) == (1, 1)
        finally:
            await c.close()


@pytest.mark.parametrize("answer", ["runs there", "MOVED"])
@pytest.mark.parametrize("wait", [False, True], ids=["eval", "eval+WAIT"])
async def test_a_call_in_flight_on_a_departing_node_is_answered_not_lost(
        answer: str, wait: bool) -> None:
    # Closing at once fails the call with a connection error; a written call
    # is never re-sent (it may have run), so its answer would be lost.
    async with nodes(name_replies, name_replies) as (a, b):
        show(split(a, b), a, b)
        c = cluster(a.address, refresh_interval_s=0.0)
        script = c.script(SCRIPT)
        try:
            await c.refresh()
            assert await served_by(c, KEY_B) == b.port
            if answer == "MOVED":
                b.handler = lambda node, cmd: (
                    resp(1) if cmd[0].upper() == b"WAIT"
                    else error(f"MOVED {key_slot(KEY_B)} 127.0.0.1:{a.port}"))
            b.hold = asyncio.Event()
            call = asyncio.ensure_future(
                c.eval_script_wait(script, [KEY_B], [5], 5.0, None, 1, 100) if wait
                else c.eval_script(script, [KEY_B], [5], timeout_s=5.0))
            await until(lambda: len(b.scripts_run()) == 1, "the script written to B")
            departing = c._nodes[b.address]
            show(a.own_all().slots, a, b)
            await c.refresh()
            await asyncio.sleep(0.2)
            assert b.address not in c.nodes  # no longer used for new calls
            assert not call.done() and departing.connected  # but open for this one
            b.hold.set()
            reply = await call
            got = reply[0] if wait else reply
            if answer == "runs there":
                assert int(got) == b.port
                assert a.scripts_run() == []  # not run a second time
            else:  # redirected, as without the departure
                assert int(got) == a.port
                assert len(a.scripts_run()) == 1
            assert len(b.scripts_run()) == 1
            await until(lambda: not departing.connected and b.clients == 0,
                        "B closed once the call was answered")
        finally:
            await c.close()


async def test_a_call_given_up_on_does_not_keep_a_silent_node_open() -> None:
    async with nodes(name_replies, name_replies) as (a, b):
        show(split(a, b), a, b)
        c = cluster(a.address, refresh_interval_s=0.0, retire_grace_s=60.0)
        script = c.script(SCRIPT)
        hold = asyncio.Event()
        try:
            await c.refresh()
            assert await served_by(c, KEY_B) == b.port
            b.hold = hold  # B never answers again
            with pytest.raises(TimeoutError):
                await c.eval_script(script, [KEY_B], [5], timeout_s=0.05)
            departing = c._nodes[b.address]
            show(a.own_all().slots, a, b)
            await c.refresh()
            # Its caller has its answer (a timeout): nothing to wait for. (The
            # fake node, held, does not read the close: asked of the client.)
            await until(lambda: c.retired == 1, "the silent node closed")
            assert not departing.connected
            assert len(b.scripts_run()) == 1 and a.scripts_run() == []
        finally:
            hold.set()
            await c.close()


async def test_a_silent_node_with_a_call_in_flight_is_closed_after_the_grace() -> None:
    async with nodes(name_replies, name_replies) as (a, b):
        show(split(a, b), a, b)
        c = cluster(a.address, refresh_interval_s=0.0, retire_grace_s=0.3)
        script = c.script(SCRIPT)
        hold = asyncio.Event()
        try:
            await c.refresh()
            assert await served_by(c, KEY_B) == b.port
            b.hold = hold
            call = asyncio.ensure_future(c.eval_script(script, [KEY_B], [5], timeout_s=30.0))
            await until(lambda: len(b.scripts_run()) == 1, "the script written to B")
            departing = c._nodes[b.address]
            show(a.own_all().slots, a, b)
            await c.refresh()
            await until(lambda: not departing.connected, "B closed after its grace")
            # Written and unanswered: it may have run, so it fails and is not re-sent.
            with pytest.raises(RespConnectionError):
                await call
            assert a.scripts_run() == []
        finally:
            hold.set()
            await c.close()
