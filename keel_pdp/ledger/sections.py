"""The report's review sections: exceptions requested in the period, with their
outcome and the spend they let through, and settlements above their permit.

Both read facts the figures do not show: the exception workflow's steps are
stream events (``ledger_events`` of type ``exception``), overruns are flags on
settlement entries. Finance reviews both before signing a period.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from keel_pdp.errors import ParseError
from keel_pdp.events import loads_object
from keel_pdp.ledger.connection import LedgerConnection
from keel_pdp.ledger.periods import bounds_ms, pid_bound

DENIAL_LOOKBACK_MS = 31 * 86_400_000  # an exception is requested within 31 days of its denial
# ... and its denial's id may be dated up to 5 minutes after the request (another
# sidecar's clock; keel_pdp.overage.workflow.FUTURE_SLACK_MS).
DENIAL_LEAD_MS = 5 * 60_000


@dataclass(frozen=True)
class ExceptionLine:
    """One exception request made in the period, with its outcome.

    ``spend_allowed_micros``: the cost (actual when settled, the hold while
    open) of the permits issued while the approved grant was active that took
    the budget counter past its policy cap, i.e. the spend the exception let
    through. Overlapping grants on one counter each count those permits.
    """

    exception_id: str
    denial_permit_id: str
    budget_id: str
    split: tuple[str, ...]
    exception_path: str
    requester: str
    requested_at_ms: int
    amount_micros: int
    duration_seconds: int
    justification: str
    outcome: str  # PENDING | APPROVED | REJECTED | EXPIRED
    decided_by: str = ""
    decided_at_ms: int = 0
    note: str = ""
    grant_id: str = ""
    grant_expires_at_ms: int = 0
    denial_in_ledger: bool = False
    permits_allowed: int = 0
    spend_allowed_micros: int = 0


def _loads(text: Any) -> dict[str, Any]:
    """A stored event's data or res (the writer stored only entries that parsed)."""
    try:
        return loads_object(str(text))
    except ParseError:
        return {}


def exception_lines(store: LedgerConnection, period: str, as_of_ms: int) -> list[ExceptionLine]:
    start, end = bounds_ms(period)
    rows = store.query(
        "SELECT permit_id, ts_ms, data, res, event_id FROM ledger_events "
        "WHERE etype = 'exception' AND permit_id >= ? AND permit_id < ?",
        (pid_bound(start - DENIAL_LOOKBACK_MS), pid_bound(end + DENIAL_LEAD_MS)))
    steps: dict[str, list[tuple[int, str, dict[str, Any], dict[str, Any]]]] = {}
    for _pid, ts, data, res, eid in rows:
        d, r = _loads(data), _loads(res)
        steps.setdefault(str(d.get("exc", "")), []).append((int(ts), str(eid), d, r))
    out: list[ExceptionLine] = []
    for exc, seq in steps.items():
        seq.sort(key=lambda s: (s[0], s[1]))
        asked = next((s for s in seq if s[3].get("st") == "PENDING"), None)
        if asked is None or not start <= asked[0] < end:
            continue
        req = asked[2]
        # A request is decided once (the decide script): its outcome is that step,
        # wherever the clocks of the sidecars that wrote the steps put it in time.
        last = next((s for s in reversed(seq) if s[3].get("st") != "PENDING"), seq[-1])
        outcome = str(last[3].get("st", "PENDING"))
        if outcome == "PENDING" and int(req.get("until", 0)) <= as_of_ms:
            outcome = "EXPIRED"
        dec = last[2] if outcome in ("APPROVED", "REJECTED") else {}
        line = ExceptionLine(
            exception_id=exc, denial_permit_id=str(req.get("denial", "")),
            budget_id=str(req.get("budget", "")),
            split=tuple(str(x) for x in req.get("split") or ()),
            exception_path=str(req.get("path", "")), requester=str(req.get("by", "")),
            requested_at_ms=asked[0], amount_micros=int(req.get("amt", 0)),
            duration_seconds=int(req.get("dur", 0)), justification=str(req.get("why", "")),
            outcome=outcome, decided_by=str(dec.get("by", "")),
            decided_at_ms=int(dec.get("at", 0)) if dec else 0, note=str(dec.get("note", "")),
            grant_id=str(last[3].get("grant", "")) if outcome == "APPROVED" else "",
            grant_expires_at_ms=int(last[3].get("exp", 0)) if outcome == "APPROVED" else 0)
        out.append(line)
    if not out:
        return out
    final: list[ExceptionLine] = []
    for x in out:
        denied = bool(store.query("SELECT 1 FROM ledger_entries WHERE permit_id = ? AND "
                                  "kind = 'denial'", (x.denial_permit_id,)))
        permits = spend = 0
        if x.outcome == "APPROVED":
            split = json.dumps(list(x.split), ensure_ascii=True, separators=(",", ":"))
            permits, spend = (int(v or 0) for v in store.query(
                "SELECT COUNT(DISTINCT b.permit_id), CAST(COALESCE(SUM(e.amount_micros), 0) "
                "AS BIGINT) FROM ledger_permit_budgets b "
                "JOIN ledger_entries e ON e.permit_id = b.permit_id "
                "WHERE b.budget_id = ? AND b.split = ? AND b.applied = 1 "
                "AND b.granted_micros > 0 AND b.permit_id >= ? AND b.permit_id < ? "
                "AND b.settled_micros + b.held_micros > b.limit_micros AND EXISTS ("
                "SELECT 1 FROM ledger_entries p WHERE p.permit_id = b.permit_id "
                "AND p.kind = 'permit')",
                (x.budget_id, split, pid_bound(x.decided_at_ms),
                 pid_bound(x.grant_expires_at_ms)))[0])
        final.append(replace(x, denial_in_ledger=denied,
                             permits_allowed=permits, spend_allowed_micros=spend))
    final.sort(key=lambda x: (x.requested_at_ms, x.exception_id))
    return final


@dataclass(frozen=True)
class OverrunLine:
    """A settlement booked above what its permit allowed (README "Overruns")."""

    permit_id: str
    ts_ms: int
    tenant: str
    workload: str
    status: str
    estimate_micros: int
    actual_micros: int
    output_tokens: int
    flags: tuple[str, ...]


def overrun_lines(store: LedgerConnection, period: str) -> list[OverrunLine]:
    # The permit's dimensions: a settlement booked before its decision (a writer
    # failover) was booked without them.
    rows = store.query(
        "SELECT s.permit_id, s.ts_ms, COALESCE(p.tenant, s.tenant), "
        "COALESCE(p.workload, s.workload), s.status, s.estimate_micros, s.actual_micros, "
        "s.output_tokens, s.detail FROM ledger_entries s LEFT JOIN ledger_entries p "
        "ON p.permit_id = s.permit_id AND s.permit_id <> '' AND p.kind = 'permit' "
        "WHERE s.kind = 'settlement' AND s.belongs_to = ? AND s.detail LIKE ? "
        "ORDER BY s.ts_ms, s.permit_id",
        (period, '%"flags"%'))
    out = []
    for pid, ts, tenant, workload, status, est, act, out_tok, detail in rows:
        flags = _loads(detail).get("flags") or []
        out.append(OverrunLine(str(pid), int(ts), str(tenant or ""), str(workload or ""),
                               str(status), int(est), int(act), int(out_tok),
                               tuple(str(f) for f in flags)))
    return out
