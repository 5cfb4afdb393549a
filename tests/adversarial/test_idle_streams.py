"""Idle, half-open and half-sent streams from a hostile client, while real callers
spend against a tight budget on the same sidecar (real process, real Redis).

The hostile client (a raw HTTP/2 client, tests/integration/test_availability_idle.py)
keeps 300 streams open that never complete a request: headers only, headers and
half a gRPC message, and one connection whose header block never ends. It re-opens
them as the sidecar ends them, for the length of the run. The real callers must
all be answered (never RESOURCE_EXHAUSTED with --max-concurrent-rpcs 64), and the
money invariants hold afterwards (tests/adversarial/audit.py). Bounded: the run
lasts a few seconds and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import Sidecar, areq, usage
from tests.helpers import budget, write_bundle
from tests.integration.test_availability_idle import AUTHORIZE, RawH2, grpc_message

CLOSEOUT = "/keel.pdp.v1.PolicyDecisionPoint/Closeout"
VOID = "/keel.pdp.v1.PolicyDecisionPoint/Void"
ONE_CALL = 210  # gpt-4o-mini: 1,000 input + 100 output tokens, micro-USD
CAP = 40 * ONE_CALL
RUN_S = 4.0


async def _hostile(port: int, stop: threading.Event, totals: dict[str, int]) -> None:
    """Keep ~300 never-finished streams open until ``stop``."""
    conns: list[RawH2] = []
    # One connection whose header block never ends: HTTP/2 allows nothing else on
    # it until a CONTINUATION, so only this connection is stuck.
    stuck = RawH2("127.0.0.1", port)
    await stuck.connect()
    stuck.open_stream(AUTHORIZE, end_headers=False)
    await stuck.flush()
    try:
        for _ in range(6):
            c = RawH2("127.0.0.1", port)
            await c.connect()
            conns.append(c)
        half = grpc_message(areq("never-finished").SerializeToString())
        kinds = (AUTHORIZE, CLOSEOUT, VOID)
        while not stop.is_set():
            for i, c in enumerate(conns):
                while c.still_open < 50 and not c.goaway:
                    sid = c.open_stream(kinds[totals["opened"] % 3])
                    if i % 2:  # half a message: the length prefix promises more
                        c.send(sid, half[: len(half) // 2], end=False)
                    totals["opened"] += 1
                await c.flush()
            await asyncio.sleep(0.05)
        totals["ended_by_sidecar"] = sum(len(c.ended) for c in conns)
        totals["refused_per_connection"] = sum(len(c.refused) for c in conns)
    finally:
        for c in [stuck, *conns]:
            await c.close()


def _real_callers(s: Sidecar, audit: Audit, stop: threading.Event, n_threads: int,
                  results: dict[str, int], lock: threading.Lock) -> list[threading.Thread]:
    def run(t: int) -> None:
        ch, stub = s.stub()
        i = 0
        with ch:
            while not stop.is_set():
                i += 1
                rid = f"real-{t}-{i}"
                try:
                    r = stub.Authorize(areq(rid), timeout=5)
                except grpc.RpcError as exc:
                    with lock:
                        results[f"authorize {exc.code().name}"] = \
                            results.get(f"authorize {exc.code().name}", 0) + 1
                    continue
                name = pb.Decision.Name(r.decision)
                with lock:
                    audit.answer(r.permit_id, name, r.degraded, rid)
                    results[name] = results.get(name, 0) + 1
                if r.decision == pb.DENY:
                    continue
                try:
                    if i % 3:
                        c = stub.Closeout(pb.CloseoutRequest(
                            permit_id=r.permit_id, usage=usage(), outcome=pb.SUCCEEDED),
                            timeout=5)
                        key = pb.CloseoutStatus.Name(c.status)
                    else:
                        v = stub.Void(pb.VoidRequest(permit_id=r.permit_id), timeout=5)
                        key = pb.VoidStatus.Name(v.status)
                except grpc.RpcError as exc:
                    key = f"settle {exc.code().name}"
                with lock:
                    results[key] = results.get(key, 0) + 1

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    return threads


def test_never_finished_streams_do_not_starve_real_callers_and_money_stays_right(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    bundle = write_bundle(tmp_path / "bundle",
                          [budget("b", f"{CAP / 1_000_000:.6f}", fail_mode="closed")],
                          settings={"hold_ttl_seconds": 30})
    s = Sidecar(redis_url, bundle, ("--max-concurrent-rpcs", "64")).start()
    sidecars.append(s)
    audit = Audit(redis_url, tmp_path, {"b": CAP})
    stop = threading.Event()
    totals = {"opened": 0}
    hostile = threading.Thread(target=lambda: asyncio.run(_hostile(s.port, stop, totals)),
                               daemon=True)
    hostile.start()
    time.sleep(0.5)  # the idle streams are in place before the real callers start
    results: dict[str, int] = {}
    lock = threading.Lock()
    callers = _real_callers(s, audit, stop, 4, results, lock)
    health_answers: list[str] = []
    ch, _ = s.stub()
    with ch:
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                health_answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as exc:
                health_answers.append(exc.code().name)
            time.sleep(0.1)
    stop.set()
    for th in [*callers, hostile]:
        th.join(20)
        assert not th.is_alive()

    assert not any(k.startswith(("authorize", "settle")) for k in results), results
    assert results.get("ALLOW", 0) >= 40  # the cap was reached and passed through voids
    assert results.get("DENY", 0) >= 1  # ... and then enforced
    assert set(health_answers) == {"SERVING"}, health_answers
    # The hostile client kept the pressure on: more streams than the limit, ended by
    # the sidecar (first-message timeout, idle cap) or refused per connection.
    assert totals["opened"] >= 300, totals
    assert totals["ended_by_sidecar"] >= 300 - 64, totals
    text = s.metrics()
    assert "keel_pdp_idle_streams_closed_total" in text
    audit.wait_no_holds()
    figures = audit.check_all()
    # Nothing the hostile client sent was decided or recorded: every decision event
    # is a real caller's (the audit has matched them to the answers).
    rids = {str(e[3].get("rid", "")) for e in audit.stream() if e[1] == "decision"}
    assert rids and all(r.startswith("real-") for r in rids), sorted(rids)[:5]
    print(f"idle streams: {totals}; real callers: {results}; "
          f"health checks: {len(health_answers)}; audit: {figures}, checks {audit.checks}")
