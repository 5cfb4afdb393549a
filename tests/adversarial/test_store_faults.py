"""The store misbehaves while hostile traffic flows: Redis busy past the store timeout
(the hold scripts run late), Redis killed and restarted, the issuing sidecar killed
with degraded permits in its journal. The answers, Redis and the ledger must agree
afterwards (tests/adversarial/audit.py)."""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import Sidecar, areq, keep_busy, usage
from tests.conftest import RedisServer
from tests.helpers import budget, write_bundle


async def _burst(stubs: list[Any], n: int, tag: str) -> list[tuple[pb.AuthorizeRequest, Any]]:
    reqs = [areq(f"{tag}-{i}", model="no-such-model" if i % 10 == 9 else "gpt-4o-mini")
            for i in range(n)]
    outs = await asyncio.gather(*(stubs[i % len(stubs)].Authorize(r, timeout=10)
                                  for i, r in enumerate(reqs)))
    return list(zip(reqs, outs, strict=True))


async def _busy_redis_scenario(redis_url: str, tmp_path: pathlib.Path,
                               sidecars: list[Sidecar], fail_mode: str) -> None:
    bundle = write_bundle(tmp_path / "bundle", [budget("b", "1000", fail_mode=fail_mode)])
    for _ in range(2):
        sidecars.append(Sidecar(redis_url, bundle, ("--store-timeout", "0.025")).start())
    # A third sidecar with a patient store timeout takes the retries and closeouts, so
    # a loaded machine cannot turn them into fail-mode answers of their own.
    calm = Sidecar(redis_url, bundle, ("--store-timeout", "2")).start()
    sidecars.append(calm)
    audit = Audit(redis_url, tmp_path, {"b": 1000 * 10**6})
    chans: list[Any] = [grpc.aio.insecure_channel(s.target) for s in sidecars]
    stubs: list[Any] = [pb_grpc.PolicyDecisionPointStub(c) for c in chans]
    busy, patient = stubs[:2], stubs[2]

    async def settle(permit_id: str) -> Any:
        deadline = time.monotonic() + 15
        while True:  # a degraded permit is pending until its issuer replays its outbox
            c = await patient.Closeout(pb.CloseoutRequest(
                permit_id=permit_id, usage=usage(), outcome=pb.SUCCEEDED), timeout=10)
            if c.status not in (pb.CLOSEOUT_PERMIT_PENDING, pb.CLOSEOUT_STORE_UNAVAILABLE) \
                    or time.monotonic() > deadline:
                return c
            await asyncio.sleep(0.1)

    try:
        warm = await _burst(busy, 4, "warm")  # scripts loaded, connections open
        blocker = keep_busy(redis_url, 150)
        await asyncio.sleep(0.02)
        answered = await _burst(busy, 200, "busy")
        await asyncio.to_thread(blocker.join)
        timed_out = [(r, o) for r, o in answered if o.degraded]
        assert len(timed_out) > 50, "the busy store should have timed most calls out"
        for r, o in warm + answered:
            audit.answer(o.permit_id, pb.Decision.Name(o.decision), o.degraded, r.request_id)
        await asyncio.sleep(1.0)  # the sidecars' background loops send the aborts
        # A retry of a timed-out call is decided afresh: never a replay of an answer
        # the caller did not get.
        for r, _o in timed_out[:20]:
            again = await patient.Authorize(r, timeout=10)
            if r.model == "gpt-4o-mini":
                assert again.decision == pb.ALLOW and not again.replayed and not again.degraded
            audit.answer(again.permit_id, pb.Decision.Name(again.decision), again.degraded)
            if again.decision == pb.ALLOW:
                await patient.Void(pb.VoidRequest(permit_id=again.permit_id), timeout=10)
        for _r, o in warm + answered:
            if o.decision != pb.DENY:
                c = await settle(o.permit_id)
                assert c.status in (pb.SETTLED, pb.ALREADY_SETTLED), c
    finally:
        for c in chans:
            await c.close()
    audit.wait_no_holds()
    audit.check_all()
    aborted = sum(1 for _, t, _, d, _ in audit.stream()
                  if t == "void" and str(d.get("reason", "")).startswith("aborted"))
    metrics = sidecars[0].metrics() + sidecars[1].metrics()
    assert "keel_pdp_holds_aborted_total" in metrics
    print(f"busy Redis ({fail_mode}): {len(timed_out)} of 200 answered by fail mode, "
          f"{aborted} late holds aborted")


async def test_busy_redis_fail_closed_leaves_no_hold_behind_a_deny(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    await _busy_redis_scenario(redis_url, tmp_path, sidecars, "closed")


async def test_busy_redis_fail_open_permits_settle_and_late_holds_are_undone(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    await _busy_redis_scenario(redis_url, tmp_path, sidecars, "open")


def test_degraded_permit_settles_on_another_sidecar_after_the_issuer_died(
        redis_server: RedisServer, redis_url: str, tmp_path: pathlib.Path,
        sidecars: list[Sidecar]) -> None:
    bundle = write_bundle(tmp_path / "bundle", [budget("b", "1000", fail_mode="open")])
    journal = tmp_path / "outbox-a"
    a = Sidecar(redis_url, bundle, ("--outbox-dir", str(journal),
                                    "--store-timeout", "0.05")).start()
    b = Sidecar(redis_url, bundle).start()
    sidecars += [a, b]
    audit = Audit(redis_url, tmp_path, {"b": 1000 * 10**6})
    redis_server.kill()
    try:
        ch, stub = a.stub()
        with ch:
            r = stub.Authorize(areq("outage-1"), timeout=5)
        assert r.decision == pb.ALLOW and r.degraded
        assert r.block_reasons[0].code == pb.STORE_UNAVAILABLE
        a.kill()  # the issuing sidecar dies with the permit only in its journal
    finally:
        redis_server.start()
    closeout = pb.CloseoutRequest(permit_id=r.permit_id, usage=usage(), outcome=pb.SUCCEEDED)
    ch, stub = b.stub()
    with ch:
        # Another sidecar does not know it yet: retry, never UNKNOWN_PERMIT (its own
        # connection to the restarted Redis may need a moment: STORE_UNAVAILABLE, retry).
        deadline = time.monotonic() + 10
        first = stub.Closeout(closeout, timeout=5).status
        while first == pb.CLOSEOUT_STORE_UNAVAILABLE and time.monotonic() < deadline:
            time.sleep(0.1)
            first = stub.Closeout(closeout, timeout=5).status
        assert first == pb.CLOSEOUT_PERMIT_PENDING
        assert stub.Void(pb.VoidRequest(permit_id=r.permit_id),
                         timeout=5).status == pb.VOID_STORE_UNAVAILABLE
        # The issuer restarts on its journal and records the permit in Redis.
        sidecars.append(Sidecar(redis_url, bundle, ("--outbox-dir", str(journal))).start())
        deadline = time.monotonic() + 10
        status = pb.CLOSEOUT_PERMIT_PENDING
        while status == pb.CLOSEOUT_PERMIT_PENDING and time.monotonic() < deadline:
            c = stub.Closeout(closeout, timeout=5)
            status = c.status
            time.sleep(0.1)
        assert status == pb.SETTLED
        assert (c.actual_cost_micros, c.held_micros, c.correction_micros) == (210, 0, 210)
        assert stub.Closeout(closeout, timeout=5).status == pb.ALREADY_SETTLED
    audit.answer(r.permit_id, "ALLOW", degraded=True)
    audit.check_all()
    window = next(iter(audit.windows().values()))
    assert window == (210, 0)  # the provider-billed cost is booked once
