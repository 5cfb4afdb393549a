"""TLS, mutual TLS with rotation, admin identities, loopback-only plaintext and
load shedding, against a real Redis."""

from __future__ import annotations

import asyncio
import pathlib
import ssl
import subprocess
import sys
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.admin import add_admin
from keel_pdp.server.service import build_server
from keel_pdp.server.tls import ReloadingCredentials, TlsError, TlsFiles, check_listen
from tests.conftest import free_port
from tests.helpers import budget, write_bundle


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: pathlib.Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=keel-test-ca", cwd=d)


def make_cert(d: pathlib.Path, name: str, cn: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture
def pki(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d)
    make_cert(d, "server", "localhost")
    make_cert(d, "server2", "keel-rotated")
    make_cert(d, "ops", "ops-admin")
    make_cert(d, "app", "some-app")
    return d


async def _engine(redis_url: str, tmp_path: pathlib.Path, timeout_s: float = 1.0) -> Engine:
    d = write_bundle(tmp_path / "bundle", [budget("b", "100")])
    holder = PolicyHolder(d)
    holder.reload()
    store = BudgetStore(aioredis.Redis.from_url(redis_url), KeySpace("sec"), timeout_s)
    return Engine(holder, store, Metrics())


def test_plaintext_beyond_loopback_is_refused_unless_allowed() -> None:
    check_listen("127.0.0.1:50051", None, False)
    check_listen("[::1]:50051", None, False)
    with pytest.raises(TlsError, match="not a loopback address"):
        check_listen("0.0.0.0:50051", None, False)
    check_listen("0.0.0.0:50051", None, True)
    check_listen("0.0.0.0:50051", TlsFiles("c", "k"), False)
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "serve", "--listen",
                          f"0.0.0.0:{free_port()}", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "not a loopback address" in res.stderr


async def test_mutual_tls_with_rotation_and_admin_identity(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    engine = await _engine(redis_url, tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes((pki / "server.pem").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    creds = ReloadingCredentials(TlsFiles(str(cert), str(key), str(pki / "ca.pem")))
    server, _, port = build_server(
        engine, engine.metrics, f"127.0.0.1:{free_port()}", credentials=creds.credentials(),
        extra_services=[add_admin(engine, lambda: None, ("ops-admin",))])
    await server.start()
    ca = (pki / "ca.pem").read_bytes()

    def channel(client: str | None) -> grpc.aio.Channel:
        c = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / f"{client}.key").read_bytes() if client else None,
            certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", c,
                                       options=[("grpc.ssl_target_name_override", "localhost")])

    areq = pb.AuthorizeRequest(request_id="t1", tenant="acme", workload="w",
                               model="gpt-4o-mini", estimated_input_tokens=10)
    try:
        async with channel("app") as ch:
            r = await pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq, timeout=5)
            assert r.decision == pb.ALLOW
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.AdminStub(ch).ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with channel("ops") as ch:
            rel = await pb_grpc.AdminStub(ch).ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
            assert rel.policy_revision.startswith("test-r1@")
        async with channel(None) as ch:  # no client certificate: handshake refused
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq, timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq, timeout=3)

        def served_cn() -> str:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(pki / "app.pem"), str(pki / "app.key"))
            ctx.set_alpn_protocols(["h2"])
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw) as tls:
                peer: Any = tls.getpeercert()
                subject = dict(x[0] for x in peer["subject"])
                return str(subject["commonName"])

        assert await asyncio.to_thread(served_cn) == "localhost"
        # Rotate the files in place: new handshakes get the new certificate.
        cert.write_bytes((pki / "server2.pem").read_bytes())
        key.write_bytes((pki / "server2.key").read_bytes())
        assert await asyncio.to_thread(served_cn) == "keel-rotated"
        assert creds.reloads == 1
    finally:
        await server.stop(0)
        await engine.store.close()


