"""The benchmark harness keeps working: a tiny run of its moving parts.

No figure is asserted (benchmarks are never timed tests): only that the driver
builds, that every call of a short run succeeds, that Authorize and Closeout
each cost exactly one Redis round trip, and that pre-forked workers
(keel_pdp.workers, which the harness uses for --workers) share the port, are
restarted when they die while serving and stop cleanly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from bench.harness import (
    AUTHORIZE,
    CLOSEOUT,
    NOOP,
    Monitor,
    RedisServer,
    Sidecar,
    Workload,
    build_driver,
    closeout_bodies,
    closeout_statuses,
    cpu_seconds,
    decisions,
    drive,
    noop_body,
    write_bodies,
)

POLICIES = pathlib.Path(__file__).resolve().parents[2] / "bench" / "policies" / "generous"


@pytest.fixture(scope="module")
def driver() -> pathlib.Path:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build the load driver")
    return build_driver()


@pytest.fixture
def work() -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as d:
        yield pathlib.Path(d)


def test_authorize_and_closeout_run_and_cost_one_round_trip_each(
        driver: pathlib.Path, work: pathlib.Path) -> None:
    # A generous store timeout: a busy machine must not turn this into a timing test.
    with RedisServer(work / "redis") as server, \
            Sidecar(server.url, POLICIES, work, store_timeout_ms=2000) as sidecar:
        noop = drive(driver, sidecar.port, NOOP, noop_body(work / "noop.bin"), n=300,
                     cycle=True)
        assert noop["ok"] == 300
        bodies = work / "auth.bin"
        write_bodies(bodies, Workload().authorize("smoke", 0, 300))
        with Monitor(server.port) as mon:
            auth = drive(driver, sidecar.port, AUTHORIZE, bodies, out=work / "auth.out")
            mon.settle()
            auth_cmds = dict(mon.counts)
            mon.counts.clear()
            permits, counts = decisions(work / "auth.out")
            assert auth["ok"] == 300 and counts == {"ALLOW": 300} and len(permits) == 300
            closeout_bodies(work / "close.bin", permits)
            close = drive(driver, sidecar.port, CLOSEOUT, work / "close.bin",
                          out=work / "close.out")
            mon.settle()
            close_cmds = dict(mon.counts)
        assert close["ok"] == 300
        assert closeout_statuses(work / "close.out") == {"SETTLED": 300}
        for cmds in (auth_cmds, close_cmds):  # the expiry sweeper and its clock, once a second
            cmds.pop("zrangebyscore", None)
            cmds.pop("time", None)
        assert auth_cmds == {"evalsha": 300}
        assert close_cmds == {"evalsha": 300}


def test_two_workers_share_the_port_and_stop_on_sigterm(
        driver: pathlib.Path, work: pathlib.Path) -> None:
    with RedisServer(work / "redis") as server:
        sidecar = Sidecar(server.url, POLICIES, work, workers=2, store_timeout_ms=2000)
        sidecar.start()
        try:
            assert len(sidecar.worker_pids()) == 2
            before = {p: cpu_seconds(p) for p in sidecar.worker_pids()}
            res = drive(driver, sidecar.port, NOOP, noop_body(work / "noop.bin"), n=4000,
                        cycle=True, conns=8, streams=4)
            assert res["ok"] == 4000
            # With 8 connections the kernel gives both workers some (2^-7 odds otherwise).
            assert all(cpu_seconds(p) > before[p] for p in before)
            assert sidecar.proc is not None
            os.killpg(sidecar.proc.pid, signal.SIGTERM)
            assert sidecar.proc.wait(30) == 0
        finally:
            sidecar.stop()


SUPERVISED = """
import os, signal, sys, time
from keel_pdp.workers import run_workers

def serve(index):
    if os.environ.get("CRASH"):
        sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    line = f"worker {index} {os.getpid()} {os.environ['KEEL_WORKER_INDEX']}\\n"
    os.write(1, line.encode())  # one write: lines of two workers never interleave
    while True:
        time.sleep(0.05)

sys.exit(run_workers(2, serve, crash_window_s=0.3, restart_delay_s=0.05))
"""


def _supervisor(**env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SUPERVISED], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env},
                            cwd=pathlib.Path(__file__).resolve().parents[2])


def test_a_worker_that_dies_while_serving_is_restarted_and_sigterm_stops_all() -> None:
    proc = _supervisor()
    try:
        assert proc.stdout is not None
        first = dict(_worker(proc.stdout.readline()) for _ in range(2))
        assert sorted(first) == [0, 1]
        time.sleep(0.4)  # past the crash window: a death now is a crash, not a bad start
        os.kill(first[0], signal.SIGKILL)
        index, pid = _worker(proc.stdout.readline())
        assert index == 0 and pid != first[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_workers_that_die_at_start_stop_the_supervisor_with_their_status() -> None:
    proc = _supervisor(CRASH="1")
    assert proc.wait(10) == 3


def _worker(line: str) -> tuple[int, int]:
    _, index, pid, env_index = line.split()
    assert index == env_index  # KEEL_WORKER_INDEX is set in the child
    return int(index), int(pid)
