"""`keel-pdp serve` as an operator runs it: env settings, health, metrics, SIGHUP, SIGTERM."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import POLICIES, free_port
from tests.helpers import budget, wait_serving, write_bundle


def test_serve_from_environment_answers_and_exports_metrics(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    port, mport = free_port(), free_port()
    env = {**os.environ, "KEEL_POLICIES": str(policies), "KEEL_REDIS_URL": redis_url,
           "KEEL_LISTEN": f"127.0.0.1:{port}", "KEEL_METRICS_PORT": str(mport),
           "KEEL_RELOAD_INTERVAL": "0.2", "KEEL_STORE_TIMEOUT_MS": "1000"}
    proc = subprocess.Popen([sys.executable, "-m", "keel_pdp.cli", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        stub = pb_grpc.PolicyDecisionPointStub(channel)
        r = stub.Authorize(pb.AuthorizeRequest(
            request_id="cli-1", tenant="acme", workload="support-bot", model="gpt-4o-mini",
            estimated_input_tokens=1200, max_output_tokens=300), timeout=5)
        assert r.decision == pb.ALLOW
        assert r.policy_revision.startswith("2026-11-r1@")
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r.permit_id, usage=pb.Usage(
            input_tokens=1200, output_tokens=100), outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        text = body.decode()
        assert 'keel_pdp_decisions_total{decision="ALLOW",reason="NONE"} 1.0' in text
        assert "keel_pdp_rpc_duration_seconds_bucket" in text
        assert 'le="0.0005"' in text
        assert 'keel_pdp_policy_revision_info{content_hash=' in text
        assert '="acme"' not in text  # no tenant id as a label value (budget ids may name one)

        # Hot reload by content hash: a new revision is picked up without restart.
        write_bundle(policies, [budget("tiny", "0.000001", scope={"tenant": "acme"})],
                     revision="r2", settings={"allow_constrain": False})
        (policies / "routes.yaml").unlink()
        # The example's deployment map names Azure models the test price table lacks.
        (policies / "deployments.yaml").unlink(missing_ok=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r2 = stub.Authorize(pb.AuthorizeRequest(
                request_id=f"cli-2-{time.monotonic()}", tenant="acme", workload="w",
                model="gpt-4o-mini", estimated_input_tokens=100), timeout=5)
            if r2.policy_revision.startswith("r2@"):
                break
            time.sleep(0.1)
        assert r2.policy_revision.startswith("r2@")
        assert r2.decision == pb.DENY
        # A broken bundle is rejected; the last good one keeps serving.
        (policies / "budgets.yaml").write_text("apiVersion: keel.pdp/v1\nkind: Budgets\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        r3 = stub.Authorize(pb.AuthorizeRequest(
            request_id="cli-3", tenant="acme", workload="w", model="gpt-4o-mini",
            estimated_input_tokens=100), timeout=5)
        assert r3.policy_revision == r2.policy_revision
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "budgets.yaml: budgets: Field required" in out
    assert f"listening on 127.0.0.1:{port}" in out


def test_bad_settings_are_refused_with_the_flag_named() -> None:
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "serve", "--redis-url",
                          "http://x"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "--redis-url" in res.stderr


def test_policy_check_names_file_and_field(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [{"id": "b", "cap_usd": 5, "window": "daily"}])
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check",
                          str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "budgets.yaml: budgets.0.cap_usd" in res.stderr
    ok = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check",
                         str(POLICIES)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