async def test_beyond_max_concurrent_rpcs_answers_resource_exhausted_at_once(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    engine = await _engine(redis_url, tmp_path, timeout_s=3.0)
    server, _, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}",
                                   max_concurrent_rpcs=4)
    await server.start()
    pauser = aioredis.Redis.from_url(redis_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            await stub.Authorize(pb.AuthorizeRequest(request_id="warm", tenant="a", workload="w",
                                                     model="gpt-4o-mini"), timeout=5)
            await pauser.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # type: ignore[no-untyped-call]
            loop = asyncio.get_running_loop()
            started = loop.time()

            async def call(i: int) -> tuple[str, float]:
                try:
                    await stub.Authorize(pb.AuthorizeRequest(
                        request_id=f"c{i}", tenant="a", workload="w", model="gpt-4o-mini"),
                        timeout=10)
                    return "ok", loop.time() - started
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, loop.time() - started

            results = await asyncio.gather(*(call(i) for i in range(20)))
        shed = [t for code, t in results if code == "RESOURCE_EXHAUSTED"]
        served = [t for code, t in results if code == "ok"]
        assert len(shed) >= 14
        assert len(served) >= 1
        assert max(shed) < 1.0  # refused at once, not after the pause
    finally:
        await pauser.aclose()
        await server.stop(0)
        await engine.store.close()


def test_redis_password_never_reaches_the_logs(tmp_path: pathlib.Path) -> None:
    secret = "hunter2-very-secret"
    bundle = write_bundle(tmp_path / "b", [budget("b", "1", fail_mode="open")])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", f"redis://keel:{secret}@127.0.0.1:{free_port()}/0",
         "--listen", f"127.0.0.1:{port}", "--metrics-port", "0", "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import time

        deadline = time.monotonic() + 20
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            while time.monotonic() < deadline:
                try:
                    r = stub.Authorize(pb.AuthorizeRequest(
                        request_id="x", tenant="a", workload="w", model="gpt-4o-mini"),
                        timeout=2)
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
        assert r.degraded  # Redis is not there: the fail mode answered
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "127.0.0.1" in out
    assert secret not in out


async def test_redis_with_auth_and_tls_through_a_rediss_url(
        tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    import shutil

    port = free_port()
    work = tmp_path / "redis-tls"
    work.mkdir()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a test fixture server
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(pki / "server.pem"),
         "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.pem"),
         "--tls-auth-clients", "no", "--requirepass", "s3cret", "--save", "",
         "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)
        bundle = write_bundle(tmp_path / "b", [budget("b", "100", fail_mode="closed")])
        holder = PolicyHolder(bundle)
        holder.reload()
        base = f"localhost:{port}/0?ssl_ca_certs={pki / 'ca.pem'}"
        good = BudgetStore.from_url(f"rediss://:s3cret@{base}", prefix="tls", timeout_s=1.0)
        engine = Engine(holder, good, Metrics())
        from keel_pdp.decision import AuthorizeInput, DecisionKind

        req = AuthorizeInput("t", "acme", "w", "gpt-4o-mini", "openai", 100, 10)
        for _ in range(20):  # the server may still be starting
            out = await engine.authorize(req)
            if not out.degraded:
                break
            await asyncio.sleep(0.2)
        assert out.decision is DecisionKind.ALLOW
        assert not out.degraded
        wrong = BudgetStore.from_url(f"rediss://:nope@{base}", prefix="tls", timeout_s=0.5)
        denied = await Engine(holder, wrong, Metrics()).authorize(
            AuthorizeInput("u", "acme", "w", "gpt-4o-mini", "openai", 100, 10))
        assert denied.degraded  # wrong password: the store is unavailable, fail mode decides
        assert denied.decision is DecisionKind.DENY
        plain = BudgetStore.from_url(f"redis://:s3cret@localhost:{port}/0", prefix="tls",
                                     timeout_s=0.5)
        assert not await plain.ping()  # plaintext to a TLS port does not pass
        for s in (good, wrong, plain):
            await s.close()
    finally:
        proc.terminate()
        proc.wait(10)
