"""The exception workflow against a hostile requester and approver: an exception
asked on a budget that did not deny the call, a request hidden from the period
report by a denial dated just past the period's end, an approval reported as
pending because another sidecar's clock stamped it first, absurd amounts and
durations on the command line, and the attacks that held (double approval,
approve against reject, approval after expiry, replays with other amounts).

Expected figures are worked out here from the bundle's decimal strings, not
read back from the product."""

from __future__ import annotations

import asyncio
import json
import pathlib
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.periods import bounds_ms, period_of_ms
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.sections import DENIAL_LEAD_MS
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.overage.workflow import (
    FUTURE_SLACK_MS,
    ExceptionAsk,
    ExceptionConflict,
    ExceptionDesk,
    NotADenial,
)
from keel_pdp.policy.snapshot import PolicySnapshot
from tests.helpers import budget, make_engine, read_stream, write_bundle

STREAM = "t:{pdp}:events"
# gpt-4.1 at $2 / $8 per million tokens: 1000 in + 500 out holds $0.002 + $0.004.
ONE_CALL_MICROS = 1000 * 2 + 500 * 8
DAILY_CAP_MICROS = 6_000  # "0.006000"


def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    """acme spends from a small daily budget (finance decides its exceptions) and a
    large monthly one that a team lead may raise by much more."""
    return write_bundle(
        tmp_path / "b",
        [budget("acme-daily", "0.006000", scope={"tenant": "acme"},
                exception_path="finance-overage"),
         budget("acme-monthly", "100.00", window="monthly", scope={"tenant": "acme"},
                exception_path="team-burst")],
        exception_paths=[{"name": "finance-overage", "approver_role": "finance-owner",
                          "max_overage_usd": "10.00", "max_duration_hours": 24},
                         {"name": "team-burst", "approver_role": "team-lead",
                          "max_overage_usd": "5000.00", "max_duration_hours": 168}],
        settings={"allow_constrain": False})


@pytest.fixture
def engine(aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> Engine:
    return make_engine(aio_client, bundle(tmp_path))


def call(rid: str) -> AuthorizeInput:
    return AuthorizeInput(rid, "acme", "chat", "gpt-4.1", "openai", 1000, 500)


def snap(engine: Engine) -> PolicySnapshot:
    s = engine.policies.current
    assert s is not None
    return s


def asking(pid: str, budget_id: str = "acme-daily", **kw: Any) -> ExceptionAsk:
    base: dict[str, Any] = dict(
        denial_permit_id=pid, budget_id=budget_id, scope=(), amount_micros=2_000_000,
        duration_seconds=3600, justification="Launch week traffic, ticket FIN-42",
        requester="olivia")
    base.update(kw)
    return ExceptionAsk(**base)


async def daily_denial(engine: Engine, tag: str = "") -> str:
    """One call spends the daily cap exactly; the next is denied by it."""
    assert ONE_CALL_MICROS == DAILY_CAP_MICROS
    fill = await engine.authorize(call(f"fill{tag}"))
    assert fill.decision is DecisionKind.ALLOW
    out = await engine.authorize(call(f"denied{tag}"))
    assert out.decision is DecisionKind.DENY
    assert [r.budget_id for r in out.reasons[:1]] == ["acme-daily"]
    return out.permit_id


async def steps(engine: Engine) -> list[tuple[str, str]]:
    raw: Any = await read_stream(engine.store.client, STREAM)
    out = []
    for eid, f in raw:
        parse_entry(eid.decode(), f)
        if f[b"type"] in (b"exception", b"grant"):
            out.append((f[b"type"].decode(), str(json.loads(f[b"res"]).get("st", ""))))
    return out


async def test_an_exception_cannot_be_asked_on_a_budget_the_call_fitted_in(
        engine: Engine) -> None:
    # The denial names acme-daily (finance decides); the call fitted in acme-monthly,
    # which was checked too. Asking on acme-monthly would let a team lead raise a
    # $100 budget by up to $5,000 on the strength of a denial it did not make.
    pid = await daily_denial(engine)
    desk = ExceptionDesk(engine.store)
    with pytest.raises(NotADenial, match=r"decided by budget acme-daily .*not by budget "
                                         r"acme-monthly"):
        await desk.request(snap(engine), asking(pid, "acme-monthly",
                                                amount_micros=4_000_000_000))
    assert await steps(engine) == []  # nothing recorded, nothing to approve
    assert await desk.list() == []
    # The budget the block reason names can be asked on, as documented.
    ok = await desk.request(snap(engine), asking(pid))
    assert ok.state == "pending" and ok.denial_seen and ok.approver_role == "finance-owner"
    assert await steps(engine) == [("exception", "PENDING")]


async def test_an_exception_dated_just_past_the_period_end_is_still_in_its_report(
        engine: Engine, tmp_path: pathlib.Path) -> None:
    # A denial id may be dated up to five minutes after the request (the clocks of
    # two sidecars differ); one no longer on the stream is accepted unseen. Asked
    # and approved before the period closed, the exception must be in that period's
    # report: finance signs the period from it.
    assert DENIAL_LEAD_MS == FUTURE_SLACK_MS  # the report looks as far ahead as a request may
    period = "2031-03"
    _, end = bounds_ms(period)
    asked_at, decided_at = end - 60_000, end - 30_000
    denial = f"pmt_{end + 120_000:012x}" + "5" * 16
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(denial), now_ms=asked_at)
    assert not asked.denial_seen and period_of_ms(asked.requested_at_ms) == period
    done = await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                             "finance-owner", now_ms=decided_at)
    assert done.state == "approved"

    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    ledger.migrate()
    try:
        raw: Any = await read_stream(engine.store.client, STREAM)
        ledger.write_batch([parse_entry(i.decode(), f) for i, f in raw])
        this = build_report(ledger, period, ["tenant"]).exceptions
        after = build_report(ledger, period_of_ms(end), ["tenant"]).exceptions
    finally:
        ledger.close()
    assert [(x.exception_id, x.outcome, x.decided_by, x.amount_micros) for x in this] == [
        (asked.exception_id, "APPROVED", "dana", 2_000_000)]
    assert after == []  # listed once, in the period it was asked in


