"""A small asyncio Redis client for the hot path: pipelined RESP2 over hiredis.

Why not redis-py's asyncio client: per call it checks a connection out of a
pool, writes, and reads its reply in a coroutine of its own, under a lock;
measured in bench/ (client section) that costs about three times the event-loop
CPU of this client per script call. Here a call is one ``pack_command``, one
write, one future and one timer: concurrent calls share one connection (or a
few), and the replies, which Redis sends in request order, resolve a FIFO of
futures as hiredis parses them.

Semantics the budget store relies on:

* Timeouts never desync the connection. A call that times out (or whose
  caller is cancelled) leaves its future in the FIFO; its reply is read and
  dropped when it comes. If the oldest call has waited more than ``stall_s``,
  the connection is treated as dead: it is closed, every pending call fails
  and the next call reconnects.
* A timeout counts from the moment the command was written, checked on the
  real clock (libuv timers have millisecond resolution and may fire early by
  up to a millisecond). An answer already waiting in the socket when the
  timer fires is not a timeout: the loop gets up to ``_GRACE_TURNS`` x
  ``_GRACE_S`` to read it (after a GC pause or a stall of the process, timers
  can run before the loop polls the socket again).
* Connection loss fails every pending call with ``RespConnectionError`` (an
  ``OSError``); the next call reconnects. Failed attempts back off
  exponentially (``backoff_base_s`` .. ``backoff_max_s``) and calls made during
  the back-off fail at once instead of waiting: a caller with a 25 ms budget
  gets its answer inside it.
* ``eval_script`` runs EVALSHA. On NOSCRIPT (script cache flushed, failover to
  a replica that never saw the script) it sends SCRIPT LOAD and EVALSHA again,
  pipelined: one extra round trip, and NOSCRIPT means the script did not run,
  so the retry is safe. Registered scripts are also loaded on every connect.
* The URL gives host/port (or a unix socket path), username/password (AUTH),
  the database (SELECT) and TLS for ``rediss://`` (query parameters
  ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
  ``ssl_check_hostname``, as redis-py names them).

Error replies raise ``RespError``; the budget store maps every exception here
to ``StoreUnavailable``. ``RespNotSent``, a ``RespConnectionError``, says the
command was never written. Redis Cluster: ``keel_pdp.budget.cluster`` keeps one
of these clients per master and routes each call by its keys' slot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from keel_pdp.budget.redis_url import RespConfig, parse_url
from keel_pdp.budget.resp_conn import _GRACE_S, _GRACE_TURNS, _Connection, _consume, _expire
from keel_pdp.budget.resp_pack import (
    Arg,
    RespConnectionError,
    RespError,
    RespNotSent,
    Script,
    Shared,
    _body,
    _pack,
    pack_evalsha,
)

__all__ = [
    "_GRACE_S", "_GRACE_TURNS", "Arg", "RespClient", "RespConfig", "RespConnectionError",
    "RespError", "RespNotSent", "Script", "Shared", "_Connection", "_body", "_consume",
    "_expire", "_pack", "pack_evalsha", "parse_url",
]

log = logging.getLogger("keel_pdp.budget.resp")


class RespClient:
    """Pipelined Redis client; see the module docstring for its guarantees."""

    def __init__(self, config: RespConfig) -> None:
        if config.connections < 1:
            raise ValueError("connections must be at least 1")
        self.config = config
        n = config.connections
        self._conns: list[_Connection | None] = [None] * n
        self._connecting: list[asyncio.Task[_Connection] | None] = [None] * n
        self._failures = [0] * n
        self._retry_at = [0.0] * n
        self._rr = 0
        self._scripts: dict[str, Script] = {}
        self._closed = False
        self.connects = 0

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RespClient:
        return cls(parse_url(url, **overrides))

    def script(self, source: str) -> Script:
        s = Script.from_source(source)
        self._scripts[s.sha] = s
        return s

    # ------------------------------------------------------------ commands
    async def command(self, *args: Arg, timeout_s: float) -> Any:
        """Send one command, wait at most ``timeout_s`` seconds for its reply."""
        conn = self._ready()
        if conn is None:
            conn = await self._connect_within(timeout_s)
        return await self._wait(conn.send(_pack(args)), timeout_s, conn)

    async def eval_script(self, script: Script, keys: Sequence[str],
                          args: Sequence[Arg], timeout_s: float,
                          shared: Shared | None = None) -> Any:
        """EVALSHA; on NOSCRIPT, SCRIPT LOAD + EVALSHA pipelined (one more round trip)."""
        started = time.monotonic()
        conn = self._ready()
        if conn is None:
            conn = await self._connect_within(timeout_s)
        packed = pack_evalsha(script.sha, keys, args, shared)
        try:
            return await self._wait(conn.send(packed), timeout_s, conn)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise TimeoutError("no time left to load the script")
        conn = self._ready() or await self._connect_within(left)
        load = conn.send(_pack(("SCRIPT", "LOAD", script.source)))
        run = conn.send(packed)
        load.add_done_callback(_consume)
        return await self._wait(run, left, conn)

    async def eval_script_wait(self, script: Script, keys: Sequence[str],
                               args: Sequence[Arg], timeout_s: float,
                               shared: Shared | None, replicas: int,
                               wait_ms: int) -> tuple[Any, int]:
        """EVALSHA then ``WAIT replicas wait_ms``, written back to back on one
        connection (one round trip): the script's reply and how many replicas
        acknowledged every write of this connection so far. WAIT counts the
        connection's own writes, so the two must share it; replies come in order,
        so the script's reply is known before WAIT's."""
        started = time.monotonic()
        packed = pack_evalsha(script.sha, keys, args, shared)
        try:
            return await self.pipelined_wait((packed,), timeout_s, replicas, wait_ms)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise TimeoutError("no time left to load the script")
        load = _pack(("SCRIPT", "LOAD", script.source))
        return await self.pipelined_wait((load, packed), left, replicas, wait_ms)

    async def pipelined_wait(self, commands: Sequence[bytes], timeout_s: float,
                             replicas: int, wait_ms: int) -> tuple[Any, int]:
        """``pipelined`` followed by ``WAIT replicas wait_ms`` on the same
        connection: the last command's reply and WAIT's count (-1: WAIT did not
        answer within ``timeout_s``). An error reply of the command is raised
        (WAIT's reply is then read and dropped)."""
        if wait_ms < 1:
            raise ValueError("WAIT needs a timeout of at least 1 ms (0 blocks forever)")
        conn = self._ready()
        if conn is None:
            conn = await self._connect_within(timeout_s)
        sent = time.monotonic()
        futs = [conn.send(c) for c in commands]
        acked = conn.send(_pack(("WAIT", replicas, wait_ms)))
        for f in futs[:-1]:
            f.add_done_callback(_consume)
        try:
            reply = await self._wait(futs[-1], timeout_s, conn)
        except BaseException:
            acked.add_done_callback(_consume)
            raise
        # The same deadline for both, counted from the first write. The command has
        # run: a WAIT that does not answer in time (Redis 7 ends a WAIT's timeout
        # at its next cron tick, up to 1/hz late) is a count of -1, not a failure
        # of a call whose write is done; its reply is read and dropped later.
        left = timeout_s - (time.monotonic() - sent)
        if left <= 0 and not acked.done():
            acked.add_done_callback(_consume)
            return reply, -1
        try:
            return reply, int(await self._wait(acked, max(left, 0.0005), conn))
        except TimeoutError:
            return reply, -1

    async def pipelined(self, commands: Sequence[bytes], timeout_s: float) -> Any:
        """Write already packed ``commands`` back to back on one connection and
        return the last one's reply (earlier replies are read and dropped).
        Redis Cluster's ASK needs this: ASKING applies to the next command on
        the same connection only."""
        conn = self._ready()
        if conn is None:
            conn = await self._connect_within(timeout_s)
        futs = [conn.send(c) for c in commands]
        for f in futs[:-1]:
            f.add_done_callback(_consume)
        return await self._wait(futs[-1], timeout_s, conn)

    async def _wait(self, fut: asyncio.Future[Any], timeout_s: float,
                    conn: _Connection) -> Any:
        handle = asyncio.get_running_loop().call_later(
            timeout_s, _expire, fut, timeout_s, conn, time.monotonic())
        try:
            return await fut
        except TimeoutError:
            conn.check_stall(max(self.config.stall_s, timeout_s))
            raise
        finally:
            handle.cancel()

    # --------------------------------------------------------- connections
    def _ready(self) -> _Connection | None:
        conns = self._conns
        if len(conns) == 1:
            return conns[0]
        self._rr = (self._rr + 1) % len(conns)
        conn = conns[self._rr]
        if conn is None:
            # Use another connection now and bring this one up in the background.
            if self._connecting[self._rr] is None and not self._closed and (
                    time.monotonic() >= self._retry_at[self._rr]):
                task = asyncio.get_running_loop().create_task(self._open(self._rr))
                task.add_done_callback(_consume)
                self._connecting[self._rr] = task
            conn = next((c for c in conns if c is not None), None)
        return conn

    async def _connect_within(self, timeout_s: float) -> _Connection:
        if self._closed:
            raise RespNotSent("client is closed")
        slot = next((i for i, c in enumerate(self._conns) if c is None), 0)
        task = self._connecting[slot]
        if task is None:
            now = time.monotonic()
            if now < self._retry_at[slot]:
                raise RespNotSent(
                    f"Redis unreachable; next connect attempt in "
                    f"{(self._retry_at[slot] - now) * 1000:.0f} ms")
            task = asyncio.get_running_loop().create_task(self._open(slot))
            self._connecting[slot] = task
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(task)
        except TimeoutError:
            raise TimeoutError("connecting to Redis took longer than the call's budget") from None

    async def _open(self, slot: int) -> _Connection:
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                if cfg.unix_path:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(self, slot), cfg.unix_path, ssl=cfg.ssl_context,
                        server_hostname=cfg.server_hostname if cfg.ssl_context else None)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, slot), cfg.host, cfg.port,
                        ssl=cfg.ssl_context, server_hostname=cfg.server_hostname)
                try:
                    await self._handshake(conn)
                except BaseException:
                    conn.close()
                    raise
        except (OSError, TimeoutError, RespError) as exc:
            self._failures[slot] += 1
            delay = min(cfg.backoff_max_s,
                        cfg.backoff_base_s * 2 ** (self._failures[slot] - 1))
            self._retry_at[slot] = time.monotonic() + delay * random.uniform(0.5, 1.0)
            log.warning("cannot connect to Redis (%s: %s); retrying in <= %.0f ms",
                        type(exc).__name__, exc, delay * 1000)
            raise RespNotSent(f"cannot connect to Redis: {exc}") from exc
        finally:
            self._connecting[slot] = None
        if self._closed:
            conn.close()
            raise RespNotSent("client is closed")
        self._failures[slot] = 0
        self._conns[slot] = conn
        self.connects += 1
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        cfg = self.config
        steps: list[asyncio.Future[Any]] = []
        if cfg.password is not None:
            auth: tuple[Arg, ...] = (("AUTH", cfg.username, cfg.password) if cfg.username
                                     else ("AUTH", cfg.password))
            steps.append(conn.send(_pack(auth)))
        if cfg.db:
            steps.append(conn.send(_pack(("SELECT", cfg.db))))
        for s in self._scripts.values():
            steps.append(conn.send(_pack(("SCRIPT", "LOAD", s.source))))
        if not steps:
            steps.append(conn.send(_pack(("PING",))))
        # Every step must be read even if one fails, so gather them all.
        results = await asyncio.gather(*steps, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _in_flight(self) -> list[asyncio.Future[Any]]:
        """What is under way: connects, and written calls whose reply has not come
        (a call whose caller gave up, timed out or cancelled, is done already:
        its reply is dropped when it comes, nobody waits for it)."""
        waiting: list[asyncio.Future[Any]] = [t for t in self._connecting if t is not None]
        for conn in self._conns:
            if conn is not None:
                waiting += [fut for fut, _ in conn.pending if not fut.done()]
        return waiting

    async def close_when_idle(self, grace_s: float) -> None:
        """Close once nothing is in flight (see ``_in_flight``), or after ``grace_s``.

        Closing at once would fail the calls in flight with a connection error,
        and a written call that fails is not sent again (it may have run): an
        answer the node is about to give, a ``MOVED`` included, would be lost.
        A call that starts meanwhile is served as usual; one that starts after
        the close is refused with ``RespNotSent`` (never written), which the
        cluster client sends to the slot's owner. ``grace_s`` bounds the wait
        for a node that never answers."""
        deadline = time.monotonic() + grace_s
        while not self._closed:
            waiting = self._in_flight()
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            await asyncio.wait(waiting, timeout=left)
        await self.close()

    def _lost(self, conn: _Connection) -> None:
        if self._conns[conn.slot] is conn:
            self._conns[conn.slot] = None

    async def close(self) -> None:
        self._closed = True
        for task in self._connecting:
            if task is not None:
                task.cancel()
        for conn in self._conns:
            if conn is not None:
                conn.close()
        await asyncio.sleep(0)

    @property
    def connected(self) -> bool:
        return any(c is not None for c in self._conns)
