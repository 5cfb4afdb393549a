"""The hostile host against `keel-pdp serve --workers 2`: Redis down while both
workers issue fail-open (degraded) permits, workers frozen, killed with -9 in the
outage or in the middle of a burst, the service restarted with another number of
workers. Afterwards the answers, Redis and the ledger agree (tests/adversarial/audit.py):
nothing lost, nothing booked twice, and a clear status while a permit is pending.

Prices (tests/helpers.PRICES): 1,000 input + 100 output tokens of gpt-4o-mini cost
150 + 60 = 210 micro-USD.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import time
from collections import Counter
from typing import Any

import grpc
import pytest

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import areq, usage
from tests.adversarial.service import Service
from tests.conftest import RedisServer
from tests.helpers import budget, write_bundle

ONE_CALL = 210
N = 400  # calls in the burst of the kill -9 test
RETRY = (pb.CLOSEOUT_PERMIT_PENDING, pb.CLOSEOUT_STORE_UNAVAILABLE)


def _closeout(stub: pb_grpc.PolicyDecisionPointStub, permit_id: str,
              u: pb.Usage | None = None) -> pb.CloseoutResponse:
    return stub.Closeout(pb.CloseoutRequest(permit_id=permit_id, usage=u or usage(),
                                            outcome=pb.SUCCEEDED), timeout=5)


def _settle(stub: pb_grpc.PolicyDecisionPointStub, permit_id: str,
            timeout_s: float = 15.0) -> pb.CloseoutResponse:
    """Closeout, retried while the answer says retry (as a client does)."""
    deadline = time.monotonic() + timeout_s
    c = _closeout(stub, permit_id)
    while c.status in RETRY and time.monotonic() < deadline:
        time.sleep(0.1)
        c = _closeout(stub, permit_id)
    return c


def _journals(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("outbox-*.jsonl"))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_degraded_permits_replayed_after_a_restart_with_another_number_of_workers(
        redis_server: RedisServer, redis_url: str, tmp_path: pathlib.Path,
        services: list[Service], before: int, after: int) -> None:
    """Every journal in --outbox-dir is replayed by whichever process starts next,
    whatever the number of workers of the service that wrote it."""
    bundle = write_bundle(tmp_path / "bundle", [budget("b", "10", fail_mode="open")])
    journal = tmp_path / "outbox"
    first = Service(redis_url, bundle, ("--outbox-dir", str(journal), "--store-timeout", "0.05"),
                    workers=before, log=tmp_path / "serve.log")
    services.append(first)
    first.start()
    audit = Audit(redis_url, tmp_path, {"b": 10 * 10**6})
    permits: list[str] = []
    redis_server.kill()
    try:
        for i in range(2):
            ch, stub = first.stub(i % before)
            with ch:
                r = stub.Authorize(areq(f"outage-{i}"), timeout=5)
            assert r.decision == pb.ALLOW and r.degraded
            permits.append(r.permit_id)
            audit.answer(r.permit_id, "ALLOW", degraded=True)
        assert len(_journals(journal)) == before
        first.kill()  # the whole service, every worker, with the permits only journaled
    finally:
        redis_server.start()
    second = Service(redis_url, bundle, ("--outbox-dir", str(journal), "--store-timeout", "1"),
                     workers=after, log=tmp_path / "serve.log")
    services.append(second)
    second.start()
    for i, pid in enumerate(permits):
        ch, stub = second.stub(i % after)
        with ch:
            c = _settle(stub, pid)
        assert c.status == pb.SETTLED, f"{pid}: {pb.CloseoutStatus.Name(c.status)}"
        assert (c.actual_cost_micros, c.held_micros) == (ONE_CALL, 0)
    assert _journals(journal) == []
    assert second.stop() == 0
    audit.check_all()
    assert next(iter(audit.windows().values())) == (2 * ONE_CALL, 0)


def test_degraded_permit_pending_on_the_other_worker_until_its_frozen_issuer_journals_it(
        redis_server: RedisServer, redis_url: str, tmp_path: pathlib.Path,
        services: list[Service]) -> None:
    """Both workers issue degraded permits; worker 1 is killed -9 in the outage (its
    restart replays its journal), worker 0 is frozen (SIGSTOP) as Redis comes back:
    its permit is PENDING on worker 1, never UNKNOWN_PERMIT, until worker 0 resumes
    and journals it; each permit is then booked exactly once, in order."""
    bundle = write_bundle(tmp_path / "bundle", [budget("b", "10", fail_mode="open")])
    journal = tmp_path / "outbox"
    svc = Service(redis_url, bundle, ("--outbox-dir", str(journal), "--store-timeout", "0.5"),
                  log=tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    audit = Audit(redis_url, tmp_path, {"b": 10 * 10**6})
    issuer = svc.worker_pid(0)
    (c0, w0), (c1, w1) = svc.stub(0), svc.stub(1)
    frozen = False
    try:
        redis_server.kill()
        try:
            a0 = w0.Authorize(areq("o-0"), timeout=5)
            a1 = w1.Authorize(areq("o-1"), timeout=5)
            assert a0.degraded and a1.degraded
            for a in (a0, a1):
                audit.answer(a.permit_id, "ALLOW", degraded=True)
            assert _closeout(w1, a0.permit_id).status == pb.CLOSEOUT_STORE_UNAVAILABLE
            os.kill(svc.worker_pid(1), signal.SIGKILL)
            os.kill(issuer, signal.SIGSTOP)
            frozen = True
        finally:
            redis_server.start()
        c1.close()
        svc.wait_worker(1)
        c1, w1 = svc.stub(1)
        s1 = _settle(w1, a1.permit_id)  # the killed worker's, replayed by its restart
        assert (s1.status, s1.actual_cost_micros) == (pb.SETTLED, ONE_CALL)
        for _ in range(5):
            assert _closeout(w1, a0.permit_id).status == pb.CLOSEOUT_PERMIT_PENDING
            assert w1.Void(pb.VoidRequest(permit_id=a0.permit_id),
                           timeout=5).status == pb.VOID_STORE_UNAVAILABLE
            time.sleep(0.2)
        os.kill(issuer, signal.SIGCONT)
        frozen = False
        s0 = _settle(w1, a0.permit_id)
        assert (s0.status, s0.actual_cost_micros, s0.held_micros) == (pb.SETTLED, ONE_CALL, 0)
        again = _closeout(w0, a0.permit_id, usage(10, 10))  # the issuer, other usage
        assert (again.status, again.actual_cost_micros, again.held_micros,
                again.correction_micros) == (pb.ALREADY_SETTLED, ONE_CALL, 0, ONE_CALL)
    finally:
        if frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(issuer, signal.SIGCONT)
        c0.close()
        c1.close()
    assert svc.stop() == 0
    audit.check_all()
    assert next(iter(audit.windows().values())) == (2 * ONE_CALL, 0)
    for a in (a0, a1):
        assert [t for _, t, p, _, _ in audit.stream() if p == a.permit_id] == [
            "decision", "settlement"]


def test_worker_killed_mid_burst_leaves_holds_the_sweepers_end_and_retries_never_hold_twice(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    bundle = write_bundle(tmp_path / "bundle", [budget("b", "1000")],
                          settings={"hold_ttl_seconds": 5})
    svc = Service(redis_url, bundle, ("--store-timeout", "2"), log=tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    audit = Audit(redis_url, tmp_path, {"b": 1000 * 10**6})
    victim = svc.worker_pid(1)

    async def burst() -> tuple[dict[str, Any], dict[str, Any]]:
        (ch0, s0), (ch1, s1) = svc.aio_stub(0), svc.aio_stub(1)
        got: dict[str, Any] = {}
        some_answered = asyncio.Event()

        async def one(rid: str) -> None:
            try:
                got[rid] = await s1.Authorize(areq(rid), timeout=10)
            except grpc.aio.AioRpcError as exc:
                got[rid] = exc.code()
            if len(got) >= 20:
                some_answered.set()

        try:
            tasks = [asyncio.create_task(one(f"k{i}")) for i in range(N)]
            await some_answered.wait()
            os.kill(victim, signal.SIGKILL)  # in the middle of the burst
            await asyncio.gather(*tasks)
            # The callers that got no answer retry on the other worker, same request id.
            retried = {rid: await s0.Authorize(areq(rid), timeout=10)
                       for rid, a in got.items() if not isinstance(a, pb.AuthorizeResponse)}
        finally:
            await ch0.close()
            await ch1.close()
        return got, retried

    got, retried = asyncio.run(burst())
    assert len(got) == N
    for rid, r in retried.items():
        assert r.decision == pb.ALLOW, (rid, r)
    answered = {rid: a for rid, a in got.items() if isinstance(a, pb.AuthorizeResponse)}
    answered.update(retried)
    for r in answered.values():
        audit.answer(r.permit_id, pb.Decision.Name(r.decision))
    audit.wait_no_holds(timeout_s=20)  # every hold ends by expiry, the dead worker's too
    audit.check_all()
    rids = Counter(d["rid"] for _, t, _, d, _ in audit.stream()
                   if t == "decision")
    assert len(rids) == N and set(rids.values()) == {1}, "a request id held twice"
    assert Counter(t for _, t, _, _, _ in audit.stream()) == {"decision": N, "expiry": N}
    assert next(iter(audit.windows().values())) == (0, 0)
    print(f"worker killed mid-burst: {len(retried)} of {N} answers lost, "
          f"{sum(r.replayed for r in retried.values())} retries replayed a hold")
