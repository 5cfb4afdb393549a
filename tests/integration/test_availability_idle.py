"""Idle half-open streams against a real ``keel-pdp serve`` process and real Redis.

A hostile or hung client opens gRPC streams (HTTP/2 HEADERS) and never sends the
request message, with no deadline. Real callers and health checks must keep
being answered, and the idle streams must be ended by the sidecar on its own.

The idle client is a raw HTTP/2 client written here (frames and a literal-only
HPACK block, RFC 7540/7541): no gRPC client library could be made to send
headers and then nothing, and this one is what the sidecar sees from a broken
peer. Everything is on loopback and bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.helpers import budget, wait_ready, write_bundle

AUTHORIZE = "/keel.pdp.v1.PolicyDecisionPoint/Authorize"
HEALTH = "/grpc.health.v1.Health/Check"

# HTTP/2 frame types and flags (RFC 7540 section 6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
# RST_STREAM codes for a stream over the peer's limit: REFUSED_STREAM, or
# ENHANCE_YOUR_CALM (what grpc core sends).
REFUSED = frozenset({0x7, 0xB})
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([ftype, flags])
            + (stream & 0x7FFF_FFFF).to_bytes(4, "big") + payload)


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_block(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman (RFC 7541 6.2.2)."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


def grpc_message(payload: bytes) -> bytes:
    """The gRPC length-prefixed message framing (uncompressed)."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass
class RawH2:
    """One HTTP/2 connection that opens gRPC streams and sends what it is told to."""

    host: str
    port: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1, 2))
    opened: list[int] = field(default_factory=list)
    ended: dict[int, float] = field(default_factory=dict)  # stream -> when it ended
    resets: dict[int, int] = field(default_factory=dict)  # stream -> RST_STREAM error code
    goaway: bool = False
    eof: bool = False  # the server closed the connection
    received: dict[int, bytearray] = field(default_factory=dict)  # DATA by stream
    _task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(PREFACE + h2_frame(SETTINGS, 0, 0))
        await self.writer.drain()
        self._task = asyncio.get_running_loop().create_task(self._read())

    def open_stream(self, path: str, *, end_headers: bool = True) -> int:
        assert self.writer is not None
        sid = next(self.ids)
        block = hpack_block([(":method", "POST"), (":scheme", "http"), (":path", path),
                             (":authority", f"{self.host}:{self.port}"),
                             ("content-type", "application/grpc"), ("te", "trailers")])
        self.writer.write(h2_frame(HEADERS, END_HEADERS if end_headers else 0, sid, block))
        self.opened.append(sid)
        return sid

    def send(self, sid: int, payload: bytes, *, end: bool = True) -> None:
        assert self.writer is not None
        self.writer.write(h2_frame(DATA, END_STREAM if end else 0, sid, payload))

    async def flush(self) -> None:
        assert self.writer is not None
        await self.writer.drain()

    @property
    def refused(self) -> set[int]:
        """Streams the server refused outright, over its per-connection limit."""
        return {s for s, code in self.resets.items() if code in REFUSED}

    @property
    def still_open(self) -> int:
        return sum(1 for s in self.opened if s not in self.ended)

    async def _read(self) -> None:
        assert self.reader is not None and self.writer is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await self.reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
                payload = await self.reader.readexactly(length) if length else b""
                if ftype == SETTINGS and not flags & ACK:
                    self.writer.write(h2_frame(SETTINGS, ACK, 0))
                elif ftype == PING and not flags & ACK:
                    self.writer.write(h2_frame(PING, ACK, 0, payload))
                elif ftype == RST_STREAM:
                    self.resets[sid] = int.from_bytes(payload[:4], "big")
                    self.ended.setdefault(sid, time.monotonic())
                if ftype == DATA:
                    self.received.setdefault(sid, bytearray()).extend(payload)
                if ftype in (HEADERS, DATA) and flags & END_STREAM:
                    self.ended.setdefault(sid, time.monotonic())
                elif ftype == GOAWAY:
                    self.goaway = True
        self.eof = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


@dataclass
class Sidecar:
    port: int
    metrics_port: int
    proc: subprocess.Popen[str]

    def metric(self, name: str) -> float:
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def sidecar(redis_url: str, tmp_path: pathlib.Path, *args: str) -> Iterator[Sidecar]:
    bundle = write_bundle(tmp_path / "bundle", [budget("org", "1000", fail_mode="closed")])
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}",
         "--metrics-port", str(mport), "--store-timeout", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(port)
        yield Sidecar(port, mport, proc)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


async def open_idle(port: int, streams: int, per_connection: int,
                    path: str = AUTHORIZE) -> list[RawH2]:
    conns = []
    for start in range(0, streams, per_connection):
        c = RawH2("127.0.0.1", port)
        await c.connect()
        for _ in range(min(per_connection, streams - start)):
            c.open_stream(path)
        await c.flush()
        conns.append(c)
    return conns


