"""Hostile-caller kit: real `keel-pdp serve` processes over the test run's real Redis."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import redis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.service import Service
from tests.conftest import free_port
from tests.helpers import BUSY_LUA, wait_ready


@dataclass
class Sidecar:
    redis_url: str
    bundle: pathlib.Path
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Sidecar:
        env = {**os.environ, "KEEL_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(self.bundle),
             "--redis-url", self.redis_url, "--listen", f"127.0.0.1:{self.port}",
             "--metrics-port", str(self.metrics_port), "--sweep-interval", "0.2",
             "--drain-delay", "0.1", *self.args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        try:
            wait_ready(self.port)
        except BaseException:
            self.kill()  # a sidecar that never became ready must not outlive the test
            raise
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self) -> tuple[grpc.Channel, pb_grpc.PolicyDecisionPointStub]:
        ch = grpc.insecure_channel(self.target)
        return ch, pb_grpc.PolicyDecisionPointStub(ch)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    """Sidecars a test starts (append them); all stopped at the end."""
    started: list[Sidecar] = []
    try:
        yield started
    finally:
        for s in started:
            s.kill()


def keep_busy(redis_url: str, ms: int) -> threading.Thread:
    """Redis busy for ``ms`` in a background thread (started, not joined)."""
    def run() -> None:
        client = redis.Redis.from_url(redis_url, socket_timeout=30)
        try:
            client.eval(BUSY_LUA, 0, ms)
        finally:
            client.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def areq(rid: str, *, tenant: str = "acme", inp: int = 1000, out: int = 100,
         model: str = "gpt-4o-mini") -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, tenant=tenant, workload="chat", model=model,
                               provider="openai", estimated_input_tokens=inp,
                               max_output_tokens=out)


def usage(inp: int = 1000, out: int = 100) -> pb.Usage:
    return pb.Usage(input_tokens=inp, output_tokens=out)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts (append them): each killed, its whole process group, at
    the end."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for s in started:
            s.kill()
