"""The pipelined RESP client against a scripted in-process server.

The fake server answers in order like Redis, but each test decides what it
answers and when (late, never, garbage, hang up), which a real Redis cannot be
made to do on cue.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hiredis
import pytest
import uvloop

from keel_pdp.budget.resp import (
    RespClient,
    RespConfig,
    RespConnectionError,
    RespError,
    Script,
    _expire,
    parse_url,
)

Handler = Callable[[list[bytes]], Awaitable[bytes | None]]


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """Reads RESP commands; ``handler`` returns the raw reply, or None to never answer."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler or self.default
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def default(self, cmd: list[bytes]) -> bytes | None:
        name = cmd[0].upper()
        if name == b"ECHO":
            return bulk(cmd[1])
        if name in (b"PING",):
            return b"+PONG\r\n"
        if name in (b"AUTH", b"SELECT"):
            return b"+OK\r\n"
        if name == b"SCRIPT":
            return bulk(hashlib.sha1(cmd[2]).hexdigest().encode())
        if name == b"EVALSHA":
            return b":1\r\n"
        return b"-ERR unknown command\r\n"

    async def start(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        answers: asyncio.Queue[Awaitable[bytes | None] | None] = asyncio.Queue()

        async def respond() -> None:
            # Answers leave in request order, even when one of them is slow.
            while (item := await answers.get()) is not None:
                reply = await item
                if reply is None:
                    await asyncio.Event().wait()  # never answers again
                    return
                writer.write(reply)
                await writer.drain()

        sender = asyncio.create_task(respond())
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (cmd := parser.gets()) is not False:
                    self.commands.append(cmd)
                    answers.put_nowait(asyncio.ensure_future(self.handler(cmd)))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            writer.close()

    def hang_up(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.hang_up()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def names(self) -> list[str]:
        return [c[0].decode().upper() for c in self.commands]


@pytest.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    server = await FakeRedis().start()
    try:
        yield server
    finally:
        await server.stop()


def client_for(server: FakeRedis, **kw: Any) -> RespClient:
    return RespClient(RespConfig(host="127.0.0.1", port=server.port, **kw))


# ------------------------------------------------------------------------ URLs
def test_url_gives_host_port_db_and_credentials() -> None:
    cfg = parse_url("redis://alice:p%40ss@redis.example:6380/4")
    assert (cfg.host, cfg.port, cfg.db) == ("redis.example", 6380, 4)
    assert (cfg.username, cfg.password) == ("alice", "p@ss")
    assert cfg.ssl_context is None


def test_url_with_password_only_and_defaults() -> None:
    cfg = parse_url("redis://:secret@10.0.0.1")
    assert (cfg.host, cfg.port, cfg.db, cfg.username, cfg.password) == (
        "10.0.0.1", 6379, 0, None, "secret")


def test_unix_url_takes_db_and_password_from_the_query() -> None:
    cfg = parse_url("unix:///run/redis.sock?db=3&password=pw")
    assert (cfg.unix_path, cfg.db, cfg.password) == ("/run/redis.sock", 3, "pw")


def test_rediss_url_builds_a_verifying_tls_context_unless_told_not_to() -> None:
    strict = parse_url("rediss://cache.internal:6380/0")
    assert strict.ssl_context is not None
    assert strict.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert strict.server_hostname == "cache.internal"
    lax = parse_url("rediss://cache.internal/0?ssl_cert_reqs=none")
    assert lax.ssl_context is not None
    assert lax.ssl_context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("url", ["http://h/0", "redis://h/notanumber"])
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|database"):
        parse_url(url)


def test_script_is_known_by_its_sha1() -> None:
    src = "return 1"
    assert Script.from_source(src).sha == hashlib.sha1(src.encode()).hexdigest()


# ------------------------------------------------------------------ pipelining
async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
        fake: FakeRedis) -> None:
    client = client_for(fake)
    try:
        values = [f"v{i}".encode() for i in range(300)]
        got = await asyncio.gather(*(client.command("ECHO", v, timeout_s=2) for v in values))
        assert got == values
        assert fake.connections == 1
    finally:
        await client.close()


async def test_an_error_reply_raises_and_leaves_the_connection_usable(fake: FakeRedis) -> None:
    client = client_for(fake)
    try:
        with pytest.raises(RespError, match="unknown command"):
            await client.command("NOPE", timeout_s=2)
        assert await client.command("ECHO", "after", timeout_s=2) == b"after"
        assert fake.connections == 1
    finally:
        await client.close()


# -------------------------------------------------------------------- timeouts
async def test_a_late_reply_is_dropped_and_the_next_call_gets_its_own() -> None:
    async def slow_first(cmd: list[bytes]) -> bytes | None:
        if cmd[0] != b"ECHO":
            return await FakeRedis.default(server, cmd)
        if cmd[1] == b"slow":
            await asyncio.sleep(0.2)
        return bulk(cmd[1])

    server = await FakeRedis(slow_first).start()
    client = client_for(server)
    try:
        with pytest.raises(TimeoutError):
            await client.command("ECHO", "slow", timeout_s=0.03)
        # Sent while the slow reply is still owed: must not receive it.
        assert await client.command("ECHO", "next", timeout_s=2) == b"next"
        assert await client.command("ECHO", "again", timeout_s=2) == b"again"
        assert server.connections == 1
    finally:
        await client.close()
        await server.stop()


async def test_a_cancelled_call_does_not_shift_the_replies(fake: FakeRedis) -> None:
    async def slow(cmd: list[bytes]) -> bytes | None:
        if cmd[0] != b"ECHO":
            return await FakeRedis.default(fake, cmd)
        await asyncio.sleep(0.05)
        return bulk(cmd[1])

    fake.handler = slow
    client = client_for(fake)
    try:
        task = asyncio.ensure_future(client.command("ECHO", "cancelled", timeout_s=2))
        await asyncio.sleep(0.01)
        task.cancel()
        assert await client.command("ECHO", "kept", timeout_s=2) == b"kept"
    finally:
        await client.close()


async def test_a_server_that_stops_answering_is_dropped_and_the_client_reconnects() -> None:
    hang = True

    async def maybe_hang(cmd: list[bytes]) -> bytes | None:
        if cmd[0].upper() == b"ECHO" and hang:
            return None
        return await FakeRedis.default(server, cmd)

    server = await FakeRedis(maybe_hang).start()
    client = client_for(server, stall_s=0.15)
    try:
        with pytest.raises(TimeoutError):
            await client.command("ECHO", "lost", timeout_s=0.05)
        await asyncio.sleep(0.15)
        with pytest.raises(TimeoutError):
            await client.command("ECHO", "lost too", timeout_s=0.05)
        assert not client.connected  # the stalled connection was closed
        hang = False
        assert await client.command("ECHO", "fresh", timeout_s=2) == b"fresh"
        assert server.connections == 2
    finally:
        await client.close()
        await server.stop()


# ------------------------------------------------------------------ connection
async def test_connection_loss_fails_pending_calls_and_the_next_call_reconnects() -> None:
    async def never(cmd: list[bytes]) -> bytes | None:
        if cmd[0] != b"ECHO":
            return await FakeRedis.default(server, cmd)
        if cmd[1] == b"pending":
            return None
        return bulk(cmd[1])

    server = await FakeRedis(never).start()
    client = client_for(server)
    try:
        assert await client.command("ECHO", "one", timeout_s=2) == b"one"
        pending = asyncio.ensure_future(client.command("ECHO", "pending", timeout_s=5))
        await asyncio.sleep(0.05)
        server.hang_up()
        with pytest.raises(RespConnectionError):
            await pending
        assert await client.command("ECHO", "two", timeout_s=2) == b"two"
        assert server.connections == 2
    finally:
        await client.close()
        await server.stop()


async def test_garbage_from_the_server_closes_the_connection(fake: FakeRedis) -> None:
    async def garbage(cmd: list[bytes]) -> bytes | None:
        if cmd[0] != b"ECHO":
            return await FakeRedis.default(fake, cmd)
        return b"?what\r\n" if cmd[1] == b"bad" else bulk(cmd[1])

    fake.handler = garbage
    client = client_for(fake)
    try:
        with pytest.raises(RespConnectionError, match="protocol"):
            await client.command("ECHO", "bad", timeout_s=2)
        assert await client.command("ECHO", "good", timeout_s=2) == b"good"
    finally:
        await client.close()


async def test_unreachable_redis_fails_fast_and_backs_off() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RespClient(RespConfig(port=port, backoff_base_s=0.4, backoff_max_s=0.4))
    try:
        with pytest.raises(RespConnectionError, match="cannot connect"):
            await client.command("PING", timeout_s=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RespConnectionError, match="next connect attempt"):
            await client.command("PING", timeout_s=1)
        assert loop.time() - t0 < 0.15  # no connect attempt during the back-off
        await asyncio.sleep(0.45)
        with pytest.raises(RespConnectionError, match="cannot connect"):
            await client.command("PING", timeout_s=1)
    finally:
        await client.close()


async def test_a_slow_connect_costs_a_call_no_more_than_its_timeout() -> None:
    async def slow_handshake(cmd: list[bytes]) -> bytes | None:
        await asyncio.sleep(0.5)
        return b"+PONG\r\n"

    server = await FakeRedis(slow_handshake).start()
    client = client_for(server)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await client.command("PING", timeout_s=0.05)
        assert loop.time() - t0 < 0.4
    finally:
        await client.close()
        await server.stop()


async def test_handshake_sends_auth_and_select_before_anything_else(fake: FakeRedis) -> None:
    client = client_for(fake, username="app", password="pw", db=5)
    try:
        await client.command("ECHO", "x", timeout_s=2)
        assert fake.commands[:2] == [[b"AUTH", b"app", b"pw"], [b"SELECT", b"5"]]
        assert fake.commands[-1] == [b"ECHO", b"x"]
    finally:
        await client.close()


async def test_a_refused_password_is_a_connection_failure(fake: FakeRedis) -> None:
    async def refuse(cmd: list[bytes]) -> bytes | None:
        if cmd[0].upper() == b"AUTH":
            return b"-WRONGPASS invalid username-password pair\r\n"
        return await FakeRedis.default(fake, cmd)

    fake.handler = refuse
    client = client_for(fake, password="bad")
    try:
        with pytest.raises(RespConnectionError, match="WRONGPASS"):
            await client.command("PING", timeout_s=2)
        assert not client.connected
    finally:
        await client.close()


# --------------------------------------------------------------------- scripts
async def test_noscript_loads_the_script_and_runs_it_again_pipelined(fake: FakeRedis) -> None:
    loaded: set[bytes] = set()

    async def scripts(cmd: list[bytes]) -> bytes | None:
        name = cmd[0].upper()
        if name == b"SCRIPT":
            sha = hashlib.sha1(cmd[2]).hexdigest().encode()
            loaded.add(sha)
            return bulk(sha)
        if name == b"EVALSHA":
            return b":7\r\n" if cmd[1] in loaded else b"-NOSCRIPT No matching script.\r\n"
        return await FakeRedis.default(fake, cmd)

    fake.handler = scripts
    client = client_for(fake)
    try:
        await client.command("PING", timeout_s=2)
        script = client.script("return 7")  # registered after connecting: not loaded yet
        assert await client.eval_script(script, ["k"], ["a"], timeout_s=2) == 7
        assert fake.names()[-3:] == ["EVALSHA", "SCRIPT", "EVALSHA"]
        assert await client.eval_script(script, ["k"], ["a"], timeout_s=2) == 7
        assert fake.names()[-1] == "EVALSHA"
        assert fake.names().count("SCRIPT") == 1
    finally:
        await client.close()


async def test_registered_scripts_are_loaded_on_connect(fake: FakeRedis) -> None:
    client = client_for(fake)
    client.script("return 1")
    try:
        await client.command("ECHO", "x", timeout_s=2)
        assert fake.names() == ["SCRIPT", "ECHO"]
    finally:
        await client.close()


async def test_a_second_connection_slot_is_used_when_configured(fake: FakeRedis) -> None:
    client = client_for(fake, connections=2)
    try:
        for i in range(4):
            assert await client.command("ECHO", str(i), timeout_s=2) == str(i).encode()
            await asyncio.sleep(0.01)  # the second connection comes up in the background
        got = await asyncio.gather(*(client.command("ECHO", str(i), timeout_s=2)
                                     for i in range(10)))
        assert got == [str(i).encode() for i in range(10)]
        assert fake.connections == 2
    finally:
        await client.close()


async def test_too_many_waiting_calls_fail_at_once(fake: FakeRedis) -> None:
    async def never(cmd: list[bytes]) -> bytes | None:
        return None if cmd[0] == b"ECHO" else await FakeRedis.default(fake, cmd)

    fake.handler = never
    client = client_for(fake, max_pending=2)
    try:
        await client.command("PING", timeout_s=2)
        waiting = [asyncio.ensure_future(client.command("ECHO", "x", timeout_s=0.2))
                   for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(RespConnectionError, match="too many"):
            await client.command("ECHO", "x", timeout_s=0.2)
        for w in waiting:
            with pytest.raises(TimeoutError):
                await w
    finally:
        await client.close()


def test_the_client_works_on_uvloop() -> None:
    async def main() -> list[Any]:
        server = await FakeRedis().start()
        client = client_for(server)
        try:
            return list(await asyncio.gather(
                *(client.command("ECHO", str(i), timeout_s=2) for i in range(20))))
        finally:
            await client.close()
            await server.stop()

    assert uvloop.run(main()) == [str(i).encode() for i in range(20)]



class _Socket:
    def __init__(self, readable: bool) -> None:
        self.answer_waiting = readable

    def readable(self) -> bool:
        return self.answer_waiting


async def test_a_timer_that_fires_early_waits_for_the_real_deadline() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    conn: Any = _Socket(readable=False)
    _expire(fut, 0.05, conn, time.monotonic())  # fired 50 ms before the deadline
    assert not fut.done()
    with pytest.raises(TimeoutError):
        await fut  # rescheduled: fails at the real deadline


async def test_an_answer_waiting_in_the_socket_is_not_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    conn: Any = _Socket(readable=True)
    _expire(fut, 0.01, conn, time.monotonic() - 1)  # deadline long past, answer waiting
    assert not fut.done()
    fut.set_result(b"read in the next turn")  # what data_received does
    await asyncio.sleep(0.002)  # the grace timers find the future done
    assert fut.result() == b"read in the next turn"
    stuck: asyncio.Future[Any] = loop.create_future()
    _expire(stuck, 0.01, conn, time.monotonic() - 1)  # readable, but nothing ever comes
    with pytest.raises(TimeoutError):
        await stuck  # the grace is bounded


def test_a_shared_middle_is_sent_as_if_every_argument_were_packed_each_time() -> None:
    from keel_pdp.budget.resp import Shared, pack_evalsha

    def pack(*args: object) -> bytes:  # hiredis' stub types a 1-tuple
        packed: bytes = getattr(hiredis, "pack_command")(args)  # noqa: B009
        return packed

    shared = Shared.of(["k:{pdp}:w1", "k:{pdp}:g1"], [1, 5_000, "80,100", "é"])
    sha = "a" * 40
    got = pack_evalsha(sha, ["k:{pdp}:i", "k:{pdp}:p"], ["pid", 7, "{\"x\":1}"], shared)
    want = pack("EVALSHA", sha, 4, "k:{pdp}:i", "k:{pdp}:p", "k:{pdp}:w1", "k:{pdp}:g1", 1,
                5_000, "80,100", "é", "pid", 7, "{\"x\":1}")
    assert got == want
    assert pack_evalsha(sha, ["k"], [1]) == pack("EVALSHA", sha, 1, "k", 1)
    # No request-owned keys or arguments at all: still a well-formed command.
    assert pack_evalsha(sha, [], [], shared) == pack(
        "EVALSHA", sha, 2, "k:{pdp}:w1", "k:{pdp}:g1", 1, 5_000, "80,100", "é")
