"""Hostile reloads against a real sidecar under traffic: a bundle with an absurd cap
and an over-precise price is refused (named by file and field, counted, the last
good bundle keeps deciding), then a swap to a bundle of 1,000 more budgets is seen
whole by every decision or not at all."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
from typing import Any

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.conftest import Sidecar
from tests.helpers import PRICES, budget, write_bundle

TENANTS = 1_000


def _rejected(metrics: str) -> float:
    m = re.search(r'^keel_pdp_policy_loads_total\{result="rejected"\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_rejected_bundle_changes_nothing_and_a_big_swap_is_seen_whole(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    root = tmp_path / "policies"
    root.mkdir()
    write_bundle(root / "..v1", [budget("b", "100")], revision="r1")
    bad_prices: dict[str, Any] = {**PRICES, "openai": {
        **PRICES["openai"], "gpt-4o-mini": {"input": "0.1500001", "output": "0.60"}}}
    write_bundle(root / "..v2", [budget("b", "1e309")], prices=bad_prices, revision="r2")
    per_tenant = [budget(f"t{i}-daily", "1", scope={"tenant": f"t{i}"}) for i in range(TENANTS)]
    write_bundle(root / "..v3", [budget("b", "100"), *per_tenant], revision="r3")
    os.symlink("..v1", root / "..data")
    for name in ("bundle.yaml", "prices.yaml", "budgets.yaml"):
        os.symlink(f"..data/{name}", root / name)

    def swap(to: str) -> None:  # kubelet's atomic swap of the ..data link
        os.symlink(to, root / "..data_tmp")
        os.replace(root / "..data_tmp", root / "..data")

    s = Sidecar(redis_url, root, ("--reload-interval", "0.05", "--store-timeout", "2")).start()
    sidecars.append(s)
    assert _rejected(s.metrics()) == 0

    async def traffic() -> list[tuple[int, str, tuple[str, ...], int]]:
        seen: list[tuple[int, str, tuple[str, ...], int]] = []
        async with grpc.aio.insecure_channel(s.target) as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            for i in range(100_000):
                if i == 50:
                    swap("..v2")
                if i == 250:
                    assert _rejected(s.metrics()) >= 1
                    swap("..v3")
                r = await stub.Authorize(pb.AuthorizeRequest(
                    request_id=f"r{i}", tenant=f"t{i % TENANTS}", workload="w",
                    model="gpt-4o-mini", provider="openai", estimated_input_tokens=10,
                    max_output_tokens=10), timeout=5)
                seen.append((i, r.policy_revision.split("@")[0], tuple(r.matched_budgets),
                             r.decision))
                if i > 250 and seen[-1][1] == "r3" and sum(x[1] == "r3" for x in seen) >= 200:
                    return seen
                if i == 200 or i > 250:
                    await asyncio.sleep(0.002)
            raise AssertionError("r3 was never served")

    seen = asyncio.run(traffic())
    assert all(d == pb.ALLOW for *_, d in seen)
    assert {rev for _, rev, _, _ in seen} == {"r1", "r3"}  # r2 never served
    assert all(rev == "r1" for i, rev, _, _ in seen if i < 250)
    for i, rev, matched, _ in seen:
        want = ("b",) if rev == "r1" else tuple(sorted(("b", f"t{i % TENANTS}-daily")))
        assert tuple(sorted(matched)) == want, (i, rev, matched)
    revisions = [rev for _, rev, _, _ in seen]
    assert revisions == sorted(revisions)  # r1 then r3, never back
    assert _rejected(s.metrics()) == 1  # counted once, not at every poll
