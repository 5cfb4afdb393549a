# ruff: noqa: UP031 - JSON goldens read best with %-formatting (no doubled braces)
"""Golden round trips of every stream event kind through keel_pdp.events.

Each test writes an event the way the sidecar does (the encoders of
keel_pdp.events for ``data``; for ``res``, the reply the Lua script documents),
compares the encoding with a golden text written by hand from the contract, then
reads it back through the ledger's strict parser and checks what it books. A
change of the wire format fails here first.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from keel_pdp import decision, events
from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, Reason
from keel_pdp.errors import ParseError
from keel_pdp.ledger.events import parse_entry
from keel_pdp.policy.loader import load_bundle
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, write_bundle

PID = "pmt_019aa0000000" + "0123456789abcdef"  # issued 2025-11-06
TS = 0x019AA0000000 + 5_000


def _entry(etype: str, data: str, res: str, pid: str = PID) -> dict[bytes, bytes]:
    return {b"type": etype.encode(), b"pid": pid.encode(), b"ts": str(TS).encode(),
            b"data": data.encode(), b"res": res.encode()}


def _plan(tmp_path: pathlib.Path, **kw: object) -> decision.Plan:
    snap = load_bundle(write_bundle(tmp_path, [budget("day", "10", per=["tenant"],
                                                      fail_mode="open")],
                                    revision="golden-r1"))
    req = AuthorizeInput("req-1", "acme", "chat", "gpt-4o-mini", "openai", 1000, 100,
                         (("team", "search"),))
    return decision.plan(snap, req, TS, PID)


def test_decision_allow(tmp_path: pathlib.Path) -> None:
    p = _plan(tmp_path)
    data = events.decision_data(p, caller="spiffe://corp/ns/a/sa/bot")
    rev = p.snapshot.policy_revision
    t = p.targets[0]
    golden = (
        '{"v":1,"rid":"req-1","in_tok":1000,"out_tok":100,"est":210,"now":%d,"exp":%d,'
        '"price":[150000,75000,150000,600000],"labels":{"team":"search"},'
        '"caller":"spiffe://corp/ns/a/sa/bot","tenant":"acme","workload":"chat",'
        '"model":"gpt-4o-mini","provider":"openai","rev":"%s","prev":"%s",'
        '"budgets":[{"id":"day","scope":"tenant=* workload=* model=* provider=* per tenant",'
        '"window":"daily","ws":%d,"we":%d,'
        '"limit":10000000,"mode":"enforce","split":["acme"]}]}'
        % (TS, p.expires_at_ms, rev, p.snapshot.price_revision, t.window_start_ms,
           t.window_end_ms))
    assert json.loads(data) == json.loads(golden)
    assert data == golden
    # authorize.lua's reply, as its header documents it.
    res = ('{"d":"ALLOW","pid":"%s","exp":%d,"amt":210,"k":100,"c":1,"b":[[0,210]],'
           '"held":[1]}' % (PID, p.expires_at_ms))
    ev = parse_entry("1-0", _entry("decision", data, res))
    (row,) = ev.rows
    assert (row.kind, row.decision, row.held_micros, row.amount_micros, row.estimate_micros,
            row.max_output_tokens) == ("permit", "ALLOW", 210, 210, 210, 100)
    assert (row.dims.tenant, row.dims.model, row.request_id) == ("acme", "gpt-4o-mini", "req-1")
    assert row.caller == "spiffe://corp/ns/a/sa/bot"
    assert [(b.budget_id, b.held_micros) for b in ev.budgets] == [("day", 210)]


def test_decision_denied_without_the_store(tmp_path: pathlib.Path) -> None:
    p = _plan(tmp_path)
    reason = Reason(Code.REQUEST_ID_REUSED, "request_id 'req-1' already carried permit x")
    res = events.denial_res(PID, (reason,))
    assert res == ('{"d":"DENY","pid":"%s","amt":0,"k":0,"reasons":[{"code":'
                   '"REQUEST_ID_REUSED","message":"request_id \'req-1\' already carried '
                   'permit x"}]}' % PID)
    (row,) = parse_entry("2-0", _entry("decision", events.decision_data(p), res)).rows
    assert (row.kind, row.decision, row.amount_micros, row.reason) == (
        "denial", "DENY", 0, "REQUEST_ID_REUSED")


def test_decision_degraded(tmp_path: pathlib.Path) -> None:
    p = _plan(tmp_path)
    out = decision.without_store(p)
    assert out.decision is DecisionKind.ALLOW and out.permit_id != PID
    res = events.degraded_res(out)
    golden = {"d": "ALLOW", "pid": out.permit_id, "amt": 0, "k": 100, "degraded": True,
              "reasons": [{"code": "STORE_UNAVAILABLE",
                           "message": "Allowed without a hold because the budget store did "
                                      "not answer in time and every matching budget fails "
                                      "open."}]}
    assert json.loads(res) == golden
    (row,) = parse_entry("3-0", _entry("decision", events.decision_data(p), res,
                                       pid=out.permit_id)).rows
    assert (row.kind, row.degraded, row.held_micros, row.amount_micros) == (
        "permit", True, 0, 0)


def test_settlement_with_flags() -> None:
    # Priced by Keel at 299.5 micro-USD exactly: booked (rounded up) at 300.
    data = events.settlement_data(TS, "SUCCEEDED", 300, None, 300,
                                  TokenUsage(1000, 200, 0, 250, 40), caller="svc",
                                  exact_pico=299_500_000)
    assert data == ('{"v":1,"now":%d,"outcome":"SUCCEEDED","priced":300,"provider_cost":null,'
                    '"actual":300,"exact_pico":299500000,'
                    '"usage":{"in":1000,"cached":200,"cw":0,"out":250,"rsn":40},'
                    '"caller":"svc"}' % TS)
    # closeout.lua's reply for a held permit settled above its hold.
    res = ('{"st":"SETTLED","act":300,"est":210,"amt":210,"prior":"held",'
           '"flags":["USAGE_ABOVE_PERMIT","COST_ABOVE_HOLD"]}')
    settle, correction = parse_entry("4-0", _entry("settlement", data, res)).rows
    assert (settle.kind, settle.actual_micros, settle.held_micros) == ("settlement", 300, 210)
    assert (correction.kind, correction.amount_micros, correction.held_micros) == (
        "correction", 90, 210)
    assert settle.detail["flags"] == ["USAGE_ABOVE_PERMIT", "COST_ABOVE_HOLD"]
    assert (settle.output_tokens, settle.reasoning_tokens, settle.caller) == (250, 40, "svc")
    # Both entries carry the exact cost beside the booked one.
    assert (settle.actual_pico, correction.actual_pico) == (299_500_000, 299_500_000)


def test_settlement_provider_cost_is_exact_in_micros() -> None:
    # A provider-reported cost is exact at the micro-dollar: exact = cost x 10^6.
    data = events.settlement_data(TS, "SUCCEEDED", 286, 285, 285, TokenUsage(1000, 0, 0, 100),
                                  exact_pico=285_000_000)
    assert json.loads(data)["exact_pico"] == 285_000_000
    # Without the figure (an older caller of the encoder) the booked amount is exact.
    data = events.settlement_data(TS, "SUCCEEDED", 7, None, 7, TokenUsage(10, 0, 0, 1))
    assert json.loads(data)["exact_pico"] == 7_000_000


def test_settlement_from_an_older_sidecar_has_no_exact_amount() -> None:
    # Events written before exact amounts: no exact_pico; the booked amount stands.
    data = ('{"v":1,"now":%d,"outcome":"SUCCEEDED","priced":9,"provider_cost":null,'
            '"actual":9,"usage":{"in":10,"cached":0,"cw":0,"out":1,"rsn":0}}' % TS)
    res = '{"st":"SETTLED","act":9,"est":9,"amt":9,"prior":"held"}'
    settle, correction = parse_entry("4-1", _entry("settlement", data, res)).rows
    assert (settle.actual_micros, settle.actual_pico, correction.actual_pico) == (9, None, None)


@pytest.mark.parametrize("exact", [
    "8000000",     # below the booking by a whole micro-dollar: not its rounding up
    "9000001",     # above the booking: rounding never goes down
    "-1", "8.5", '"8500000"', "true",
])
def test_settlement_exact_amount_must_round_up_to_the_booking(exact: str) -> None:
    data = ('{"v":1,"now":%d,"outcome":"SUCCEEDED","priced":9,"provider_cost":null,'
            '"actual":9,"exact_pico":%s,"usage":{"in":10,"cached":0,"cw":0,"out":1,"rsn":0}}'
            % (TS, exact))
    res = '{"st":"SETTLED","act":9,"est":9,"amt":9,"prior":"held"}'
    with pytest.raises(ParseError, match="exact_pico"):
        parse_entry("4-2", _entry("settlement", data, res))


def test_settlement_after_void_books_the_whole_actual() -> None:
    data = events.settlement_data(TS, "SUCCEEDED", 210, 500, 500, TokenUsage(1000, 0, 0, 100))
    res = '{"st":"SETTLED_AFTER_VOID","act":500,"est":210,"amt":210,"prior":"voided"}'
    _, correction = parse_entry("5-0", _entry("settlement", data, res)).rows
    assert (correction.amount_micros, correction.held_micros) == (500, 0)
    assert correction.actual_pico == 500_000_000


@pytest.mark.parametrize(("etype", "state", "reason"), [
    ("void", "voided", "client gave up"),
    ("void", "voided", events.ABORT_REASON),
    ("expiry", "expired", ""),
])
def test_release(etype: str, state: str, reason: str) -> None:
    data = events.release_data(TS, reason)
    assert json.loads(data) == {"v": 1, "now": TS, **({"reason": reason} if reason else {})}
    res = '{"st":"RELEASED","amt":210,"state":"%s"}' % state
    (row,) = parse_entry("6-0", _entry(etype, data, res)).rows
    assert (row.kind, row.amount_micros, row.held_micros, row.reason) == (
        etype, -210, 210, reason)


def test_grant() -> None:
    data = events.grant_data(TS, "day", ("acme",), "finance-overage", 5_000_000,
                             TS + 3_600_000, "ana", "finance", "launch week", "r1@abc")
    assert data == ('{"v":1,"now":%d,"budget":"day","split":["acme"],"path":"finance-overage",'
                    '"amount":5000000,"exp":%d,"approver":"ana","role":"finance",'
                    '"why":"launch week","rev":"r1@abc"}' % (TS, TS + 3_600_000))
    res = '{"amt":5000000,"exp":%d,"created":1}' % (TS + 3_600_000)
    (row,) = parse_entry("7-0", _entry("grant", data, res, pid="grt_1")).rows
    assert (row.kind, row.amount_micros, row.detail["amount_micros"]) == (
        "exception_grant", 0, 5_000_000)


def test_alert_books_nothing(tmp_path: pathlib.Path) -> None:
    data = events.decision_data(_plan(tmp_path))
    res = '{"budget":1,"pct":80,"level":8000000,"committed":8000100,"limit":10000000}'
    assert parse_entry("8-0", _entry("alert", data, res)).rows == ()


@pytest.mark.parametrize("res", [
    '{"st":"SETTLED","act":1.5,"est":1,"amt":1,"prior":"held"}',  # a float amount
    '{"st":"SETTLED","act":1,"est":1,"amt":1,"prior":"sideways"}',
    '{"st":"SETTLED","act":1,"est":1,"amt":1,"prior":"held","flags":"x"}',
    '[1,2]',
])
def test_off_contract_settlements_are_refused(res: str) -> None:
    data = events.settlement_data(TS, "SUCCEEDED", 1, None, 1, TokenUsage(1, 0, 0, 0))
    with pytest.raises(ParseError):
        parse_entry("9-0", _entry("settlement", data, res))
