"""Exception steps on the ledger: golden stream entries (written out by hand, as
the Lua scripts write them) parsed by the ledger, entries that break the contract,
and the period report's exception section over a real SQLite ledger."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.events import ParseError, derive, parse_entry
from keel_pdp.ledger.periods import period_of_ms
from keel_pdp.ledger.report import build_report, render
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.overage.workflow import ExceptionAsk, ExceptionDesk
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle

DENIAL = "pmt_019aa1b2c3d4" + "0123456789abcdef"
EXC = "exc_0123456789abcdef01234567"


def entry(st: str, **extra: Any) -> dict[bytes, bytes]:
    data = {"v": 1, "exc": EXC, "budget": "acme", "split": [], "path": "finance-overage"}
    res: dict[str, Any] = {"st": st, "exc": EXC}
    if st == "PENDING":
        data.update({"amt": 2_000_000, "dur": 3600, "why": "launch week", "by": "olivia"})
    if st == "APPROVED":
        res.update({"grant": "grt-0123456789abcdef01234567", "amt": 2_000_000,
                    "exp": 1_764_000_000_000})
    data.update(extra.pop("data", {}))
    res.update(extra.pop("res", {}))
    fields = {"type": "exception", "pid": DENIAL, "ts": "1764000000000",
              "data": json.dumps(data), "res": json.dumps(res), **extra}
    return {k.encode(): str(v).encode() for k, v in fields.items()}


@pytest.mark.parametrize("st", ["PENDING", "APPROVED", "REJECTED", "EXPIRED"])
def test_every_step_is_accepted_linked_to_the_denial_and_books_no_money(st: str) -> None:
    ev = parse_entry("1764000000000-0", entry(st))
    assert (ev.etype, ev.permit_id) == ("exception", DENIAL)
    assert ev.data["exc"] == EXC == ev.res["exc"] and ev.res["st"] == st
    assert ev.rows == () and derive(ev) == ([], [])


def test_a_grant_from_the_workflow_names_its_request_and_denial() -> None:
    data = {"v": 1, "now": 1, "budget": "acme", "split": [], "path": "finance-overage",
            "amount": 2_000_000, "exp": 5, "approver": "dana", "role": "finance-owner",
            "why": "launch week", "rev": "r1@abc", "exc": EXC, "denial": DENIAL}
    fields = {b"type": b"grant", b"pid": b"grt-0123456789abcdef01234567", b"ts": b"1",
              b"data": json.dumps(data).encode(),
              b"res": b'{"created":1,"amt":2000000,"exp":5}'}
    (row,) = parse_entry("1-0", fields).rows
    assert row.kind == "exception_grant" and row.amount_micros == 0
    assert row.detail["exception_id"] == EXC and row.detail["denial_permit_id"] == DENIAL
    assert row.detail["amount_micros"] == 2_000_000 and row.detail["approver"] == "dana"


@pytest.mark.parametrize(("fields", "reason"), [
    (entry("MAYBE"), "res.st 'MAYBE' is not one of"),
    (entry("PENDING", res={"exc": "exc_other"}), "res.exc does not match data.exc"),
    (entry("PENDING", data={"exc": None}), "data.exc is missing"),
    (entry("PENDING", data={"budget": None}), "data.budget is missing"),
    (entry("PENDING", data={"amt": 0}), "data.amt = 0 is out of range"),
    (entry("PENDING", data={"amt": 1.5}), "data.amt is 1.5, expected an integer"),
    (entry("APPROVED", res={"grant": None}), "res.grant is missing"),
    (entry("APPROVED", res={"amt": "lots"}), "res.amt is str"),
    (entry("REJECTED", pid="grt-1"), "not the denial's permit id"),
])
def test_steps_that_break_the_contract_are_refused_with_a_reason(
        fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(ParseError, match=reason.replace(".", r"\.").replace("(", r"\(")):
        parse_entry("1-0", fields)


async def test_the_period_report_lists_exceptions_with_outcome_and_spend_allowed(
        aio_client: aioredis.Redis, tmp_path: pathlib.Path) -> None:
    bundle = write_bundle(
        tmp_path / "b",
        [budget("acme", "0.006000", scope={"tenant": "acme"}, exception_path="finance-overage",
                window="monthly")],
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "10.00"}],
        settings={"allow_constrain": False})
    engine = make_engine(aio_client, bundle)
    snapshot = engine.policies.current
    assert snapshot is not None
    desk = ExceptionDesk(engine.store)

    def call(rid: str) -> AuthorizeInput:
        return AuthorizeInput(rid, "acme", "chat", "gpt-4.1", "openai", 1000, 500)

    # Every call holds $0.006 (1000 in at $2/M + 500 out at $8/M); each settles at
    # 1000 in + 250 out = $0.002 + $0.002.
    usage = TokenUsage(input_tokens=1000, output_tokens=250)
    settle_micros = 1000 * 2 + 250 * 8
    fill = await engine.authorize(call("fill"))
    await engine.closeout(fill.permit_id, usage, "SUCCEEDED", None)
    denied = [await engine.authorize(call(f"denied-{i}")) for i in range(3)]
    assert all(d.decision is DecisionKind.DENY for d in denied)
    base: dict[str, Any] = dict(budget_id="acme", scope=(), duration_seconds=3600,
                justification="Launch week traffic, FIN-42", requester="olivia")
    approved = await desk.request(snapshot, ExceptionAsk(denied[0].permit_id,
                                                         amount_micros=12_000, **base))
    rejected = await desk.request(snapshot, ExceptionAsk(denied[1].permit_id,
                                                         amount_micros=50_000, **base))
    pending = await desk.request(snapshot, ExceptionAsk(denied[2].permit_id,
                                                        amount_micros=7_000, **base))
    await desk.decide(snapshot, rejected.exception_id, "reject", "dana", "finance-owner",
                      "use the batch tier")
    await desk.decide(snapshot, approved.exception_id, "approve", "dana", "finance-owner")
    # With the $0.012 grant, calls are allowed while settled + $0.006 fits under $0.018.
    rode = []
    for i in range(4):
        out = await engine.authorize(call(f"above-{i}"))
        if out.decision is not DecisionKind.DENY:
            rode.append(out.permit_id)
            await engine.closeout(out.permit_id, usage, "SUCCEEDED", None)
    headroom = 6_000 + 12_000 - settle_micros
    # Each settled call frees its hold down to the $0.004 it cost.
    expected_rides = 0
    committed = 0
    while committed + 6_000 <= headroom:
        committed += settle_micros
        expected_rides += 1
    assert len(rode) == expected_rides == 3
    rode_above_cap = expected_rides  # only $0.002 was left: none would fit without the grant

    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    ledger.migrate()
    raw: Any = await read_stream(aio_client, "t:{pdp}:events")
    ledger.write_batch([parse_entry(i.decode(), f) for i, f in raw])
    report = build_report(ledger, period_of_ms(approved.requested_at_ms), ["tenant"])
    lines = {x.exception_id: x for x in report.exceptions}
    assert set(lines) == {approved.exception_id, rejected.exception_id, pending.exception_id}
    a, r, p = (lines[approved.exception_id], lines[rejected.exception_id],
               lines[pending.exception_id])
    assert (a.outcome, r.outcome, p.outcome) == ("APPROVED", "REJECTED", "PENDING")
    assert a.denial_in_ledger and r.denial_in_ledger and p.denial_in_ledger
    assert a.denial_permit_id == denied[0].permit_id and a.decided_by == "dana"
    assert a.permits_allowed == rode_above_cap
    assert a.spend_allowed_micros == rode_above_cap * settle_micros
    assert r.spend_allowed_micros == 0 and r.note == "use the batch tier"
    text = render(report, "table")
    assert "Exceptions requested in the period" in text and approved.exception_id in text
    doc = json.loads(render(report, "json"))
    by_id = {x["exception_id"]: x for x in doc["exceptions"]}
    spent = rode_above_cap * settle_micros
    assert by_id[approved.exception_id]["spend_allowed_usd"] == \
        f"{spent // 1_000_000}.{spent % 1_000_000:06d}"
    assert by_id[rejected.exception_id]["outcome"] == "REJECTED"
    ledger.close()


def test_golden_steps_round_trip_through_the_store_unchanged(tmp_path: pathlib.Path) -> None:
    ledger = LedgerStore(f"sqlite:///{tmp_path}/golden.db")
    ledger.migrate()
    golden = {f"1764000000000-{n}": entry(st)
              for n, st in enumerate(("PENDING", "APPROVED", "REJECTED", "EXPIRED"))}
    events = [parse_entry(eid, f) for eid, f in golden.items()]
    assert ledger.write_batch(events) == 4
    assert ledger.write_batch(events) == 0  # delivered again: stored once
    rows = ledger.query("SELECT event_id, etype, permit_id, ts_ms, data, res FROM ledger_events "
                        "ORDER BY event_id")
    assert [(str(e), str(t), str(p), int(ts), str(d).encode(), str(r).encode())
            for e, t, p, ts, d, r in rows] == [
        (eid, "exception", DENIAL, 1_764_000_000_000, f[b"data"], f[b"res"])
        for eid, f in golden.items()]
    assert ledger.query("SELECT COUNT(*) FROM ledger_entries")[0][0] == 0  # no money moved
    ledger.close()
