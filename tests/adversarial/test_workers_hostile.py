"""A hostile caller and a hostile host against `keel-pdp serve --workers 2`: one
permit's calls spread over both workers, Closeouts of one permit racing on both,
workers killed at start, the supervisor killed, SIGTERM with a long drain delay.

Each worker also listens alone (--worker-ports), so a test picks the worker of
every call. Prices (tests/helpers.PRICES): 1,000 input + 100 output tokens of
gpt-4o-mini cost 150 + 60 = 210 micro-USD.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import areq, usage
from tests.adversarial.service import Service, alive
from tests.helpers import budget, write_bundle

ONE_CALL = 210


def _service(redis_url: str, tmp_path: pathlib.Path, services: list[Service],
             *args: str, cap_usd: str = "10") -> tuple[Service, Audit]:
    bundle = write_bundle(tmp_path / "bundle", [budget("b", cap_usd)])
    svc = Service(redis_url, bundle, ("--store-timeout", "2", *args), log=tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    return svc, Audit(redis_url, tmp_path, {"b": int(cap_usd) * 10**6})


def test_one_permit_across_both_workers_holds_once_settles_once_and_books_in_order(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    svc, audit = _service(redis_url, tmp_path, services)
    (c0, w0), (c1, w1) = svc.stub(0), svc.stub(1)
    with c0, c1:
        first = w0.Authorize(areq("r1"), timeout=5)
        again = w1.Authorize(areq("r1"), timeout=5)  # a retry that lands on the other worker
        assert first.decision == pb.ALLOW and not first.replayed
        assert again.replayed and again.permit_id == first.permit_id
        assert next(iter(audit.windows().values())) == (0, ONE_CALL)  # held once
        c = w1.Closeout(pb.CloseoutRequest(permit_id=first.permit_id, usage=usage(),
                                           outcome=pb.SUCCEEDED), timeout=5)
        assert (c.status, c.actual_cost_micros, c.held_micros) == (pb.SETTLED, ONE_CALL,
                                                                    ONE_CALL)
        # The issuing worker's cache still knows the permit as held: the store decides.
        assert w0.Void(pb.VoidRequest(permit_id=first.permit_id),
                       timeout=5).status == pb.NOT_VOIDABLE
        reused = w0.Authorize(areq("r1"), timeout=5)
        assert reused.decision == pb.DENY
        assert reused.block_reasons[0].code == pb.REQUEST_ID_REUSED
        twice = w0.Closeout(pb.CloseoutRequest(permit_id=first.permit_id, usage=usage(5, 5),
                                               outcome=pb.SUCCEEDED), timeout=5)
        assert (twice.status, twice.actual_cost_micros) == (pb.ALREADY_SETTLED, ONE_CALL)
    audit.answer(first.permit_id, "ALLOW")
    audit.answer(reused.permit_id, "DENY")
    audit.check_all()
    events = [(t, p) for _, t, p, _, _ in audit.stream() if p == first.permit_id]
    assert events == [("decision", first.permit_id), ("settlement", first.permit_id)]
    assert next(iter(audit.windows().values())) == (ONE_CALL, 0)


@pytest.mark.parametrize("before", ["held", "voided"])
async def test_two_closeouts_of_one_permit_race_on_two_workers_one_books_both_agree(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service], before: str) -> None:
    """Two Closeouts with different usage, one per worker, at the same time: one is
    booked, the other answers ALREADY_SETTLED with the booked settlement's figures
    (held and correction included: a permit settled after its void held nothing)."""
    svc, audit = _service(redis_url, tmp_path, services)
    (c0, w0), (c1, w1) = svc.aio_stub(0), svc.aio_stub(1)
    won: list[tuple[int, int, int]] = []
    try:
        for i in range(12):
            a = await w0.Authorize(areq(f"race-{before}-{i}"), timeout=5)
            assert a.decision == pb.ALLOW
            audit.answer(a.permit_id, "ALLOW")
            if before == "voided":
                assert (await w1.Void(pb.VoidRequest(permit_id=a.permit_id),
                                      timeout=5)).status == pb.VOIDED
            x, y = await asyncio.gather(
                w0.Closeout(pb.CloseoutRequest(permit_id=a.permit_id, usage=usage(1000, 100),
                                               outcome=pb.SUCCEEDED), timeout=5),
                w1.Closeout(pb.CloseoutRequest(permit_id=a.permit_id, usage=usage(500, 10),
                                               outcome=pb.SUCCEEDED), timeout=5))
            booked = pb.SETTLED if before == "held" else pb.SETTLED_AFTER_VOID
            assert sorted([x.status, y.status]) == sorted([booked, pb.ALREADY_SETTLED]), (x, y)
            figures = {(r.actual_cost_micros, r.held_micros, r.correction_micros,
                        r.estimated_cost_micros) for r in (x, y)}
            assert len(figures) == 1, f"the two answers disagree: {x} / {y}"
            act, held, corr, _ = figures.pop()
            assert act in (ONE_CALL, 75 + 6)  # one of the two usages, never a mix
            assert held == (ONE_CALL if before == "held" else 0) and corr == act - held
            won.append((act, held, corr))
    finally:
        await c0.close()
        await c1.close()
    audit.check_all()
    assert next(iter(audit.windows().values())) == (sum(a for a, _, _ in won), 0)


def test_a_worker_killed_again_and_again_right_after_start_is_restarted_and_the_port_served(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    """The OOM killer or an operator's kill -9 is not a configuration error: the
    supervisor starts the worker again and never stops the healthy one."""
    svc, audit = _service(redis_url, tmp_path, services)
    survivor = svc.worker_pid(0)
    victims: list[int] = []
    permits: list[str] = []
    for _ in range(3):
        # Killed as soon as it exists: well within its first seconds.
        deadline = time.monotonic() + 15
        pid = 0
        while time.monotonic() < deadline and not pid:
            pid = next((p for p in svc.worker_pids() if p != survivor and p not in victims), 0)
            time.sleep(0.02)
        assert pid, "the supervisor did not start the killed worker again"
        os.kill(pid, signal.SIGKILL)
        victims.append(pid)
        assert svc.proc is not None and svc.proc.poll() is None, "the supervisor gave up"
        ch, stub = svc.stub(0)
        with ch:  # the other worker serves throughout
            r = stub.Authorize(areq(f"meanwhile-{len(victims)}"), timeout=5)
        assert r.decision == pb.ALLOW
        permits.append(r.permit_id)
    svc.wait_worker(1)  # and the killed one is back
    assert svc.proc is not None and svc.proc.poll() is None
    assert svc.worker_pid(0) == survivor
    ch, stub = svc.stub(1)
    with ch:
        permits.append(stub.Authorize(areq("after"), timeout=5).permit_id)
        for permit in permits:
            assert stub.Void(pb.VoidRequest(permit_id=permit), timeout=5).status == pb.VOIDED
            audit.answer(permit, "ALLOW")
    assert svc.stop() == 0
    audit.check_all()


def test_supervisor_killed_with_minus_9_leaves_no_worker_serving(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    svc, _ = _service(redis_url, tmp_path, services)
    workers = svc.worker_pids()
    assert len(workers) == 2
    assert svc.proc is not None
    svc.proc.kill()
    svc.proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    assert not left, f"orphaned workers {left} still serve port {svc.port}"
    with grpc.insecure_channel(svc.target) as ch, pytest.raises(grpc.RpcError) as exc:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
    assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_sigterm_with_a_drain_delay_longer_than_the_grace_serves_both_workers_to_the_end(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    """--drain-delay 9 --grace 0.5: calls keep coming to both workers for the first
    7 s after SIGTERM (load balancers move away meanwhile); every one is answered and
    recorded, and the service exits 0."""
    svc, audit = _service(redis_url, tmp_path, services, "--drain-delay", "9", "--grace",
                          "0.5", cap_usd="1000")

    async def load() -> list[Any]:
        chans = [svc.aio_stub(i) for i in range(2)]
        answers: list[Any] = []

        async def one(i: int) -> None:
            try:
                answers.append(await chans[i % 2][1].Authorize(areq(f"d{i}"), timeout=5))
            except grpc.aio.AioRpcError as exc:
                answers.append(exc.code())

        try:
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            i = 0
            while time.monotonic() - t0 < 7.0:
                tasks += [asyncio.create_task(one(i + k)) for k in range(4)]
                i += 4
                await asyncio.sleep(0.25)
            await asyncio.gather(*tasks)
        finally:
            for ch, _ in chans:
                await ch.close()
        return answers

    answers = asyncio.run(load())
    assert svc.proc is not None
    code = svc.proc.wait(30)
    refused = [a for a in answers if not isinstance(a, pb.AuthorizeResponse)]
    assert not refused, f"{len(refused)} of {len(answers)} calls cut during the drain delay"
    assert code == 0
    recorded = {p for _, t, p, _, _ in audit.stream() if t == "decision"}
    assert {a.permit_id for a in answers} <= recorded


def test_reload_policy_on_one_worker_reloads_every_worker(
        redis_url: str, tmp_path: pathlib.Path, services: list[Service]) -> None:
    # An operator cuts a cap through Admin.ReloadPolicy ("same as SIGHUP"); the call
    # lands on one worker. The other must not go on admitting at the old cap until
    # its own reload interval comes round (an hour here).
    token = "reload-admin-token"
    (tmp_path / "admin-token").write_text(token + "\n")
    svc, _ = _service(redis_url, tmp_path, services, "--admin-token-file",
                      str(tmp_path / "admin-token"), "--reload-interval", "3600")
    (c0, _), (c1, w1) = svc.stub(0), svc.stub(1)
    with c0, c1:
        assert w1.Authorize(areq("before"), timeout=5).decision == pb.ALLOW
        write_bundle(tmp_path / "bundle", [budget("b", "0.000100")], revision="test-r2")
        admin = pb_grpc.AdminStub(c0)
        rel = admin.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=10,
                                 metadata=(("authorization", f"Bearer {token}"),))
        assert rel.changed and rel.policy_revision.startswith("test-r2@")
        deadline = time.monotonic() + 10
        while True:
            out = w1.Authorize(areq(f"after-{time.monotonic()}"), timeout=5)
            if out.decision == pb.DENY or time.monotonic() > deadline:
                break
            w1.Void(pb.VoidRequest(permit_id=out.permit_id), timeout=5)
            time.sleep(0.2)
        assert out.decision == pb.DENY, "worker 1 still serves the old cap"
        assert out.policy_revision.startswith("test-r2@")
