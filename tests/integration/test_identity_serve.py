"""`keel-pdp serve --caller-auth enforce` as an operator starts it: the bundle's
Callers bindings and a bearer-token file, checked end to end, counted on /metrics."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import urllib.request

import grpc
import yaml

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.helpers import budget, wait_serving, write_bundle

TOKEN = "serve-token-0123456789"


def test_serve_enforces_bindings_with_token_identities(redis_url: str,
                                                       tmp_path: pathlib.Path) -> None:
    policies = write_bundle(tmp_path / "policies", [
        budget("acme", "100", scope={"tenant": "acme"}),
        budget("globex", "100", scope={"tenant": "globex"})])
    (policies / "callers.yaml").write_text(yaml.safe_dump({
        "apiVersion": "keel.pdp/v1", "kind": "Callers",
        "bindings": [{"id": "ci", "identities": ["ci-job"], "tenants": ["acme"]}]}))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci-job {TOKEN}\n")
    port, mport = free_port(), free_port()
    env = {**os.environ, "KEEL_REDIS_URL": redis_url, "KEEL_STORE_TIMEOUT_MS": "1000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(policies),
         "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport),
         "--caller-auth", "enforce", "--caller-tokens-file", str(tokens)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        stub = pb_grpc.PolicyDecisionPointStub(channel)
        md = (("authorization", f"Bearer {TOKEN}"),)

        def req(rid: str, tenant: str) -> pb.AuthorizeRequest:
            return pb.AuthorizeRequest(request_id=rid, tenant=tenant, workload="w",
                                       model="gpt-4o-mini", estimated_input_tokens=100)

        assert stub.Authorize(req("s1", "acme"), metadata=md, timeout=5).decision == pb.ALLOW
        for rid, tenant, meta, code in (("s2", "globex", md, grpc.StatusCode.PERMISSION_DENIED),
                                        ("s3", "acme", (), grpc.StatusCode.UNAUTHENTICATED)):
            try:
                stub.Authorize(req(rid, tenant), metadata=meta, timeout=5)
                raise AssertionError(f"{rid} was served")
            except grpc.RpcError as exc:
                assert exc.code() == code, exc.details()
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                      timeout=5).read().decode()
        assert ('keel_pdp_caller_refusals_total{mode="enforce",reason="scope",'
                'rpc="authorize"} 1.0') in text
        assert ('keel_pdp_caller_refusals_total{mode="enforce",reason="no_identity",'
                'rpc="authorize"} 1.0') in text
        caller_lines = [x for x in text.splitlines() if x.startswith("keel_pdp_caller")]
        assert caller_lines
        assert not any("globex" in x or "ci-job" in x for x in caller_lines)  # no such labels
        channel.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "caller 'ci-job' may not name tenant 'globex'" in out
