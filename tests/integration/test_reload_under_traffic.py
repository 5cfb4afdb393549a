"""A Kubernetes-style ConfigMap swap while traffic runs: no failed decision, and
the revision changes exactly once."""

from __future__ import annotations

import asyncio
import itertools
import os
import pathlib
import subprocess
import sys

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.helpers import budget, wait_ready, write_bundle


def configmap(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The layout kubelet writes: ..<timestamp> data dirs, a ..data symlink, and
    one symlink per key pointing through ..data."""
    root.mkdir()
    v1 = write_bundle(root / "..2026_11_22_10_00_00.1", [budget("b", "100")], revision="r1")
    v2 = write_bundle(root / "..2026_11_22_10_05_00.2", [budget("b", "200")], revision="r2")
    os.symlink(v1.name, root / "..data")
    for name in ("bundle.yaml", "prices.yaml", "budgets.yaml"):
        os.symlink(f"..data/{name}", root / name)
    return v1, v2


def test_configmap_swap_under_traffic(redis_url: str, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "policies"
    _, v2 = configmap(root)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(root), "--redis-url",
         redis_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--reload-interval", "0.1", "--store-timeout", "1", "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(port)

        async def traffic() -> list[tuple[str, int, bool]]:
            seen: list[tuple[str, int, bool]] = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.PolicyDecisionPointStub(ch)
                for i in range(600):
                    if i == 200:
                        # kubelet's atomic swap: a new ..data link renamed over the old one
                        os.symlink(v2.name, root / "..data_tmp")
                        os.replace(root / "..data_tmp", root / "..data")
                    r = await stub.Authorize(pb.AuthorizeRequest(
                        request_id=f"r{i}", tenant="acme", workload="w", model="gpt-4o-mini",
                        provider="openai", estimated_input_tokens=10, max_output_tokens=10),
                        timeout=5)
                    seen.append((r.policy_revision.split("@")[0], r.decision, r.degraded))
                    if i >= 200 and seen[-1][0] == "r2" and len(seen) >= 400:
                        break
                    await asyncio.sleep(0.005)
            return seen

        seen = asyncio.run(traffic())
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    revisions = [rev for rev, _, _ in seen]
    assert all(d == pb.ALLOW and not degraded for _, d, degraded in seen)
    changes = sum(1 for a, b in itertools.pairwise(revisions) if a != b)
    assert changes == 1, revisions
    assert revisions[0] == "r1"
    assert revisions[-1] == "r2"
    assert out.count("policy bundle r2@") == 1  # loaded once, no flapping
