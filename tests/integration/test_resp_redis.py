"""The pipelined RESP client against a real Redis server.

Pipelining order, NOSCRIPT recovery after SCRIPT FLUSH, a timeout that must not
shift later replies, Redis restarts, AUTH (password and ACL user), database
selection and TLS.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import uvloop

from keel_pdp.budget.resp import RespClient, RespConnectionError, RespError
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from tests.conftest import RedisServer, free_port

ECHO_ARG = "return ARGV[1]"
# Busy for ARGV[1] milliseconds inside Redis (the only way to make Redis slow on cue).
SPIN = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 'done'
"""


async def test_hundreds_of_concurrent_calls_get_their_own_replies_in_order(
        redis_url: str) -> None:
    client = RespClient.from_url(redis_url)
    script = client.script(ECHO_ARG)
    try:
        echoes = [client.command("ECHO", f"e{i}", timeout_s=5) for i in range(300)]
        evals = [client.eval_script(script, ["k"], [f"s{i}"], timeout_s=5) for i in range(300)]
        incrs = [client.command("INCR", "counter", timeout_s=5) for _ in range(300)]
        got = await asyncio.gather(*echoes, *evals, *incrs)
        assert got[:300] == [f"e{i}".encode() for i in range(300)]
        assert got[300:600] == [f"s{i}".encode() for i in range(300)]
        assert got[600:] == list(range(1, 301))  # INCRs ran in the order they were sent
    finally:
        await client.close()


async def test_script_flush_costs_one_reload_and_the_call_still_answers(
        redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    client = RespClient.from_url(redis_url)
    script = client.script(ECHO_ARG)
    try:
        assert await client.eval_script(script, [], ["before"], timeout_s=2) == b"before"
        admin.script_flush()
        admin.config_resetstat()
        assert await client.eval_script(script, [], ["after"], timeout_s=2) == b"after"
        assert await client.eval_script(script, [], ["again"], timeout_s=2) == b"again"
        stats = admin.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 1
        assert stats["cmdstat_evalsha"]["calls"] == 3  # NOSCRIPT, retry, next call
    finally:
        await client.close()
        admin.close()


async def test_a_timed_out_call_does_not_shift_the_next_replies(redis_url: str) -> None:
    client = RespClient.from_url(redis_url)
    spin = client.script(SPIN)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.eval_script(spin, [], [300], timeout_s=0.02)
        assert time.monotonic() - t0 < 0.25  # did not wait for the 300 ms script
        # Queued behind the script on the same connection; its reply is its own.
        assert await client.command("ECHO", "mine", timeout_s=2) == b"mine"
        assert await client.eval_script(spin, [], [0], timeout_s=2) == b"done"
        assert await client.command("INCR", "n", timeout_s=2) == 1
    finally:
        await client.close()


async def test_an_error_reply_is_raised_and_the_connection_stays_in_step(
        redis_url: str) -> None:
    client = RespClient.from_url(redis_url)
    try:
        await client.command("SET", "s", "text", timeout_s=2)
        with pytest.raises(RespError, match=r"WRONGTYPE|not an integer"):
            await client.command("HINCRBY", "s", "f", 1, timeout_s=2)
        assert await client.command("GET", "s", timeout_s=2) == b"text"
    finally:
        await client.close()


async def test_redis_restart_gives_store_unavailable_then_recovers(
        redis_server: RedisServer, redis_url: str) -> None:
    store = BudgetStore.from_url(redis_url, prefix="rs", timeout_s=0.05)
    try:
        assert await store.ping()
        assert await store.permit("pmt_0" * 2, 0.05) is None
        redis_server.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.permit("pmt_0" * 2, 0.05)
        assert not await store.ping()
        assert time.monotonic() - t0 < 2.0  # every failure answered promptly
        for _ in range(5):  # inside the back-off: fast failures, no waiting
            t1 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.permit("pmt_0" * 2, 0.05)
            assert time.monotonic() - t1 < 0.3
        redis_server.start()
        deadline = time.monotonic() + 10
        while not await store.ping():
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            await asyncio.sleep(0.05)
        assert await store.permit("pmt_0" * 2, 0.5) is None
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await store.close()


def test_the_store_path_works_on_uvloop(redis_url: str) -> None:
    async def main() -> list[Any]:
        client = RespClient.from_url(redis_url)
        script = client.script(ECHO_ARG)
        try:
            return list(await asyncio.gather(
                *(client.eval_script(script, ["k"], [i], timeout_s=2) for i in range(50))))
        finally:
            await client.close()

    assert uvloop.run(main()) == [str(i).encode() for i in range(50)]


# ------------------------------------------------------------- own servers
def _server(tmp: pathlib.Path, *args: str) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make deps installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(tmp), *[a.replace("{port}", str(port)) for a in args]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def _wait_up(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        client = RespClient.from_url(url, backoff_base_s=0.01, backoff_max_s=0.05)
        try:
            await client.command("PING", timeout_s=1)
            return
        except (RespConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        finally:
            await client.close()


@pytest.fixture
def auth_redis(tmp_path: pathlib.Path) -> Iterator[int]:
    yield from _server(tmp_path, "--requirepass", "sesame",
                       "--user", "alice", "on", ">wonder", "~*", "&*", "+@all")


async def test_auth_with_password_and_with_acl_user(auth_redis: int) -> None:
    base = f"127.0.0.1:{auth_redis}"
    await _wait_up(f"redis://:sesame@{base}/0")
    for url in (f"redis://:sesame@{base}/0", f"redis://alice:wonder@{base}/0"):
        client = RespClient.from_url(url)
        try:
            assert await client.command("SET", "k", "v", timeout_s=2) == b"OK"
        finally:
            await client.close()
    for url in (f"redis://{base}/0", f"redis://:wrong@{base}/0",
                f"redis://alice:wrong@{base}/0"):
        client = RespClient.from_url(url)
        try:
            with pytest.raises((RespConnectionError, RespError)):
                await client.command("SET", "k", "v", timeout_s=2)
        finally:
            await client.close()
    store = BudgetStore.from_url(f"redis://:wrong@{base}/0", timeout_s=0.2)
    try:
        assert not await store.ping()
    finally:
        await store.close()


async def test_the_database_in_the_url_is_selected(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    client = RespClient.from_url(url)
    try:
        await client.command("SET", "in-db-3", "yes", timeout_s=2)
    finally:
        await client.close()
    admin = redis.Redis.from_url(url)
    try:
        assert admin.get("in-db-3") == b"yes"
        assert redis.Redis.from_url(redis_url).get("in-db-3") is None
    finally:
        admin.flushdb()
        admin.close()


@pytest.fixture
def tls_redis(tmp_path: pathlib.Path) -> Iterator[tuple[int, pathlib.Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    tls_port = free_port()
    for _ in _server(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                     "--tls-auth-clients", "no"):
        yield tls_port, cert


async def test_rediss_url_talks_tls(tls_redis: tuple[int, pathlib.Path]) -> None:
    port, cert = tls_redis
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={cert}"
    await _wait_up(url)
    client = RespClient.from_url(url)
    script = client.script(ECHO_ARG)
    try:
        assert await client.eval_script(script, [], ["over tls"], timeout_s=2) == b"over tls"
    finally:
        await client.close()
    # The certificate is verified: without the CA the handshake is refused.
    strict = RespClient.from_url(f"rediss://localhost:{port}/0")
    try:
        with pytest.raises(RespConnectionError):
            await strict.command("PING", timeout_s=2)
    finally:
        await strict.close()

