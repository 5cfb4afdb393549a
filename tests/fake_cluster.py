"""Fake Redis Cluster nodes: small RESP servers on 127.0.0.1 that answer a
scripted slot map and whatever a test's handler says, record every command they
read, and count the client connections they hold open. The hostile-node tests
and the unit tests of the cluster client's node table run on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis

from keel_pdp.budget.cluster import ClusterClient, ClusterConfig
from keel_pdp.budget.redis_url import RespConfig

# Replies a handler may give besides bytes: drop the connection, or say nothing.
DROP, SILENT = "drop", "silent"
# Commands a fake node answers itself, never through its handler.
_OWN = (b"PING", b"ASKING", b"SCRIPT", b"CLUSTER")


def resp(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    raise TypeError(value)


def error(message: str) -> bytes:
    return b"-" + message.encode() + b"\r\n"


Handler = Callable[["FakeNode", list[bytes]], "bytes | str | None"]


class FakeNode:
    """A RESP server on 127.0.0.1 that records every command it reads. PING,
    SCRIPT LOAD and ASKING are answered as Redis does; CLUSTER SLOTS with
    ``slots``; anything else by ``handler`` (None: the generic answer ``:1``).
    While ``hold`` is an event that is not set, the handler's answers wait for
    it (the command is read and recorded at once: a call in flight)."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.slots: Any = None
        self.seen: list[list[bytes]] = []
        self.port = 0
        self.clients = 0  # client connections open now
        self.hold: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.drop_after_write = False

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def own_all(self) -> FakeNode:
        self.slots = [[0, 16383, ["127.0.0.1", self.port, "id-" + str(self.port)]]]
        return self

    def count(self, name: bytes) -> int:
        return sum(1 for c in self.seen if c[0].upper() == name)

    def scripts_run(self) -> list[list[bytes]]:
        return [c for c in self.seen if c[0].upper() == b"EVALSHA"]

    async def start(self) -> FakeNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._writers.clear()

    def _answer(self, cmd: list[bytes]) -> bytes | str | None:
        name = cmd[0].upper()
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"ASKING":
            return b"+OK\r\n"
        if name == b"SCRIPT":
            return resp("0" * 40)
        if name == b"CLUSTER":
            return resp(self.slots) if self.slots is not None else error("ERR no map")
        if self.handler is not None:
            return self.handler(self, cmd)
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.clients += 1
        parser = hiredis.Reader()
        try:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    parser.feed(data)
                    while (cmd := parser.gets()) is not False:
                        self.seen.append(cmd)
                        if self.hold is not None and cmd[0].upper() not in _OWN:
                            await self.hold.wait()
                        out = self._answer(cmd)
                        if out == DROP:
                            writer.transport.abort()
                            return
                        if out == SILENT:
                            continue
                        writer.write(out if isinstance(out, bytes) else resp(1))
                        if self.drop_after_write:
                            self.drop_after_write = False
                            await writer.drain()
                            writer.transport.abort()
                            return
        finally:
            self.clients -= 1


@contextlib.asynccontextmanager
async def nodes(*handlers: Handler | None) -> AsyncIterator[list[FakeNode]]:
    started = [await FakeNode(h).start() for h in handlers]
    try:
        yield started
    finally:
        for n in started:
            await n.stop()


def cluster(*seeds: tuple[str, int], **settings: Any) -> ClusterClient:
    node = RespConfig(connect_timeout_s=settings.pop("connect_timeout_s", 0.2))
    return ClusterClient(ClusterConfig(tuple(seeds), node, **settings))
