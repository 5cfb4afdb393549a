"""The exception workflow over fakeredis and a real Redis: genuine denials from the
real engine, requests, approvals that the hold script applies, refusals, and every
hostile caller we could think of."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.grants import GrantForbidden
from keel_pdp.ledger.events import parse_entry
from keel_pdp.overage.workflow import (
    ExceptionAsk,
    ExceptionConflict,
    ExceptionDesk,
    NotADenial,
    UnknownException,
)
from keel_pdp.policy.snapshot import PolicySnapshot
from tests.helpers import budget, make_engine, read_stream, write_bundle

STREAM = "t:{pdp}:events"
# gpt-4.1 at $2 / $8 per million tokens: 1000 in + 500 out = $0.002 + $0.004.
ONE_CALL_MICROS = 1000 * 2 + 500 * 8


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    bundle = write_bundle(
        tmp_path / "b",
        [budget("acme", "0.006000", scope={"tenant": "acme"}, exception_path="finance-overage"),
         budget("per-tenant", "0.006000", per=["tenant"], scope={"tenant": "globex"},
                exception_path="platform-burst"),
         budget("no-path", "0.006000", scope={"tenant": "initech"})],
        exception_paths=[{"name": "finance-overage", "approver_role": "finance-owner",
                          "max_overage_usd": "10.00", "max_duration_hours": 24},
                         {"name": "platform-burst", "approver_role": "platform-lead",
                          "max_overage_usd": "1.00", "max_duration_hours": 2}],
        settings={"allow_constrain": False},
        routes=[{"id": "locked", "scope": {"workload": "locked"},
                 "allowed_models": ["openai/gpt-4o-mini"]}])
    return make_engine(aio_client, bundle)


def call(rid: str, tenant: str = "acme", workload: str = "chat") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, "gpt-4.1", "openai", 1000, 500)


def snap(engine: Engine) -> PolicySnapshot:
    s = engine.policies.current
    assert s is not None
    return s


async def denial(engine: Engine, tenant: str = "acme") -> str:
    """Spend the budget with one call, then return the permit id of a denial."""
    first = await engine.authorize(call(f"{tenant}-fill", tenant))
    assert first.decision is DecisionKind.ALLOW
    out = await engine.authorize(call(f"{tenant}-denied", tenant))
    assert out.decision is DecisionKind.DENY
    assert out.reasons[0].code is Code.BUDGET_EXHAUSTED
    return out.permit_id


def asking(pid: str, **kw: Any) -> ExceptionAsk:
    base: dict[str, Any] = dict(
        denial_permit_id=pid, budget_id="acme", scope=(), amount_micros=2_000_000,
        duration_seconds=3600, justification="Launch week traffic, ticket FIN-42",
        requester="olivia")
    base.update(kw)
    return ExceptionAsk(**base)


async def stream(engine: Engine) -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(type, data, res, pid) of every stream entry, each checked by the ledger's parser."""
    raw: Any = await read_stream(engine.store.client, STREAM)
    out = []
    for eid, f in raw:
        parse_entry(eid.decode(), f)  # the ledger accepts every entry we wrote
        out.append((f[b"type"].decode(), json.loads(f[b"data"]), json.loads(f[b"res"]),
                    f[b"pid"].decode()))
    return out


