"""Redis Cluster for the hot path: the pipelined RESP client, once per master.

A cluster is named by ``redis+cluster://`` (``rediss+cluster://`` for TLS) and
a comma-separated list of seed nodes; see ``parse_cluster_url`` and
docs/redis-cluster.md for why this form. ``ClusterClient`` has the interface of
``keel_pdp.budget.resp.RespClient`` (``script``, ``eval_script``, ``command``,
``close``), so the budget store takes it as its transport unchanged.

How a call travels:

* The slot of every key of the call is computed here (CRC16 of the key's hash
  tag, modulo 16384, as Redis does). All keys of one call must share a slot,
  since a script runs on one node; a call whose keys do not is refused with
  ``CrossSlotError`` naming them. It is a ``ValueError``, not a store failure, on
  purpose: it must never be mistaken for "Redis unavailable" and fail open.
* The slot map (CLUSTER SLOTS, asked of a known node or a seed) says which
  master owns the slot; each master has one ``RespClient`` with one pipelined
  connection. The common case is therefore one write and one reply, as on a
  single node.
* ``MOVED slot host:port``: the slot has a new owner. The map entry is fixed at
  once, the call is re-sent there, and the whole map is refreshed in the
  background. ``ASK slot host:port`` (a slot being migrated, this key already
  moved): the call is re-sent to the target as ``ASKING`` + the command on one
  connection, and the map is left alone. ``TRYAGAIN`` (the keys of a call are
  split between the two nodes of a migration for a moment) and ``CLUSTERDOWN``
  (a master failed and its replica is not promoted yet) are retried after a
  short pause. Each of these replies means the command did not run, so
  re-sending it is safe; all of it happens within the call's own timeout.
* A command that was never written (``RespNotSent``: connection refused, the
  node in back-off) is re-sent once the map has been refreshed, if the slot
  now has another owner. A command that was written and then lost its
  connection is NOT re-sent (it may have run): the call fails, as on a single
  node, and the map is refreshed for the calls that follow.
* NOSCRIPT is handled per node by its ``RespClient``; every node loads the
  registered scripts when it connects.

Nodes that leave: a node that a newly read map no longer names (its slots
resharded away, the node deleted or forgotten) is dropped from the node table
and its connection closed once the calls in flight on it have their answers
(``RespClient.close_when_idle``): such a call completes there or is redirected
(``MOVED``) like any other, and one that comes too late to be written is
refused as never sent and goes to the slot's owner. Only a map that assigns
every slot closes anything: a node that answers with part of the map (it has
just joined, been reset or lost its view for a moment) must not close the
connections to the masters it does not list. A node named again later gets a
new client and connection. Nothing of this runs per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from keel_pdp.budget.cluster_slots import (
    _BROADCAST,
    SLOTS,
    Address,
    CrossSlotError,
    _cross_slot,
    _redirect,
    _text,
    call_slot,
    command_keys,
    crc16,
    hash_tag,
    key_slot,
    slot_range,
)
from keel_pdp.budget.cluster_url import (
    SCHEMES,
    ClusterConfig,
    describe_cluster_url,
    is_cluster_url,
    parse_cluster_url,
    redis_py_options,
)
from keel_pdp.budget.resp import (
    RespClient,
    RespConnectionError,
    RespError,
    RespNotSent,
    Script,
    Shared,
)
from keel_pdp.budget.resp_pack import Arg, _pack, pack_evalsha

__all__ = [
    "SCHEMES", "SLOTS", "Address", "ClusterClient", "ClusterConfig", "CrossSlotError",
    "call_slot", "command_keys", "crc16", "describe_cluster_url", "hash_tag",
    "is_cluster_url", "key_slot", "parse_cluster_url", "redis_py_options",
]

log = logging.getLogger("keel_pdp.budget.cluster")

_ASKING = _pack(("ASKING",))


class ClusterClient:
    """Routes each call to the master owning its keys' slot; see the module docstring."""

    def __init__(self, config: ClusterConfig) -> None:
        if not config.seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        self.config = config
        self._nodes: dict[Address, RespClient] = {}
        self._slots: list[RespClient | None] = [None] * SLOTS
        self._masters: list[RespClient] = []
        self._scripts: dict[str, Script] = {}
        self._shared_slots: dict[int, tuple[Shared, int | None]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        # Nodes that left the map, closing once their calls in flight are answered.
        self._retiring: dict[RespClient, asyncio.Task[None]] = {}
        self._retired_connects = 0
        self._refreshed_at = -1e9
        # When the last refresh failed, and how: for that long calls are answered
        # with it instead of asking again (see _refresh_now).
        self._failed_at = -1e9
        self._failure = ""
        self._closed = False
        self.refreshes = 0
        self.retired = 0  # nodes closed because the map no longer names them
        self.redirects = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0, "CLUSTERDOWN": 0, "not_sent": 0}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> ClusterClient:
        return cls(parse_cluster_url(url, **overrides))

    def script(self, source: str) -> Script:
        s = Script.from_source(source)
        self._scripts[s.sha] = s
        for node in self._nodes.values():
            node.script(source)
        return s

    # ----------------------------------------------------------- the calls
    async def eval_script(self, script: Script, keys: Sequence[str],
                          args: Sequence[Arg], timeout_s: float,
                          shared: Shared | None = None) -> Any:
        """EVALSHA on the master owning the slot of ``keys`` (and ``shared.keys``)."""
        slot = self._slot_of(keys, shared)
        started = time.monotonic()
        node = self._slots[slot] if slot is not None else self._owner(None)
        failed: Exception | None = None
        if node is not None:
            # The common case: the map is known and the master answers. One write.
            try:
                return await node.eval_script(script, keys, args, timeout_s, shared)
            except (RespError, OSError, TimeoutError) as exc:
                failed = exc
        return await self._eval_routed(script, keys, args, shared, None, slot,
                                       started + timeout_s, node, failed)

    async def eval_script_wait(self, script: Script, keys: Sequence[str],
                               args: Sequence[Arg], timeout_s: float,
                               shared: Shared | None, replicas: int,
                               wait_ms: int) -> tuple[Any, int]:
        """``eval_script`` followed by ``WAIT replicas wait_ms`` on the same
        connection of the master that ran it (after MOVED or ASK too): the
        script's reply and the number of replicas that acknowledged it."""
        slot = self._slot_of(keys, shared)
        started = time.monotonic()
        node = self._slots[slot] if slot is not None else self._owner(None)
        failed: Exception | None = None
        if node is not None:
            try:
                return await node.eval_script_wait(script, keys, args, timeout_s, shared,
                                                   replicas, wait_ms)
            except (RespError, OSError, TimeoutError) as exc:
                failed = exc
        out: tuple[Any, int] = await self._eval_routed(
            script, keys, args, shared, (replicas, wait_ms), slot, started + timeout_s, node,
            failed)
        return out

    async def _eval_routed(self, script: Script, keys: Sequence[str], args: Sequence[Arg],
                           shared: Shared | None, wait: tuple[int, int] | None,
                           slot: int | None, deadline: float, node: RespClient | None,
                           failed: Exception | None) -> Any:
        packed: bytes | None = None

        def attempt(node: RespClient, asking: bool, left: float) -> Awaitable[Any]:
            nonlocal packed
            if not asking:
                if wait is None:
                    return node.eval_script(script, keys, args, left, shared)
                return node.eval_script_wait(script, keys, args, left, shared, *wait)
            if packed is None:
                packed = pack_evalsha(script.sha, keys, args, shared)
            return self._asking_eval(node, script, packed, left, wait)

        return await self._route(slot, attempt, deadline, node, failed)

    async def command(self, *args: Arg, timeout_s: float) -> Any:
        """One command, on the master owning its key's slot (SCRIPT and FUNCTION:
        on every master; commands without keys: on any master)."""
        keys = command_keys(args)
        if _text(args[0]).upper() in _BROADCAST:
            return await self._broadcast(args, timeout_s)
        slot = call_slot(keys)
        packed = _pack(tuple(args))

        def attempt(node: RespClient, asking: bool, left: float) -> Awaitable[Any]:
            if asking:
                return node.pipelined((_ASKING, packed), left)
            return node.command(*args, timeout_s=left)

        return await self._route(slot, attempt, time.monotonic() + timeout_s,
                                 self._owner(slot), None)

    async def _asking_eval(self, node: RespClient, script: Script, packed: bytes,
                           left: float, wait: tuple[int, int] | None = None) -> Any:
        started = time.monotonic()

        def send(commands: tuple[bytes, ...], budget: float) -> Awaitable[Any]:
            if wait is None:
                return node.pipelined(commands, budget)
            return node.pipelined_wait(commands, budget, *wait)

        try:
            return await send((_ASKING, packed), left)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        left -= time.monotonic() - started
        if left <= 0:
            raise TimeoutError("no time left to load the script")
        load = _pack(("SCRIPT", "LOAD", script.source))
        return await send((load, _ASKING, packed), left)

    async def on_every_master(self, *args: Arg, timeout_s: float) -> list[Any]:
        """One command on every master of the current map, their replies in map order
        (``INFO replication``: how many replicas each has)."""
        deadline = time.monotonic() + timeout_s
        if not self._masters:
            await self._refresh_within(timeout_s)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left after reading the Redis Cluster slot map")
        return list(await asyncio.gather(
            *(m.command(*args, timeout_s=left) for m in list(self._masters))))

    async def _broadcast(self, args: Sequence[Arg], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        if not self._masters:
            await self._refresh_within(timeout_s)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left after reading the Redis Cluster slot map")
        results = await asyncio.gather(
            *(m.command(*args, timeout_s=left) for m in list(self._masters)),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results[0]

    def _slot_of(self, keys: Sequence[str], shared: Shared | None) -> int | None:
        slot = None
        if shared is not None:
            # A shape's shared keys are the same for every call of that shape.
            hit = self._shared_slots.get(id(shared))
            if hit is None or hit[0] is not shared:
                if len(self._shared_slots) >= 4096:
                    self._shared_slots.clear()
                hit = (shared, call_slot(shared.keys))
                self._shared_slots[id(shared)] = hit
            slot = hit[1]
        if keys:
            own = call_slot(keys)
            if slot is not None and own != slot:
                raise _cross_slot([*keys, *(shared.keys if shared is not None else ())])
            slot = own
        return slot

    async def _route(self, slot: int | None,
                     attempt: Callable[[RespClient, bool, float], Awaitable[Any]],
                     deadline: float, node: RespClient | None,
                     failed: Exception | None) -> Any:
        """Send (again) until an answer, an error that must not be retried, or the deadline.
        ``failed``: what the first try on ``node`` raised, if it was made already."""
        asking = False
        redirects = 0
        pause = 0.001
        last = ""
        while True:
            if failed is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"Redis Cluster did not answer in time (slot {slot})"
                                       + (f"; last reply: {last}" if last else ""))
                if node is None:
                    await self._refresh_within(left)
                    node = self._owner(slot)
                    if node is None:
                        raise RespConnectionError(
                            f"no Redis Cluster master serves slot {slot}")
                    continue
                try:
                    return await attempt(node, asking, left)
                except (RespError, OSError, TimeoutError) as exc:
                    failed = exc
            error, failed = failed, None
            if isinstance(error, RespNotSent):
                # Never written, so it did not run: send it to whoever owns the
                # slot once the map is fresh, if that is another node.
                self.redirects["not_sent"] += 1
                before = node
                await self._refresh_within(deadline - time.monotonic())
                node, asking = self._owner(slot), False
                if node is before or node is None:
                    raise error
            elif isinstance(error, RespError):
                message = str(error)
                kind = message.split(" ", 1)[0]
                if kind in ("MOVED", "ASK"):
                    target = _redirect(message, node.config.host if node else "")
                    redirects += 1
                    if target is None or redirects > self.config.max_redirects:
                        raise error
                    self.redirects[kind] += 1
                    node = self._node(target[1])
                    asking = kind == "ASK"
                    if kind == "MOVED":
                        self._slots[target[0]] = node
                        self._refresh_later()
                elif kind in ("TRYAGAIN", "CLUSTERDOWN"):
                    self.redirects[kind] += 1
                    last = message
                    if kind == "CLUSTERDOWN":
                        self._refresh_later()
                    await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
                    pause = min(pause * 2, 0.05)
                    if kind == "CLUSTERDOWN":
                        node, asking = self._owner(slot), False
                else:
                    raise error
            else:
                # Written, then lost or unanswered: it may have run, so it is not
                # re-sent. A failover shows up here first; look for the new master.
                self._refresh_later()
                raise error

    # ------------------------------------------------------------ the map
    def _owner(self, slot: int | None) -> RespClient | None:
        if slot is None:
            masters = self._masters
            return masters[0] if masters else None
        return self._slots[slot]

    def _node(self, address: Address) -> RespClient:
        node = self._nodes.get(address)
        if node is None:
            host, port = address
            cfg = self.config.node
            node = RespClient(replace(
                cfg, host=host, port=port, unix_path=None, connections=1,
                server_hostname=host if cfg.ssl_context is not None else None))
            for s in self._scripts.values():
                node.script(s.source)
            self._nodes[address] = node
        return node

    def _recently_refreshed(self) -> bool:
        """Whether a refresh ended, well or not, less than ``refresh_interval_s`` ago."""
        last = max(self._refreshed_at, self._failed_at)
        return time.monotonic() - last < self.config.refresh_interval_s

    def _refresh_later(self) -> None:
        if self._closed or self._refreshing is not None or self._recently_refreshed():
            return
        self._start_refresh()

    def _start_refresh(self) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._discover())
        task.add_done_callback(self._refresh_done)
        self._refreshing = task
        return task

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("Redis Cluster slot map refresh failed: %s", task.exception())

    async def _refresh_now(self) -> None:
        task = self._refreshing
        if task is None:
            if self._recently_refreshed():
                # A failed refresh is not retried at once either: during an
                # outage every call would otherwise ask every node for the map
                # (and log a warning), at the calls' own rate.
                if self._masters:
                    return
                if self._failure:
                    raise RespConnectionError(self._failure)
            task = self._start_refresh()
        await asyncio.shield(task)

    async def _refresh_within(self, left: float) -> None:
        if left <= 0:
            raise TimeoutError("no time left to refresh the Redis Cluster slot map")
        try:
            async with asyncio.timeout(left):
                await self._refresh_now()
        except TimeoutError:
            raise TimeoutError("refreshing the Redis Cluster slot map took longer than "
                               "the call's budget") from None

    async def refresh(self, timeout_s: float = 2.0) -> None:
        """Read the slot map now (the first call does this by itself)."""
        async with asyncio.timeout(timeout_s):
            task = self._refreshing or self._start_refresh()
            await asyncio.shield(task)

    async def _discover(self) -> None:
        if self._closed:
            raise RespConnectionError("client is closed")
        known = list(dict.fromkeys(self._masters))
        # In random order, so a master that stalls is not asked first every time.
        random.shuffle(known)
        where = {id(n): a for a, n in self._nodes.items()}
        addresses = [where[id(n)] for n in known]
        addresses += [s for s in self.config.seeds if s not in addresses]
        failures = []
        for address in addresses:
            try:
                raw = await self._node(address).command(
                    "CLUSTER", "SLOTS", timeout_s=self.config.refresh_timeout_s)
                self._install(raw, address)
                return
            except (OSError, TimeoutError, RespError, ValueError) as exc:
                failures.append(f"{address[0]}:{address[1]}: {exc}")
        self._failure = ("no Redis Cluster node answered CLUSTER SLOTS ("
                         + "; ".join(failures) + ")")
        self._failed_at = time.monotonic()
        raise RespConnectionError(self._failure)

    def _install(self, raw: Any, asked: Address) -> None:
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"CLUSTER SLOTS answered {raw!r:.80}")
        ranges = [slot_range(entry, asked[0]) for entry in raw]  # all checked first
        slots: list[RespClient | None] = [None] * SLOTS
        masters: list[RespClient] = []
        for start, end, address in ranges:
            node = self._node(address)
            if node not in masters:
                masters.append(node)
            slots[start:end + 1] = [node] * (end - start + 1)
        self._slots = slots
        self._masters = masters
        self._refreshed_at = time.monotonic()
        self._failure = ""
        self.refreshes += 1
        if None not in slots:
            # Only a complete map says who is gone (see the module docstring).
            self._retire_absent(masters)

    def _retire_absent(self, masters: list[RespClient]) -> None:
        """Drop the nodes ``masters`` does not name from the node table (a later
        mention of the address makes a new client) and close each once idle."""
        named = set(masters)
        for address, node in list(self._nodes.items()):
            if node in named:
                continue
            del self._nodes[address]
            task = asyncio.get_running_loop().create_task(self._retire(address, node))
            self._retiring[node] = task

    async def _retire(self, address: Address, node: RespClient) -> None:
        try:
            await node.close_when_idle(self.config.retire_grace_s)
        finally:
            del self._retiring[node]
            self._retired_connects += node.connects
            self.retired += 1
        log.info("Redis Cluster node %s:%d is no longer in the slot map: its connection "
                 "is closed", address[0], address[1])

    # ----------------------------------------------------------- lifecycle
    @property
    def masters(self) -> list[Address]:
        """Addresses of the masters in the current slot map."""
        return [a for a, n in self._nodes.items() if n in self._masters]

    def owner_of(self, key: str) -> Address | None:
        node = self._slots[key_slot(key)]
        return next((a for a, n in self._nodes.items() if n is node), None)

    @property
    def nodes(self) -> list[Address]:
        """Addresses of the nodes the client holds a client for (masters, and
        nodes a redirect or a refresh reached that a complete map has not
        dropped yet); nodes that left the map and are closing are not listed."""
        return list(self._nodes)

    @property
    def connected(self) -> bool:
        return any(n.connected for n in self._nodes.values())

    @property
    def connects(self) -> int:
        return (sum(n.connects for n in self._nodes.values())
                + sum(n.connects for n in self._retiring) + self._retired_connects)

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for node, task in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await node.close()
        for node in self._nodes.values():
            await node.close()
