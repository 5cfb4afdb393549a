"""Bursts of concurrent calls through a real Envoy, with the documented 250 ms ext_authz timeout.

The deployment is docs/mesh.md's "Bursts": ``keel-pdp serve --workers <cores>
--worker-ports --store-timeout 0.1`` and Envoy (``--concurrency <cores>``)
balancing over the workers' own ports; real Redis, the mock provider. By
default 2 bursts of 50 calls (CI); ``KEEL_ENVOY_BURSTS=20x200`` runs the
issue's full size. What is asserted: no ext_authz timeout or error in Envoy's
counters, every call answered 200 (budget room) or 429 (the tenant without
budget), never 503, exactly as many 429s as calls billed to that tenant, every
Check decided by Keel, and no hold left open. A control run with the workers
stopped shows that the counters do see timeouts (each call then 503).

Also: ``--worker-ports`` puts each worker alone on its own port (worker i on
the --listen port + 1 + i), which is what lets Envoy spread calls evenly.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from bench.bench_envoy_burst import (
    DOCUMENTED,
    Plan,
    envoy_counters,
    fire,
    free_port_block,
    run_bursts,
    stack,
)
from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap
from tests.conftest import POLICIES
from tests.helpers import wait_serving
from tests.integration.test_envoy_config import validate

WORKERS = 2  # the tests' machines have 2 cores; the bench takes os.cpu_count()


def _plan() -> Plan:
    spec = os.environ.get("KEEL_ENVOY_BURSTS", "2x50")
    bursts, _, size = spec.partition("x")
    return Plan(bursts=int(bursts), size=int(size), pause_s=0.5, deny_every=4)


def test_bursts_through_envoy_end_in_200_or_429_never_an_ext_authz_timeout(
        tmp_path: pathlib.Path) -> None:
    plan = _plan()
    result = run_bursts(tmp_path, plan, DOCUMENTED, workers=WORKERS, concurrency=WORKERS,
                        report=False)
    denied_per_burst = len(range(0, plan.size, plan.deny_every))
    for b in result.bursts:
        where = f"burst {b.index}: statuses {b.statuses}, Envoy {b.counters}"
        assert b.timeouts == 0, where
        assert b.authz_errors == 0, where
        assert b.statuses == {200: plan.size - denied_per_burst, 429: denied_per_burst}, where
        assert sum(b.per_worker) == plan.size, where  # every Check reached Keel's handler
        assert len(b.authz_ms) == plan.size, where  # every call is in Envoy's access log
    assert result.held_after == 0  # every allowed call was closed out
    assert result.settled_after > 0


def test_the_counters_see_timeouts_when_the_sidecar_cannot_answer(
        tmp_path: pathlib.Path) -> None:
    # The control for the test above: with every worker stopped, each Check of a
    # burst runs into the 250 ms timeout, Envoy counts it and the client gets 503.
    with stack(tmp_path, WORKERS, WORKERS, worker_ports=True,
               serve_args=DOCUMENTED.serve_args) as st:
        loop = asyncio.new_event_loop()
        try:
            before = envoy_counters(st.admin)
            for pid in st.pids["keel"]:
                os.kill(pid, signal.SIGSTOP)
            try:
                statuses, _ms = loop.run_until_complete(fire(st.port, Plan(1, 10, 0, 4)))
            finally:
                for pid in st.pids["keel"]:
                    os.kill(pid, signal.SIGCONT)
            after = envoy_counters(st.admin)
        finally:
            loop.close()
    assert statuses == {503: 10}
    assert after.get("cluster.keel.upstream_rq_timeout", 0) - before.get(
        "cluster.keel.upstream_rq_timeout", 0) == 10
    assert after.get("http.llm_keel.ext_authz.error", 0) - before.get(
        "http.llm_keel.ext_authz.error", 0) == 10


# ------------------------------------------------------------ --worker-ports
def _noops(port: int, n: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DiagnosticsStub(channel)
        for _ in range(n):
            stub.Noop(pb.NoopRequest(), timeout=5)


def _noop_count(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("keel_pdp_rpc_duration_seconds_count{") and 'method="Noop"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.fixture
def two_workers(redis_url: str) -> Iterator[tuple[int, int]]:
    listen, metrics = free_port_block(WORKERS), free_port_block(WORKERS - 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(POLICIES),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{listen}", "--workers",
         str(WORKERS), "--worker-ports", "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        # A thread reads the output to its end (never blocking the test past its
        # deadline, never leaving the pipe to fill up).
        lines: queue.Queue[str] = queue.Queue()
        out = proc.stdout

        def pump() -> None:
            for x in out:
                lines.put(x)

        threading.Thread(target=pump, daemon=True).start()
        alone: list[str] = []
        deadline = time.monotonic() + 60
        while len(alone) < WORKERS and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            # Two workers' lines may share one (each line is one write only since
            # keel_pdp.cli._say): count every report in it.
            alone += re.findall(r"worker \d+ also alone on [\d.:]+", line)
        assert len(alone) == WORKERS, f"workers did not report their own ports: {alone}"
        for i in range(WORKERS):
            wait_serving(grpc.insecure_channel(f"127.0.0.1:{listen + 1 + i}"))
        yield listen, metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_each_worker_serves_alone_on_its_own_port(two_workers: tuple[int, int]) -> None:
    listen, metrics = two_workers
    base = [_noop_count(metrics + i) for i in range(WORKERS)]
    calls = {0: 3, 1: 7}
    for i, n in calls.items():
        _noops(listen + 1 + i, n)
    # Worker i's metrics (on --metrics-port + i) counted exactly the calls sent to
    # its own port, on any connection: no call reached another worker.
    assert [_noop_count(metrics + i) - base[i] for i in range(WORKERS)] == [3, 7]
    _noops(listen, 4)  # the shared port keeps serving (probes, SDK callers)
    assert sum(_noop_count(metrics + i) for i in range(WORKERS)) - sum(base) == 14


def test_the_bootstrap_balancing_over_worker_ports_passes_envoy_validate(
        tmp_path: pathlib.Path) -> None:
    validate(bootstrap(EnvoySetup(listen_port=10000, keel=("127.0.0.1", 50051),
                                  upstream=("127.0.0.1", 8081), keel_workers=4)), tmp_path)