async def test_approved_request_is_a_grant_the_next_decision_uses(engine: Engine) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    assert asked.state == "pending" and asked.changed and asked.denial_seen
    assert (asked.exception_path, asked.approver_role) == ("finance-overage", "finance-owner")
    # Pending grants nothing: the same call is still denied.
    assert (await engine.authorize(call("while-pending"))).decision is DecisionKind.DENY

    done = await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                             "finance-owner", "ok for launch week")
    assert done.state == "approved" and done.changed and done.decided_by == "dana"
    assert done.grant_expires_at_ms == done.decided_at_ms + 3600 * 1000
    after = await engine.authorize(call("after-approval"))
    assert after.decision is DecisionKind.ALLOW
    assert Code.EXCEPTION_GRANT_APPLIED in [r.code for r in after.reasons]
    # $2 of headroom on top of the $0.006 cap: exactly 2_000_000 // 6_000 more calls fit,
    # counting the one just made.
    fits = 2_000_000 // ONE_CALL_MICROS
    for i in range(fits - 1):
        assert (await engine.authorize(call(f"more-{i}"))).decision is DecisionKind.ALLOW
    assert (await engine.authorize(call("one-too-many"))).decision is DecisionKind.DENY

    steps = [(t, r.get("st"), p) for t, _, r, p in await stream(engine)
             if t in ("exception", "grant")]
    assert steps == [("exception", "PENDING", pid), ("exception", "APPROVED", pid),
                     ("grant", None, done.grant_id)]
    grant = next(d for t, d, _, _ in await stream(engine) if t == "grant")
    assert grant["exc"] == asked.exception_id and grant["denial"] == pid
    assert grant["amount"] == 2_000_000 and grant["approver"] == "dana"


async def test_a_retry_changes_nothing_and_a_second_decision_is_refused(
        engine: Engine) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    again = await desk.request(snap(engine), asking(pid))
    assert again.exception_id == asked.exception_id and not again.changed
    with pytest.raises(ExceptionConflict, match="already requested"):
        await desk.request(snap(engine), asking(pid, amount_micros=3_000_000))

    first = await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                              "finance-owner")
    retry = await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                              "finance-owner")
    assert retry.state == "approved" and not retry.changed
    assert retry.grant_id == first.grant_id
    with pytest.raises(ExceptionConflict, match="already approved by dana"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "erin", "finance-owner")
    with pytest.raises(ExceptionConflict, match="already approved"):
        await desk.decide(snap(engine), asked.exception_id, "reject", "erin", "finance-owner",
                          "changed my mind")
    grants: Any = await engine.store.client.hgetall(
        engine.store.keys.grants("acme", ()))
    assert list(grants) == [first.grant_id.encode()]  # one grant, not two
    types = [(t, r.get("st")) for t, _, r, _ in await stream(engine)]
    assert types.count(("exception", "APPROVED")) == 1
    assert types.count(("exception", "PENDING")) == 1
    assert sum(1 for t, _ in types if t == "grant") == 1


async def test_wrong_role_self_approval_and_unknown_ids_are_refused(engine: Engine) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    with pytest.raises(GrantForbidden, match="decided by role 'finance-owner', not 'intern'"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "ivan", "intern")
    with pytest.raises(GrantForbidden, match="olivia requested"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "Olivia",
                          "finance-owner")
    with pytest.raises(UnknownException):
        await desk.decide(snap(engine), "exc_000000000000000000000000", "approve", "dana",
                          "finance-owner")
    with pytest.raises(UnknownException):
        await desk.decide(snap(engine), "../../etc/passwd", "approve", "dana", "finance-owner")
    with pytest.raises(InvalidRequest, match="approver is required"):
        await desk.decide(snap(engine), asked.exception_id, "approve", " ", "finance-owner")
    with pytest.raises(InvalidRequest, match="refusal needs a note"):
        await desk.decide(snap(engine), asked.exception_id, "reject", "dana", "finance-owner")
    # None of that changed the request.
    still = await desk.get(asked.exception_id)
    assert still is not None and still.state == "pending"
    assert [t for t, _, _, _ in await stream(engine)].count("grant") == 0


async def test_refusal_is_recorded_and_grants_nothing(engine: Engine) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    no = await desk.decide(snap(engine), asked.exception_id, "reject", "dana", "finance-owner",
                           "use the batch tier instead")
    assert no.state == "rejected" and no.decision_note == "use the batch tier instead"
    assert (await engine.authorize(call("after-refusal"))).decision is DecisionKind.DENY
    with pytest.raises(ExceptionConflict, match="already rejected"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "dana", "finance-owner")
    again = await desk.decide(snap(engine), asked.exception_id, "reject", "dana",
                              "finance-owner", "use the batch tier instead")
    assert not again.changed
    steps = [(t, r.get("st")) for t, _, r, _ in await stream(engine) if t == "exception"]
    assert steps == [("exception", "PENDING"), ("exception", "REJECTED")]


