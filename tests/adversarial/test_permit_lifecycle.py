"""A hostile or unlucky caller against a real sidecar and a real Redis: replays in
every permit state, concurrent replays, Closeout/Void races, absurd Closeouts.
After each scenario the audit checks the money invariants from outside.

Prices (tests/helpers.PRICES): gpt-4o-mini is $0.15 / $0.60 per million tokens, so
1,000 input + 100 output tokens cost 150 + 60 = 210 micro-USD.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import grpc
import pytest

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import Sidecar, areq, usage
from tests.helpers import budget, write_bundle

ONE_CALL = 210  # micro-USD, see the module docstring


def _setup(tmp_path: pathlib.Path, redis_url: str, sidecars: list[Sidecar], cap_micros: int,
           ttl_s: int = 30, args: tuple[str, ...] = (), **kw: object) -> tuple[Sidecar, Audit]:
    cap = f"{cap_micros / 1_000_000:.6f}"
    bundle = write_bundle(tmp_path / "bundle", [budget("b", cap, **kw)],
                          settings={"hold_ttl_seconds": ttl_s})
    s = Sidecar(redis_url, bundle, args).start()
    sidecars.append(s)
    return s, Audit(redis_url, tmp_path, {"b": cap_micros} if kw.get("mode") != "observe" else {})


def _reused(r: pb.AuthorizeResponse, earlier: str, state: str) -> None:
    assert r.decision == pb.DENY
    assert not r.replayed
    assert r.permit_id != earlier
    assert r.block_reasons[0].code == pb.REQUEST_ID_REUSED
    assert earlier in r.block_reasons[0].message and state in r.block_reasons[0].message


def test_replay_after_void_is_refused_and_cannot_overshoot(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars, 300)  # room for one call
    ch, stub = s.stub()
    with ch:
        r1 = stub.Authorize(areq("r1"), timeout=5)
        assert r1.decision == pb.ALLOW
        assert stub.Void(pb.VoidRequest(permit_id=r1.permit_id), timeout=5).status == pb.VOIDED
        r2 = stub.Authorize(areq("r2"), timeout=5)  # takes the freed headroom
        assert r2.decision == pb.ALLOW
        again = stub.Authorize(areq("r1"), timeout=5)
        _reused(again, r1.permit_id, "voided")
        # Even a caller that ignores the answer cannot ride on r1's permit unseen: its
        # closeout is booked as a late settlement after void, with nothing held.
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(),
                                             outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED_AFTER_VOID
        assert (c.held_micros, c.correction_micros) == (0, ONE_CALL)
        stub.Closeout(pb.CloseoutRequest(permit_id=r2.permit_id, usage=usage(),
                                         outcome=pb.SUCCEEDED), timeout=5)
    audit.answer(r1.permit_id, "ALLOW")
    audit.answer(r2.permit_id, "ALLOW")
    audit.answer(again.permit_id, "DENY")
    audit.check_all()


def test_replay_after_settle_is_refused(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars, 1_000_000)
    ch, stub = s.stub()
    with ch:
        r1 = stub.Authorize(areq("r1"), timeout=5)
        retry = stub.Authorize(areq("r1"), timeout=5)  # a true retry while held
        assert retry.replayed and retry.permit_id == r1.permit_id
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(),
                                             outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED
        again = stub.Authorize(areq("r1"), timeout=5)
        _reused(again, r1.permit_id, "settled")
    audit.answer(r1.permit_id, "ALLOW")
    audit.answer(again.permit_id, "DENY")
    audit.check_all()


def test_replay_after_expiry_is_refused_even_before_the_sweeper_ran(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    # No sweep for a minute: the hold is past its time but still recorded as held.
    s, audit = _setup(tmp_path, redis_url, sidecars, 1_000_000, ttl_s=5,
                      args=("--sweep-interval", "60"))
    ch, stub = s.stub()
    with ch:
        r1 = stub.Authorize(areq("r1"), timeout=5)
        time.sleep(5.1)
        assert audit.permit_state(r1.permit_id) == "held"
        again = stub.Authorize(areq("r1"), timeout=5)
        _reused(again, r1.permit_id, "expired")
    s.kill()
    swept = Sidecar(redis_url, s.bundle).start()  # sweeps every 0.2 s
    sidecars.append(swept)
    audit.wait_no_holds()
    ch, stub = swept.stub()
    with ch:
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(),
                                             outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED_AFTER_EXPIRY
        assert (c.held_micros, c.correction_micros) == (0, ONE_CALL)
    audit.answer(r1.permit_id, "ALLOW")
    audit.answer(again.permit_id, "DENY")
    audit.check_all()


async def test_concurrent_replays_share_one_hold_and_races_end_it_once(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars, 1_000_000)
    s2 = Sidecar(redis_url, s.bundle).start()
    sidecars.append(s2)
    chans: list[Any] = [grpc.aio.insecure_channel(x.target) for x in (s, s2)]
    stubs: list[Any] = [pb_grpc.PolicyDecisionPointStub(ch) for ch in chans]
    try:
        for n in range(5):
            outs = await asyncio.gather(*(stubs[i % 2].Authorize(areq(f"c{n}"), timeout=5)
                                          for i in range(20)))
            pids = {o.permit_id for o in outs}
            assert len(pids) == 1 and all(o.decision == pb.ALLOW for o in outs)
            pid = pids.pop()
            audit.answer(pid, "ALLOW")
            close = stubs[0].Closeout(pb.CloseoutRequest(permit_id=pid, usage=usage(),
                                                         outcome=pb.SUCCEEDED), timeout=5)
            void = stubs[1].Void(pb.VoidRequest(permit_id=pid), timeout=5)
            c, v = await asyncio.gather(close, void)
            # Exactly one of them ended the hold; the other saw the end.
            assert (c.status, v.status) in ((pb.SETTLED, pb.NOT_VOIDABLE),
                                            (pb.SETTLED_AFTER_VOID, pb.VOIDED))
            late = await stubs[n % 2].Authorize(areq(f"c{n}"), timeout=5)
            assert late.decision == pb.DENY and late.block_reasons[0].code == pb.REQUEST_ID_REUSED
            audit.answer(late.permit_id, "DENY")
    finally:
        for ch in chans:
            await ch.close()
    figures = audit.check_all()
    assert figures["settled"] == 5 * ONE_CALL


def test_absurd_closeout_is_refused_and_books_nothing(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars, 1_000_000)
    ch, stub = s.stub()
    with ch:
        r1 = stub.Authorize(areq("r1"), timeout=5)
        before = audit.windows()
        for bad, field in ((pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(),
                                               outcome=pb.SUCCEEDED,
                                               provider_cost_micros=10**12),
                            "provider_cost_micros"),
                           (pb.CloseoutRequest(permit_id=r1.permit_id,
                                               usage=usage(out=2_000_000),
                                               outcome=pb.SUCCEEDED), "usage.output_tokens")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Closeout(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in str(err.value.details()) and "nothing was booked" in str(
                err.value.details())
            assert audit.windows() == before
            assert audit.permit_state(r1.permit_id) == "held"
        # The permit is still usable for its true usage.
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(),
                                             outcome=pb.SUCCEEDED), timeout=5)
        assert c.status == pb.SETTLED and c.actual_cost_micros == ONE_CALL and not c.flags
    assert 'keel_pdp_closeout_implausible_total{field="provider_cost_micros"} 1.0' in s.metrics()
    audit.answer(r1.permit_id, "ALLOW")
    audit.check_all()


def test_plausible_overrun_is_booked_flagged_counted_and_reported(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars, 1_000_000)
    ch, stub = s.stub()
    with ch:
        r1 = stub.Authorize(areq("r1", out=100), timeout=5)
        # 250 output tokens on a permit capped at 100: above the permit, within the
        # tolerance (150 + 250 * 0.6 = 300 micro-USD against a 210 hold).
        c = stub.Closeout(pb.CloseoutRequest(permit_id=r1.permit_id, usage=usage(out=250),
                                             outcome=pb.SUCCEEDED), timeout=5)
    assert c.status == pb.SETTLED
    assert (c.actual_cost_micros, c.held_micros, c.correction_micros) == (300, 210, 90)
    assert {f.code for f in c.flags} == {pb.USAGE_ABOVE_PERMIT, pb.COST_ABOVE_HOLD}
    metrics = s.metrics()
    assert 'keel_pdp_closeout_overruns_total{flag="USAGE_ABOVE_PERMIT"} 1.0' in metrics
    audit.answer(r1.permit_id, "ALLOW")
    audit.check_all()
    from keel_pdp.ledger.report import build_report
    from keel_pdp.ledger.store import LedgerStore

    store = LedgerStore(f"sqlite:///{tmp_path / 'audit-ledger.db'}")
    period = time.strftime("%Y-%m", time.gmtime())
    report = build_report(store, period, ["tenant"])
    store.close()
    assert [(o.permit_id, o.actual_micros, set(o.flags)) for o in report.overruns] == [
        (r1.permit_id, 300, {"USAGE_ABOVE_PERMIT", "COST_ABOVE_HOLD"})]
