"""The client-SDK tests' stack: a real ``keel-pdp serve`` (a subprocess on the
session's redis-server) and the mock provider (an event loop on a thread of its
own), with a policy bundle of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis

from tests.conftest import RedisServer, free_port
from tests.helpers import wait_ready, write_bundle
from tools.mockprovider import MockProvider, Options


class ClientStack:
    """The sidecar and the mock provider, started together; ``stop`` ends both (also
    when the sidecar never became ready)."""

    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path,
                 budgets: list[dict[str, Any]], *, prices: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.redis_server = redis_server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.mock = MockProvider(Options())
        policies = write_bundle(workdir / "policies", budgets, prices=prices, settings=settings)
        self.port = free_port()
        env = {**os.environ, "KEEL_POLICIES": str(policies),
               "KEEL_REDIS_URL": redis_server.url, "KEEL_LISTEN": f"127.0.0.1:{self.port}",
               "KEEL_METRICS_PORT": "0", "KEEL_STORE_TIMEOUT": "1"}
        self.log = (workdir / "sidecar.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "keel_pdp.cli", "serve"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.thread.start()
        try:
            self.mock_port = asyncio.run_coroutine_threadsafe(
                self.mock.start("127.0.0.1", 0), self.loop).result(10)
            wait_ready(self.port)
        except BaseException:
            self.stop()  # a sidecar that never became ready is not left running
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def root(self) -> str:
        """The mock provider's base URL (Anthropic's SDK; OpenAI's adds ``/v1``)."""
        return f"http://127.0.0.1:{self.mock_port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()
        asyncio.run_coroutine_threadsafe(self.mock.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


S = TypeVar("S", bound=ClientStack)


@contextlib.contextmanager
def running(make: Callable[[RedisServer, pathlib.Path], S], redis_server: RedisServer,
            prefix: str) -> Iterator[S]:
    """``make(redis_server, workdir)`` in a temporary directory, stopped at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        s = make(redis_server, pathlib.Path(d))
        try:
            yield s
        finally:
            s.stop()


@contextlib.contextmanager
def redis_reader(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A decoding redis-py client on the session's server, for the tests' own reads."""
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        yield client
    finally:
        client.close()