async def test_an_expired_request_cannot_be_approved_and_its_expiry_is_recorded_once(
        engine: Engine) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store, pending_seconds=60)
    asked = await desk.request(snap(engine), asking(pid))
    late = asked.pending_until_ms + 1
    listed = await desk.list(now_ms=late)
    assert [v.state for v in listed] == ["expired"]
    # The listing put the expiry on the ledger; listing again adds nothing.
    await desk.list(now_ms=late + 1)
    steps = [r.get("st") for t, _, r, _ in await stream(engine) if t == "exception"]
    assert steps == ["PENDING", "EXPIRED"]
    for _ in range(2):
        with pytest.raises(ExceptionConflict, match="expired"):
            await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                              "finance-owner", now_ms=late)
    steps = [r.get("st") for t, _, r, _ in await stream(engine) if t == "exception"]
    assert steps == ["PENDING", "EXPIRED"]
    assert (await engine.authorize(call("after-expiry"))).decision is DecisionKind.DENY


async def test_the_exception_paths_limits_hold_at_request_and_at_approval(
        engine: Engine, tmp_path: pathlib.Path) -> None:
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    with pytest.raises(InvalidRequest, match="exceeds the maximum overage"):
        await desk.request(snap(engine), asking(pid, amount_micros=10_000_001))
    with pytest.raises(InvalidRequest, match="duration_seconds must be between 1 and 86400"):
        await desk.request(snap(engine), asking(pid, duration_seconds=86_401))
    for bad in (0, -5):
        with pytest.raises(InvalidRequest, match="amount_micros must be positive"):
            await desk.request(snap(engine), asking(pid, amount_micros=bad))
    with pytest.raises(InvalidRequest, match="justification is required"):
        await desk.request(snap(engine), asking(pid, justification="pls"))
    with pytest.raises(InvalidRequest, match="requester is required"):
        await desk.request(snap(engine), asking(pid, requester=""))
    with pytest.raises(InvalidRequest, match="requester is longer than 200"):
        await desk.request(snap(engine), asking(pid, requester="x" * 201))
    with pytest.raises(InvalidRequest, match="justification is longer than 2000"):
        await desk.request(snap(engine), asking(pid, justification="why " * 1000))
    for absurd in (2**62, 10**18):
        with pytest.raises(InvalidRequest, match="exceeds the maximum overage"):
            await desk.request(snap(engine), asking(pid, amount_micros=absurd))
    with pytest.raises(InvalidRequest, match="duration_seconds must be between"):
        await desk.request(snap(engine), asking(pid, duration_seconds=-1))
    with pytest.raises(InvalidRequest, match="must not be '\\*'"):
        await desk.request(snap(engine), asking(pid, budget_id="per-tenant",
                                                scope=(("tenant", "*"),), amount_micros=1))
    asked = await desk.request(snap(engine), asking(pid, amount_micros=9_000_000))
    # Finance lowers the path's maximum before anyone approves: the approval is
    # checked against the policy in force then.
    lowered = write_bundle(
        tmp_path / "lowered",
        [budget("acme", "0.006000", scope={"tenant": "acme"}, exception_path="finance-overage")],
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "5.00"}])
    from keel_pdp.policy.loader import load_bundle

    with pytest.raises(InvalidRequest, match="exceeds the maximum overage"):
        await desk.decide(load_bundle(lowered), asked.exception_id, "approve", "dana",
                          "finance-owner")
    assert [t for t, _, _, _ in await stream(engine)].count("grant") == 0


