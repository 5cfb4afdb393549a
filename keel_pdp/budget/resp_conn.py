"""One RESP connection of the client: an asyncio protocol whose replies resolve a
FIFO of futures in order, and the per-call timer that times a call out on the
real clock (see ``keel_pdp.budget.resp`` for the guarantees both keep).

Split from the client so each stays readable; the code is the client's hot
path and is kept as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import hiredis

from keel_pdp.budget.resp_pack import RespConnectionError, RespError, RespNotSent

if TYPE_CHECKING:
    from keel_pdp.budget.resp import RespClient

log = logging.getLogger("keel_pdp.budget.resp")

# A timer that fires while the socket holds unread data waits this long, at most
# this many times, for the event loop to read it.
_GRACE_S = 0.0002
_GRACE_TURNS = 3


class _Connection(asyncio.Protocol):
    """One socket: commands go out in order, replies resolve the FIFO in order."""

    def __init__(self, client: RespClient, slot: int) -> None:
        self._client = client
        self.slot = slot
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=RespError)
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: Any = None  # uvloop's transports do not subclass asyncio's
        self._fd = -1
        self.closed = False

    # ------------------------------------------------------------ protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def readable(self) -> bool:
        """Whether the socket holds data the event loop has not read yet."""
        if self._fd < 0 or self.closed:
            return False
        # poll, not select: select cannot watch a descriptor numbered 1024 or more,
        # which a busy sidecar (many client connections) reaches.
        poller = select.poll()
        try:
            poller.register(self._fd, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RespConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self._fail(RespConnectionError("reply without a request"))
                return
            fut = pending.popleft()[0]
            if fut.done():
                continue  # timed out or cancelled: its reply is dropped here
            if isinstance(reply, RespError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RespConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    # ------------------------------------------------------------- sending
    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise RespNotSent("connection to Redis is closed")
        if len(self.pending) >= self._client.config.max_pending:
            raise RespNotSent("too many calls waiting for Redis")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.pending.append((fut, time.monotonic()))
        # Written at once. Gathering the commands of a loop turn into one write
        # was measured: grpc.aio starts about one call per turn (1.1 commands per
        # write), so it saved no syscalls and only held commands back.
        try:
            self._transport.write(packed)
        except (OSError, RuntimeError) as exc:
            self._fail(RespConnectionError(f"cannot write to Redis: {exc}"))
        return fut

    def check_stall(self, stall_s: float) -> None:
        """Close the connection when its oldest call waited longer than ``stall_s``."""
        if self.pending and time.monotonic() - self.pending[0][1] > stall_s:
            log.warning("Redis did not answer for %.1fs: reconnecting", stall_s)
            self._fail(RespConnectionError(f"Redis did not answer for {stall_s:.1f}s"))

    def _fail(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        while self.pending:
            fut = self.pending.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()
        self._client._lost(self)

    def close(self) -> None:
        self._fail(RespConnectionError("client closed"))


def _expire(fut: asyncio.Future[Any], timeout: float, conn: _Connection, sent: float,
            turns: int = 0) -> None:
    if fut.done():
        return
    left = sent + timeout - time.monotonic()
    if left > 0:
        # libuv's timers count whole milliseconds and may fire a little early.
        fut.get_loop().call_later(left, _expire, fut, timeout, conn, sent, turns)
        return
    if turns < _GRACE_TURNS and conn.readable():
        # The answer may be in the socket already, behind a busy event loop: an
        # answer that arrived in time is not a timeout. Let the loop read it.
        fut.get_loop().call_later(_GRACE_S, _expire, fut, timeout, conn, sent, turns + 1)
        return
    fut.set_exception(TimeoutError(f"Redis did not answer within {timeout * 1000:.0f} ms"))


def _consume(fut: asyncio.Future[Any]) -> None:
    # Replies and failures nobody awaits (a SCRIPT LOAD ahead of its EVALSHA, a
    # background connect): read them so asyncio does not report them as lost.
    if not fut.cancelled():
        fut.exception()