async def real_calls(port: int, n: int, tag: str) -> list[str]:
    """n Authorize calls and n health checks, each with a deadline; their status names."""
    out: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.PolicyDecisionPointStub(ch)
        health = health_pb2_grpc.HealthStub(ch)

        async def authorize(i: int) -> str:
            try:
                r = await stub.Authorize(pb.AuthorizeRequest(
                    request_id=f"{tag}-{i}", tenant="acme", workload="chat",
                    model="gpt-4o-mini", estimated_input_tokens=100, max_output_tokens=50),
                    timeout=5)
                return pb.Decision.Name(r.decision)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        async def check() -> str:
            try:
                r = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        out += await asyncio.gather(*(authorize(i) for i in range(n)))
        out += await asyncio.gather(*(check() for _ in range(n)))
    return out


async def wait_for(cond: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_300_idle_streams_do_not_starve_authorize_or_health_with_limit_64(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    with sidecar(redis_url, tmp_path, "--max-concurrent-rpcs", "64") as sc:
        conns = await open_idle(sc.port, 300, per_connection=100)
        try:
            # The sidecar has seen the streams (and ended the oldest beyond its idle cap).
            seen = await wait_for(lambda: sc.metric("keel_pdp_idle_streams") >= 200, 5)
            results = await real_calls(sc.port, 40, "idle64")
            assert results == ["ALLOW"] * 40 + ["SERVING"] * 40, results
            assert seen
            # The idle streams are ended by the sidecar itself (first-message timeout
            # of 2 s, checked every 0.1 s), not left for a deadline they never set.
            assert await wait_for(lambda: all(c.still_open == 0 for c in conns), 8), \
                [c.still_open for c in conns]
            assert sc.metric("keel_pdp_idle_streams") == 0
            closed = sc.metric("keel_pdp_idle_streams_closed_total")
            assert closed == 300
            # At most 4 x 64 = 256 wait at once: the oldest 44 (and one more for each
            # real call that arrived while 256 waited) were ended to make room.
            evicted = sc.metric('keel_pdp_idle_streams_closed_total{reason="evicted"}')
            assert 44 <= evicted <= 44 + 80, evicted
        finally:
            for c in conns:
                await c.close()
        # The connections themselves stay usable: a message sent now is served.
        results = await real_calls(sc.port, 5, "after")
        assert results == ["ALLOW"] * 5 + ["SERVING"] * 5


async def test_1100_idle_streams_do_not_starve_callers_at_the_default_limit(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    with sidecar(redis_url, tmp_path) as sc:
        conns = await open_idle(sc.port, 1100, per_connection=275)
        try:
            seen = await wait_for(lambda: sc.metric("keel_pdp_idle_streams") >= 1000, 5)
            results = await real_calls(sc.port, 30, "idle1024")
            assert results == ["ALLOW"] * 30 + ["SERVING"] * 30, results
            assert seen
        finally:
            for c in conns:
                await c.close()


async def test_one_connection_cannot_hold_more_idle_streams_than_its_stream_limit(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """--max-concurrent-rpcs 64: one connection may open 128 streams; the rest of
    its 300 are refused by HTTP/2 itself (RST_STREAM at once, before any first-message
    timeout), the sidecar never sees them."""
    with sidecar(redis_url, tmp_path, "--max-concurrent-rpcs", "64") as sc:
        (conn,) = await open_idle(sc.port, 300, per_connection=300)
        try:
            assert await wait_for(lambda: len(conn.refused) == 300 - 128, 1.5), conn.resets
            assert sc.metric("keel_pdp_idle_streams") <= 128
            results = await real_calls(sc.port, 20, "oneconn")
            assert results == ["ALLOW"] * 20 + ["SERVING"] * 20, results
        finally:
            await conn.close()


@pytest.mark.parametrize("path", [AUTHORIZE, HEALTH])
async def test_a_request_that_follows_its_headers_late_but_in_time_is_served(
        redis_url: str, tmp_path: pathlib.Path, path: str) -> None:
    """The first-message timeout measures headers -> message; 0.5 s late is fine."""
    with sidecar(redis_url, tmp_path, "--max-concurrent-rpcs", "64") as sc:
        c = RawH2("127.0.0.1", sc.port)
        await c.connect()
        try:
            sid = c.open_stream(path)
            await c.flush()
            await asyncio.sleep(0.5)
            body = (pb.AuthorizeRequest(request_id="late", tenant="acme", workload="chat",
                                        model="gpt-4o-mini").SerializeToString()
                    if path == AUTHORIZE else b"")
            c.send(sid, grpc_message(body))
            await c.flush()
            assert await wait_for(lambda: sid in c.ended, 5)
            assert sid not in c.refused
            assert sc.metric("keel_pdp_idle_streams_closed_total") == 0
        finally:
            await c.close()


async def test_first_message_timeout_is_configurable(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    with sidecar(redis_url, tmp_path, "--first-message-timeout", "0.3") as sc:
        (conn,) = await open_idle(sc.port, 20, per_connection=20)
        try:
            t0 = time.monotonic()
            assert await wait_for(lambda: conn.still_open == 0, 5)
            assert time.monotonic() - t0 < 1.5  # not the default 2 s
            assert sc.metric("keel_pdp_idle_streams_closed_total") == 20
        finally:
            await conn.close()


def test_a_first_message_timeout_out_of_range_is_refused(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(tmp_path),
         "--first-message-timeout", "0"], capture_output=True, text=True, timeout=60,
        check=False)
    assert proc.returncode == 2
    assert "--first-message-timeout must be between" in proc.stderr