async def test_only_a_budget_denial_of_that_budget_can_ask(engine: Engine) -> None:
    desk = ExceptionDesk(engine.store)
    allowed = await engine.authorize(call("fine", "acme"))
    assert allowed.decision is DecisionKind.ALLOW
    with pytest.raises(NotADenial, match="was allowed"):
        await desk.request(snap(engine), asking(allowed.permit_id))
    routed = await engine.authorize(call("locked-model", "acme", workload="locked"))
    assert routed.decision is DecisionKind.DENY
    with pytest.raises(NotADenial, match="MODEL_NOT_ALLOWED"):
        await desk.request(snap(engine), asking(routed.permit_id))
    pid = await denial(engine, "globex")
    with pytest.raises(NotADenial, match="not decided against budget acme"):
        await desk.request(snap(engine), asking(pid))
    with pytest.raises(InvalidRequest, match="scope must give exactly"):
        await desk.request(snap(engine), asking(pid, budget_id="per-tenant",
                                                amount_micros=500_000))
    with pytest.raises(NotADenial, match=r"not decided against budget per-tenant with scope "
                                         r"\['acme'\]"):
        await desk.request(snap(engine), asking(pid, budget_id="per-tenant",
                                                scope=(("tenant", "acme"),),
                                                amount_micros=500_000))
    ok = await desk.request(snap(engine), asking(pid, budget_id="per-tenant",
                                                 scope=(("tenant", "globex"),),
                                                 amount_micros=500_000))
    assert ok.state == "pending" and ok.approver_role == "platform-lead"
    no_path = await denial(engine, "initech")
    with pytest.raises(NotADenial, match="no exception path"):
        await desk.request(snap(engine), asking(no_path, budget_id="no-path"))
    with pytest.raises(InvalidRequest, match="not a budget of policy"):
        await desk.request(snap(engine), asking(pid, budget_id="ghost"))
    for bogus in ("", "pmt_nothex", "pmt_" + "0" * 27, "x" * 5000):
        with pytest.raises(InvalidRequest, match="not a Keel permit id"):
            await desk.request(snap(engine), asking(bogus))
    future = f"pmt_{(2**47):012x}" + "0" * 16
    with pytest.raises(InvalidRequest, match="issued in the future"):
        await desk.request(snap(engine), asking(future))
    ancient = f"pmt_{1_000_000_000_000:012x}" + "0" * 16
    with pytest.raises(InvalidRequest, match="older than 31 days"):
        await desk.request(snap(engine), asking(ancient))


async def test_a_denial_already_trimmed_from_the_stream_can_still_ask(engine: Engine) -> None:
    pid = await denial(engine)
    await engine.store.client.delete(STREAM)  # the ledger writer stored and trimmed it
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    assert asked.state == "pending" and not asked.denial_seen


async def test_list_filters_by_state_and_budget_newest_first(engine: Engine) -> None:
    desk = ExceptionDesk(engine.store)
    acme = await desk.request(snap(engine), asking(await denial(engine)), now_ms=None)
    globex_pid = await denial(engine, "globex")
    globex = await desk.request(snap(engine), asking(
        globex_pid, budget_id="per-tenant", scope=(("tenant", "globex"),),
        amount_micros=100_000), now_ms=acme.requested_at_ms + 5)
    await desk.decide(snap(engine), acme.exception_id, "reject", "dana", "finance-owner",
                      "not this quarter")
    everything = await desk.list()
    assert [v.exception_id for v in everything] == [globex.exception_id, acme.exception_id]
    assert [v.exception_id for v in await desk.list(state="pending")] == [globex.exception_id]
    assert [v.exception_id for v in await desk.list(state="rejected")] == [acme.exception_id]
    assert [v.exception_id for v in await desk.list(budget_id="acme")] == [acme.exception_id]
    assert len(await desk.list(limit=1)) == 1
    with pytest.raises(InvalidRequest, match="state must be one of"):
        await desk.list(state="approvedish")
    # A record past its retention disappears from the list (and from the index).
    await engine.store.client.delete(desk.record_key(acme.exception_id))
    assert [v.exception_id for v in await desk.list()] == [globex.exception_id]
    assert await engine.store.client.zcard(desk.index_key) == 1


