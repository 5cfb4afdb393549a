"""A Redis password in the URL never reaches the sidecar's output in clear.

redis-py and the RESP client both accept ``?password=`` as well as
``user:password@``; every place the URL is shown (the unreachable-store warning,
a settings error) shows ``***`` instead. Real ``keel-pdp serve`` processes, real
Redis (one of them requiring the password).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.helpers import budget, write_bundle


def _serve_once(bundle: pathlib.Path, redis_url: str) -> tuple[pb.AuthorizeResponse, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--log-level", "DEBUG", "--store-timeout", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answer = None
    try:
        deadline = time.monotonic() + 20
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            while answer is None and time.monotonic() < deadline:
                try:
                    answer = stub.Authorize(pb.AuthorizeRequest(
                        request_id="secret-1", tenant="a", workload="w", model="gpt-4o-mini"),
                        timeout=2)
                except grpc.RpcError:
                    time.sleep(0.2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert answer is not None, out
    return answer, out


@pytest.fixture
def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "b", [budget("b", "1", fail_mode="open")])


def test_query_password_of_an_unreachable_store_is_not_logged(bundle: pathlib.Path) -> None:
    secret = "query-secret-5b1e"
    answer, out = _serve_once(bundle, f"redis://127.0.0.1:{free_port()}/0?password={secret}")
    assert answer.degraded  # Redis is not there: the fail mode answered
    assert "not reachable" in out
    assert "password=***" in out
    assert secret not in out


def test_query_and_userinfo_passwords_against_a_redis_that_requires_one(
        bundle: pathlib.Path, tmp_path: pathlib.Path) -> None:
    secret = "required-secret-9c4d"
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (make deps installs it)"
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--requirepass", secret, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for url in (f"redis://127.0.0.1:{port}/0?password={secret}",
                    f"redis://default:{secret}@127.0.0.1:{port}/0"):
            answer, out = _serve_once(bundle, url)
            assert answer.decision == pb.ALLOW
            assert not answer.degraded, out  # the password was used: Redis answered
            assert secret not in out
    finally:
        redis.terminate()
        redis.wait(10)


def test_a_settings_error_does_not_echo_the_password(bundle: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", "redsi://keel:userinfo-secret@127.0.0.1/0?password=query-secret",
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "scheme must be" in text
    assert "userinfo-secret" not in text
    assert "query-secret" not in text
