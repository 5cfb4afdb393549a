"""Shared fixtures: a real Redis server started once per test run, fakeredis for
fast unit tests, and a budget store / engine built on either."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio as aioredis

ROOT = pathlib.Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(n: int) -> int:
    """A loopback port p with p .. p + n - 1 all free (as far as can be told)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for i in range(1, n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no block of free loopback ports")


@dataclass
class RedisServer:
    """A real redis-server process on a free loopback port, restartable."""

    port: int
    workdir: pathlib.Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (make deps installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="keel-redis-") as d:
        server = RedisServer(free_port(), pathlib.Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the test run's real Redis, flushed before each test."""
    if redis_server.proc is None:
        redis_server.start()
    redis.Redis(port=redis_server.port).flushall()
    return redis_server.url


# Set on a client whose engine (tests.helpers.make_engine) must use the production
# pipelined RESP transport; the redis-py client stays for the test's own reads.
RESP_URL_ATTR = "keel_resp_url"


@pytest.fixture(params=["fakeredis", "redis", "resp"])
async def aio_client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """One test body over fakeredis, redis-py + a real Redis server, and the production
    RESP client + the same server (``make_engine`` builds the store with it)."""
    if request.param == "fakeredis":
        import fakeredis

        client: aioredis.Redis = fakeredis.FakeAsyncRedis()
    else:
        request.applymarker(pytest.mark.redis)
        url = request.getfixturevalue("redis_url")
        client = aioredis.Redis.from_url(url)
        if request.param == "resp":
            setattr(client, RESP_URL_ATTR, url)
    try:
        yield client
    finally:
        await client.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.nodeid.split("/")
        if "integration" in parts or "adversarial" in parts:
            item.add_marker(pytest.mark.integration)
        if "redis_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


os.environ.setdefault("KEEL_LOG_LEVEL", "WARNING")