async def test_racing_approvers_make_exactly_one_grant(engine: Engine) -> None:
    import asyncio

    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))

    async def approve(who: str) -> str:
        try:
            v = await desk.decide(snap(engine), asked.exception_id, "approve", who,
                                  "finance-owner")
            return f"ok:{v.decided_by}:{v.changed}"
        except ExceptionConflict:
            return "conflict"

    results = await asyncio.gather(*(approve(f"approver-{i}") for i in range(8)))
    winners = [r for r in results if r.startswith("ok") and r.endswith("True")]
    assert len(winners) == 1 and results.count("conflict") == 7
    grants: Any = await engine.store.client.hgetall(engine.store.keys.grants("acme", ()))
    assert len(grants) == 1
    assert [t for t, _, _, _ in await stream(engine)].count("grant") == 1


def test_identities_bind_roles() -> None:
    from keel_pdp.server.admin import parse_identities

    got = parse_identities(("fin-bot=finance-owner", "ops", "fin-bot=platform-lead",
                            " ops = ", "=orphan", "both=finance-owner", "both"))
    assert got == {"fin-bot": frozenset({"finance-owner", "platform-lead"}), "ops": None,
                   "both": None}


async def test_an_unreachable_store_is_a_clear_error_and_records_nothing(
        engine: Engine) -> None:
    from keel_pdp.budget.keys import KeySpace
    from keel_pdp.budget.status import StatusReader
    from keel_pdp.budget.store import BudgetStore, StoreUnavailable
    from tests.conftest import free_port

    pid = await denial(engine)
    down = BudgetStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="t",
                                timeout_s=0.2)
    assert isinstance(down.keys, KeySpace)
    desk = ExceptionDesk(down, timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await desk.request(snap(engine), asking(pid))
        with pytest.raises(StoreUnavailable):
            await desk.decide(snap(engine), "exc_000000000000000000000000", "approve", "dana",
                              "finance-owner")
        with pytest.raises(StoreUnavailable):
            await desk.list()
        with pytest.raises(StoreUnavailable):
            await StatusReader(down, timeout_s=0.5).status(snap(engine))
    finally:
        await down.close()
    assert [t for t, _, _, _ in await stream(engine)].count("exception") == 0


async def test_a_grant_on_a_two_dimension_counter_reaches_the_hold_script(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    # per lists workload before tenant: the counter's key (and its grants) follow
    # that order, not the alphabetical one.
    bundle = write_bundle(
        tmp_path / "two",
        [budget("pair", "0.006000", per=["workload", "tenant"],
                exception_path="finance-overage")],
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "1.00"}],
        settings={"allow_constrain": False})
    engine = make_engine(aio_client, bundle)
    pid = await denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(
        pid, budget_id="pair", scope=(("tenant", "acme"), ("workload", "chat")),
        amount_micros=ONE_CALL_MICROS))
    assert asked.split == ("chat", "acme")
    await desk.decide(snap(engine), asked.exception_id, "approve", "dana", "finance-owner")
    assert (await engine.authorize(call("granted"))).decision is DecisionKind.ALLOW
    assert (await engine.authorize(call("spent"))).decision is DecisionKind.DENY
    # Another workload of the same tenant is a different counter: not raised.
    other = await engine.authorize(call("other-fill", workload="search"))
    assert other.decision is DecisionKind.ALLOW
    assert (await engine.authorize(call("other", workload="search"))).decision is \
        DecisionKind.DENY


async def test_a_denial_whose_shape_copy_is_gone_is_refused_by_name(
        engine: Engine, aio_client: aioredis.Redis) -> None:
    """The denial's decision event refers to a stored copy of its budgets: with the
    copy deleted, the request is refused naming it, and nothing is recorded."""
    desk = ExceptionDesk(engine.store)
    pid = await denial(engine)
    copies = [k async for k in aio_client.scan_iter(match="t:{pdp}:shape:*")]
    assert copies
    await aio_client.delete(*copies)
    with pytest.raises(NotADenial, match=r"cannot be read: .*t:\{pdp\}:shape:.*not in Redis"):
        await desk.request(snap(engine), asking(pid))
    assert [k async for k in aio_client.scan_iter(match="t:{pdp}:exc*")] == []
