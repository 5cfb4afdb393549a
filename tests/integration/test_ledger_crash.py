"""Crash and outage tests: the writer is a real subprocess, killed with SIGKILL in
the middle of its work, and the store or Redis is stopped under it."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from keel_pdp.ledger.store import LedgerStore, StoreUnavailable
from tests.conftest import ROOT, RedisServer, free_port
from tests.helpers import make_engine
from tests.integration.conftest import (
    PREFIX,
    STREAM,
    assert_ledger_matches_stream,
    ledger_bundle,
    traffic,
)
from tests.integration.pg_fixture import PostgresServer


def start_writer(redis_url: str, store_url: str, consumer: str, log: pathlib.Path,
                 *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "keel_pdp.cli", "ledger", "--redis-url", redis_url,
           "--store", store_url, "--key-prefix", PREFIX, "--consumer", consumer,
           "--block-ms", "50", "--no-trim", "--log-level", "INFO", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stored(store_url: str) -> int:
    s = LedgerStore(store_url)
    try:
        return int(s.query("SELECT COUNT(*) FROM ledger_events")[0][0])
    except StoreUnavailable:
        return -1
    except Exception:
        return 0  # not migrated yet
    finally:
        s.close()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        return str(resp.read().decode())


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(15)


@pytest.fixture
async def engine(redis_url: str, tmp_path: pathlib.Path) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield make_engine(client, ledger_bundle(tmp_path / "bundle"))
    finally:
        await client.aclose()


async def test_sigkill_mid_batch_then_restart_loses_and_doubles_nothing(
        engine: Any, store_url: str, redis_url: str, tmp_path: pathlib.Path) -> None:
    await traffic(engine, 500, "k1")
    client = redis.Redis.from_url(redis_url)
    total = client.xlen(STREAM)
    log = tmp_path / "writer.log"
    # Small batches so a kill lands between two of them or inside one.
    w = start_writer(redis_url, store_url, "w1", log, "--batch-size", "10")
    wait_for(lambda: stored(store_url) >= total // 4, 30, "a quarter of the events")
    w.kill()
    w.wait(10)
    first = stored(store_url)
    assert 0 < first < total, "the kill must land in the middle of the run"
    # Traffic goes on while no writer runs.
    await traffic(engine, 100, "k2")
    # The restarted writer has a new name: it must claim what w1 left pending.
    w = start_writer(redis_url, store_url, "w2", log, "--batch-size", "10",
                     "--claim-idle-ms", "100", "--claim-interval-s", "0.1")
    total = client.xlen(STREAM)
    wait_for(lambda: stored(store_url) >= total // 2 + first // 2, 30, "progress")
    w.kill()
    w.wait(10)
    w = start_writer(redis_url, store_url, "w2", log, "--batch-size", "50",
                     "--claim-idle-ms", "100", "--claim-interval-s", "0.1")
    wait_for(lambda: stored(store_url) == total
             and client.xpending(STREAM, "keel-ledger")["pending"] == 0, 30, "catch-up")
    assert stop(w) == 0
    assert "ledger writer stopped" in log.read_text()
    s = LedgerStore(store_url)
    try:
        assert_ledger_matches_stream(s, client)
    finally:
        s.close()


async def test_postgres_stopped_during_a_run_writer_backs_off_and_loses_nothing(
        engine: Any, pg_server: PostgresServer, pg_url: str, redis_url: str,
        tmp_path: pathlib.Path) -> None:
    port = free_port()
    log = tmp_path / "writer.log"
    w = start_writer(redis_url, pg_url, "w1", log, "--batch-size", "20", "--metrics-port",
                     str(port), "--metrics-host", "127.0.0.1")
    try:
        await traffic(engine, 60, "p1")
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: stored(pg_url) == client.xlen(STREAM), 30, "first events stored")
        pg_server.stop()
        await traffic(engine, 80, "p2")  # decisions keep flowing into the stream
        await asyncio.sleep(1.0)
        metrics = await asyncio.to_thread(scrape, port)
        assert 'keel_pdp_ledger_up{component="store"} 0.0' in metrics
        assert w.poll() is None, "the writer must not exit when the store goes away"
        # Nothing it could not store was acknowledged.
        assert client.xpending(STREAM, "keel-ledger")["pending"] > 0
        pg_server.start()
        await traffic(engine, 20, "p3")
        total = client.xlen(STREAM)
        wait_for(lambda: stored(pg_url) == total
                 and client.xpending(STREAM, "keel-ledger")["pending"] == 0, 30, "catch-up")
        metrics = await asyncio.to_thread(scrape, port)
        assert 'keel_pdp_ledger_up{component="store"} 1.0' in metrics
        errors = [ln for ln in metrics.splitlines()
                  if ln.startswith('keel_pdp_ledger_errors_total{component="store"}')]
        assert errors and float(errors[0].split()[-1]) > 0
    finally:
        if not pg_server.running():
            pg_server.start()
        assert stop(w) == 0
    assert "ledger store unavailable" in log.read_text()
    s = LedgerStore(pg_url)
    try:
        assert_ledger_matches_stream(s, client)
    finally:
        s.close()


async def test_redis_restarted_during_a_run_writer_reconnects_and_loses_nothing(
        engine: Any, redis_server: RedisServer, redis_url: str, tmp_path: pathlib.Path) -> None:
    store_url = f"sqlite:///{tmp_path}/ledger.db"
    log = tmp_path / "writer.log"
    w = start_writer(redis_url, store_url, "w1", log, "--batch-size", "20")
    try:
        await traffic(engine, 40, "r1")
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: stored(store_url) == client.xlen(STREAM), 30, "first events stored")
        redis_server.stop()  # AOF with fsync always: the stream survives the restart
        await asyncio.sleep(0.5)
        assert w.poll() is None
        redis_server.start()
        await traffic(engine, 40, "r2")
        total = client.xlen(STREAM)
        wait_for(lambda: stored(store_url) == total
                 and client.xpending(STREAM, "keel-ledger")["pending"] == 0, 30, "catch-up")
    finally:
        if redis_server.proc is None:
            redis_server.start()
        assert stop(w) == 0
    assert "redis unavailable" in log.read_text()
    s = LedgerStore(store_url)
    try:
        assert_ledger_matches_stream(s, client)
    finally:
        s.close()