async def test_an_approval_stamped_before_its_request_is_reported_approved(
        engine: Engine, tmp_path: pathlib.Path) -> None:
    # The approving sidecar's clock is two seconds behind the requesting one's and a
    # bot approves at once: the APPROVED step carries an earlier time than PENDING.
    # The grant is live; the report must not call the exception pending.
    pid = await daily_denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))
    done = await desk.decide(snap(engine), asked.exception_id, "approve", "approval-bot",
                             "finance-owner", now_ms=asked.requested_at_ms - 2_000)
    assert done.state == "approved"
    assert (await engine.authorize(call("granted"))).decision is DecisionKind.ALLOW

    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    ledger.migrate()
    try:
        raw: Any = await read_stream(engine.store.client, STREAM)
        ledger.write_batch([parse_entry(i.decode(), f) for i, f in raw])
        (line,) = build_report(ledger, period_of_ms(asked.requested_at_ms),
                               ["tenant"]).exceptions
    finally:
        ledger.close()
    assert (line.outcome, line.decided_by, line.grant_id) == (
        "APPROVED", "approval-bot", done.grant_id)
    assert line.grant_expires_at_ms == asked.requested_at_ms - 2_000 + 3600 * 1000


async def test_approve_and_reject_racing_end_in_one_outcome_and_at_most_one_grant(
        engine: Engine) -> None:
    pid = await daily_denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid))

    async def act(i: int) -> str:
        action: Literal["approve", "reject"] = "approve" if i % 2 else "reject"
        try:
            v = await desk.decide(snap(engine), asked.exception_id, action, f"approver-{i}",
                                  "finance-owner", "racing decision")
            return f"{v.state}:{v.changed}"
        except ExceptionConflict:
            return "conflict"

    results = await asyncio.gather(*(act(i) for i in range(10)))
    winners = [r for r in results if r.endswith(":True")]
    assert len(winners) == 1 and results.count("conflict") == 9
    final = await desk.get(asked.exception_id)
    assert final is not None and f"{final.state}:True" == winners[0]
    grants: Any = await engine.store.client.hgetall(engine.store.keys.grants("acme-daily", ()))
    assert len(grants) == (1 if final.state == "approved" else 0)
    recorded = await steps(engine)
    assert recorded.count(("exception", "PENDING")) == 1
    assert sum(1 for t, st in recorded if t == "exception" and st != "PENDING") == 1
    assert recorded.count(("grant", "")) == len(grants)


async def test_a_replay_with_another_amount_or_after_the_decision_grants_nothing_more(
        engine: Engine) -> None:
    pid = await daily_denial(engine)
    desk = ExceptionDesk(engine.store)
    asked = await desk.request(snap(engine), asking(pid, amount_micros=ONE_CALL_MICROS))
    for amount in (ONE_CALL_MICROS * 2, 10_000_000, 1):
        with pytest.raises(ExceptionConflict, match="already requested"):
            await desk.request(snap(engine), asking(pid, amount_micros=amount))
    await desk.decide(snap(engine), asked.exception_id, "approve", "dana", "finance-owner")
    again = await desk.request(snap(engine), asking(pid, amount_micros=ONE_CALL_MICROS))
    assert again.exception_id == asked.exception_id and again.state == "approved"
    assert not again.changed
    # The same approval retried, and an approval after the grant: one raise only.
    await desk.decide(snap(engine), asked.exception_id, "approve", "dana", "finance-owner")
    with pytest.raises(ExceptionConflict, match="already approved by dana"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "erin", "finance-owner")
    # Cap + one call's worth of grant, the cap already spent: exactly one more call.
    allowed = 0
    for i in range(5):
        if (await engine.authorize(call(f"after-{i}"))).decision is not DecisionKind.DENY:
            allowed += 1
    assert allowed == ONE_CALL_MICROS // ONE_CALL_MICROS == 1
    assert (await steps(engine)).count(("grant", "")) == 1


async def test_an_approval_after_the_pending_time_grants_nothing(engine: Engine) -> None:
    pid = await daily_denial(engine)
    desk = ExceptionDesk(engine.store, pending_seconds=60)
    asked = await desk.request(snap(engine), asking(pid))
    with pytest.raises(ExceptionConflict, match="expired"):
        await desk.decide(snap(engine), asked.exception_id, "approve", "dana",
                          "finance-owner", now_ms=asked.pending_until_ms)
    assert (await engine.authorize(call("after-expiry"))).decision is DecisionKind.DENY
    assert await steps(engine) == [("exception", "PENDING"), ("exception", "EXPIRED")]


@pytest.mark.parametrize(("flag", "value"), [
    ("--hours", "1e309"), ("--hours", "3e15"), ("--amount-usd", "1e309"),
    ("--amount-usd", "9223372036854.775808"),
])
def test_absurd_amounts_and_durations_on_the_command_line_are_refused_by_name(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from keel_pdp.cli import main

    args = {"--amount-usd": "5", "--hours": "1", flag: value}
    with pytest.raises(SystemExit) as exited:
        main(["exception", "request", "--denial", "pmt_" + "0" * 28, "--budget", "acme-daily",
              "--amount-usd", args["--amount-usd"], "--hours", args["--hours"],
              "--justification", "Launch week traffic, FIN-42", "--requester", "olivia",
              "--target", "127.0.0.1:1", "--timeout", "0.2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err
