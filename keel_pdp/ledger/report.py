"""Forecast, actual and variance for a period, and a burn-rate forecast per budget.

Definitions (all integer micro-USD; per group of permits belonging to the period):

- forecast: the cost estimated and held when the permits were issued;
- actual: provider-reported (or priced) cost of the settled permits, plus manual
  adjustments;
- accrued: estimated cost of permits still open (no settlement, void or expiry);
- cost = actual + accrued, the period's cost as the ledger knows it now;
- variance = cost - forecast (negative: the estimates were generous);
- booked: what the period's books hold (entries booked in it, including
  adjustments for earlier closed periods); late_out: amounts belonging to the
  period but booked in a later one because they arrived after it closed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from keel_pdp.ledger.cli_support import add_store, open_for_cli, period_arg, run_cli
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.money import ratio_percent, usd
from keel_pdp.ledger.periods import bounds_ms, iso_utc, permit_issued_ms, to_ms
from keel_pdp.ledger.store import LedgerStore, now_ms

DIMENSIONS = ("tenant", "workload", "model", "provider", "cost_center", "business_unit")
RawKey = tuple[str, str, str, str]  # tenant, workload, model, provider


def pid_bound(ms: int) -> str:
    """The smallest permit id issued at ``ms`` (permit ids sort by issue time)."""
    return f"pmt_{ms:012x}"


@dataclass
class Figures:
    permits: int = 0
    denials: int = 0
    settlements: int = 0
    open_permits: int = 0
    forecast_micros: int = 0
    actual_micros: int = 0
    cost_micros: int = 0
    booked_micros: int = 0
    adjustments_in_micros: int = 0
    late_out_micros: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def accrued_micros(self) -> int:
        return self.cost_micros - self.actual_micros

    @property
    def variance_micros(self) -> int:
        return self.cost_micros - self.forecast_micros

    def add(self, other: Figures) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


_RAW_SQL = """
SELECT COALESCE(p.tenant, e.tenant), COALESCE(p.workload, e.workload),
       COALESCE(p.model, e.model), COALESCE(p.provider, e.provider),
       e.kind, e.belongs_to, e.period, COUNT(*),
       CAST(SUM(e.held_micros) AS BIGINT), CAST(SUM(e.actual_micros) AS BIGINT),
       CAST(SUM(e.amount_micros) AS BIGINT), CAST(SUM(e.input_tokens) AS BIGINT),
       CAST(SUM(e.cached_input_tokens) AS BIGINT), CAST(SUM(e.cache_write_tokens) AS BIGINT),
       CAST(SUM(e.output_tokens) AS BIGINT), CAST(SUM(e.reasoning_tokens) AS BIGINT)
FROM ledger_entries e
LEFT JOIN ledger_entries p
  ON p.permit_id = e.permit_id AND e.permit_id <> '' AND p.kind IN ('permit', 'denial')
WHERE (e.belongs_to = ? OR e.period = ?) AND e.kind <> 'exception_grant'
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""

_OPEN_SQL = """
SELECT p.tenant, p.workload, p.model, p.provider, COUNT(*)
FROM ledger_entries p
WHERE p.kind = 'permit' AND p.belongs_to = ?
  AND NOT EXISTS (SELECT 1 FROM ledger_entries t WHERE t.permit_id = p.permit_id
                  AND t.kind IN ('settlement', 'void', 'expiry'))
GROUP BY 1, 2, 3, 4
"""


def raw_figures(store: LedgerStore, period: str) -> dict[RawKey, Figures]:
    out: dict[RawKey, Figures] = {}
    for row in store.query(_RAW_SQL, (period, period)):
        key: RawKey = (str(row[0]), str(row[1]), str(row[2]), str(row[3]))
        kind, belongs, booked_in = str(row[4]), str(row[5]), str(row[6])
        cnt, held, actual, amount = (int(x or 0) for x in row[7:11])
        f = out.setdefault(key, Figures())
        if belongs == period:
            f.cost_micros += amount
            if booked_in != period:
                f.late_out_micros += amount
            if kind == "permit":
                f.permits += cnt
                f.forecast_micros += held
            elif kind == "denial":
                f.denials += cnt
            elif kind == "settlement":
                f.settlements += cnt
                f.actual_micros += actual
                f.input_tokens += int(row[11] or 0)
                f.cached_input_tokens += int(row[12] or 0)
                f.cache_write_tokens += int(row[13] or 0)
                f.output_tokens += int(row[14] or 0)
                f.reasoning_tokens += int(row[15] or 0)
            elif kind == "manual_adjustment":
                f.actual_micros += actual
        if booked_in == period:
            f.booked_micros += amount
            if belongs != period:
                f.adjustments_in_micros += amount
    for t, w, m, p, cnt in store.query(_OPEN_SQL, (period,)):
        out.setdefault((str(t), str(w), str(m), str(p)), Figures()).open_permits += int(cnt)
    return out


def dims_of(key: RawKey, mapping: CostMapping) -> dict[str, str]:
    alloc = mapping.allocate(key[0], key[1])
    return {"tenant": key[0], "workload": key[1], "model": key[2], "provider": key[3],
            "cost_center": alloc.cost_center, "business_unit": alloc.business_unit}


def group_figures(raw: dict[RawKey, Figures], by: Sequence[str],
                  mapping: CostMapping) -> dict[tuple[str, ...], Figures]:
    out: dict[tuple[str, ...], Figures] = {}
    for key, figures in raw.items():
        dims = dims_of(key, mapping)
        gkey = tuple(dims[d] for d in by)
        out.setdefault(gkey, Figures()).add(figures)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class BudgetBurn:
    budget_id: str
    split: tuple[str, ...]
    window: str
    mode: str
    limit_micros: int
    windows_in_period: int
    period_cap_micros: int
    spend_micros: int
    projected_micros: int
    denials: int
    last_window_start_ms: int
    last_window_used_micros: int
    last_window_projected_micros: int

    @property
    def status(self) -> str:
        if self.projected_micros > self.period_cap_micros or \
                self.last_window_projected_micros > self.limit_micros:
            return "over"
        if self.projected_micros * 10 > self.period_cap_micros * 9:
            return "at_risk"
        return "ok"


def _windows(kind: str, start: int, end: int) -> int:
    if kind == "hourly":
        return max(1, (end - start) // 3_600_000)
    if kind == "daily":
        return max(1, (end - start) // 86_400_000)
    return 1


def _project(used: int, elapsed: int, total: int) -> int:
    """used scaled from elapsed to total, rounded up (integers only)."""
    if elapsed <= 0:
        return used
    return -(-used * total // elapsed)


def budget_burn(store: LedgerStore, period: str, as_of_ms: int) -> list[BudgetBurn]:
    start, end = bounds_ms(period)
    lo, hi = pid_bound(start), pid_bound(end)
    spend = store.query(
        "SELECT b.budget_id, b.split, b.window_kind, b.mode, MAX(b.limit_micros), "
        "CAST(SUM(e.amount_micros) AS BIGINT) FROM ledger_permit_budgets b "
        "JOIN ledger_entries e ON e.permit_id = b.permit_id "
        "WHERE b.permit_id >= ? AND b.permit_id < ? AND b.applied = 1 GROUP BY 1, 2, 3, 4",
        (lo, hi))
    denied = {(str(r[0]), str(r[1])): int(r[2]) for r in store.query(
        "SELECT budget_id, split, COUNT(*) FROM ledger_permit_budgets "
        "WHERE permit_id >= ? AND permit_id < ? AND failed = 1 GROUP BY 1, 2", (lo, hi))}
    latest = {(str(r[0]), str(r[1])): r[2:] for r in store.query(
        "SELECT budget_id, split, window_start_ms, window_end_ms, limit_micros, "
        "settled_micros, held_micros, permit_id FROM ("
        " SELECT b.*, ROW_NUMBER() OVER (PARTITION BY budget_id, split "
        " ORDER BY permit_id DESC) AS rn FROM ledger_permit_budgets b "
        " WHERE permit_id >= ? AND permit_id < ? AND settled_micros IS NOT NULL"
        " AND applied = 1) x "
        "WHERE rn = 1", (lo, hi))}
    as_of = min(max(as_of_ms, start), end)
    out: list[BudgetBurn] = []
    for bid, split_json, kind, mode, limit, used in spend:
        key = (str(bid), str(split_json))
        limit_i, used_i = int(limit), int(used or 0)
        windows = _windows(str(kind), start, end)
        last = latest.get(key)
        lw_start = lw_used = lw_proj = 0
        if last is not None:
            ws, we, _lim, settled, held, pid = last
            lw_start, lw_used = int(ws), int(settled or 0) + int(held or 0)
            seen = permit_issued_ms(str(pid)) or int(ws)
            lw_proj = _project(lw_used, seen - int(ws), int(we) - int(ws))
        out.append(BudgetBurn(
            budget_id=key[0], split=tuple(json.loads(key[1])), window=str(kind), mode=str(mode),
            limit_micros=limit_i, windows_in_period=windows, period_cap_micros=limit_i * windows,
            spend_micros=used_i, projected_micros=_project(used_i, as_of - start, end - start),
            denials=denied.get(key, 0), last_window_start_ms=lw_start,
            last_window_used_micros=lw_used, last_window_projected_micros=lw_proj))
    out.sort(key=lambda b: (b.budget_id, b.split))
    return out


# ------------------------------------------------------------------ exceptions
DENIAL_LOOKBACK_MS = 31 * 86_400_000  # an exception is requested within 31 days of its denial


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
    value = json.loads(str(text))
    return value if isinstance(value, dict) else {}


def exception_lines(store: LedgerStore, period: str, as_of_ms: int) -> list[ExceptionLine]:
    start, end = bounds_ms(period)
    rows = store.query(
        "SELECT permit_id, ts_ms, data, res, event_id FROM ledger_events "
        "WHERE etype = 'exception' AND permit_id >= ? AND permit_id < ?",
        (pid_bound(start - DENIAL_LOOKBACK_MS), pid_bound(end)))
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
        last = seq[-1]
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


def overrun_lines(store: LedgerStore, period: str) -> list[OverrunLine]:
    rows = store.query(
        "SELECT permit_id, ts_ms, tenant, workload, status, estimate_micros, actual_micros, "
        "output_tokens, detail FROM ledger_entries WHERE kind = 'settlement' "
        "AND belongs_to = ? AND detail LIKE ? ORDER BY ts_ms, permit_id",
        (period, '%"flags"%'))
    out = []
    for pid, ts, tenant, workload, status, est, act, out_tok, detail in rows:
        flags = _loads(detail).get("flags") or []
        out.append(OverrunLine(str(pid), int(ts), str(tenant or ""), str(workload or ""),
                               str(status), int(est), int(act), int(out_tok),
                               tuple(str(f) for f in flags)))
    return out


OVERRUN_COLUMNS = ("permit_id", "settled_at", "tenant", "workload", "status", "estimate_usd",
                   "actual_usd", "output_tokens", "flags")


def overrun_cells(o: OverrunLine) -> list[str]:
    return [o.permit_id, iso_utc(o.ts_ms), o.tenant, o.workload, o.status,
            usd(o.estimate_micros), usd(o.actual_micros), str(o.output_tokens),
            ",".join(o.flags)]


@dataclass
class Report:
    period: str
    state: str
    by: tuple[str, ...]
    as_of_ms: int
    groups: dict[tuple[str, ...], Figures]
    budgets: list[BudgetBurn] = field(default_factory=list)
    exceptions: list[ExceptionLine] = field(default_factory=list)
    overruns: list[OverrunLine] = field(default_factory=list)

    @property
    def total(self) -> Figures:
        t = Figures()
        for f in self.groups.values():
            t.add(f)
        return t


def build_report(store: LedgerStore, period: str, by: Sequence[str],
                 mapping: CostMapping | None = None, as_of_ms: int | None = None) -> Report:
    bad = [d for d in by if d not in DIMENSIONS]
    if bad or not by:
        raise ValueError(f"--by takes a comma-separated list of {', '.join(DIMENSIONS)}")
    mapping = mapping or CostMapping()
    as_of = now_ms() if as_of_ms is None else as_of_ms
    groups = group_figures(raw_figures(store, period), by, mapping)
    return Report(period, store.period_state(period), tuple(by), as_of, groups,
                  budget_burn(store, period, as_of), exception_lines(store, period, as_of),
                  overrun_lines(store, period))


# ------------------------------------------------------------------ rendering
FIGURE_COLUMNS = ("permits", "denials", "settled", "open", "forecast_usd", "actual_usd",
                  "accrued_usd", "cost_usd", "variance_usd", "variance_pct", "booked_usd",
                  "adjustments_in_usd", "late_out_usd")


def figure_cells(f: Figures) -> list[str]:
    return [str(f.permits), str(f.denials), str(f.settlements), str(f.open_permits),
            usd(f.forecast_micros), usd(f.actual_micros), usd(f.accrued_micros),
            usd(f.cost_micros), usd(f.variance_micros),
            ratio_percent(f.variance_micros, f.forecast_micros), usd(f.booked_micros),
            usd(f.adjustments_in_micros), usd(f.late_out_micros)]


BUDGET_COLUMNS = ("budget_id", "split", "window", "mode", "limit_usd", "period_cap_usd",
                  "spend_usd", "projected_usd", "projected_pct", "denials",
                  "last_window_start", "last_window_used_usd", "last_window_projected_usd",
                  "status")


def budget_cells(b: BudgetBurn) -> list[str]:
    return [b.budget_id, "/".join(b.split), b.window, b.mode, usd(b.limit_micros),
            usd(b.period_cap_micros), usd(b.spend_micros), usd(b.projected_micros),
            ratio_percent(b.projected_micros, b.period_cap_micros), str(b.denials),
            iso_utc(b.last_window_start_ms) if b.last_window_start_ms else "",
            usd(b.last_window_used_micros), usd(b.last_window_projected_micros), b.status]


EXCEPTION_COLUMNS = ("exception_id", "denial_permit_id", "denial_in_ledger", "budget_id",
                     "split", "exception_path", "requester", "requested_at", "amount_usd",
                     "duration_hours", "outcome", "decided_by", "decided_at", "grant_id",
                     "grant_expires_at", "permits_allowed", "spend_allowed_usd")


def exception_cells(x: ExceptionLine) -> list[str]:
    return [x.exception_id, x.denial_permit_id, "yes" if x.denial_in_ledger else "no",
            x.budget_id, "/".join(x.split), x.exception_path, x.requester,
            iso_utc(x.requested_at_ms), usd(x.amount_micros),
            str(Decimal(x.duration_seconds) / 3600), x.outcome, x.decided_by,
            iso_utc(x.decided_at_ms) if x.decided_at_ms else "", x.grant_id,
            iso_utc(x.grant_expires_at_ms) if x.grant_expires_at_ms else "",
            str(x.permits_allowed), usd(x.spend_allowed_micros)]


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    body = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    lines = []
    for n, r in enumerate(body):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                               for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return bool(cell) and cell.lstrip("-").replace(".", "", 1).isdigit()


def render(report: Report, fmt: str) -> str:
    header = [*report.by, *FIGURE_COLUMNS]
    rows = [[*k, *figure_cells(f)] for k, f in report.groups.items()]
    total = ["TOTAL", *[""] * (len(report.by) - 1), *figure_cells(report.total)]
    if fmt == "json":
        doc: dict[str, Any] = {
            "period": report.period, "state": report.state, "as_of": iso_utc(report.as_of_ms),
            "currency": "USD", "by": list(report.by),
            "groups": [dict(zip(header, r, strict=True)) for r in rows],
            "total": dict(zip(header, total, strict=True)),
            "budgets": [dict(zip(BUDGET_COLUMNS, budget_cells(b), strict=True))
                        for b in report.budgets],
            "exceptions": [{**dict(zip(EXCEPTION_COLUMNS, exception_cells(x), strict=True)),
                            "justification": x.justification, "note": x.note}
                           for x in report.exceptions],
            "overruns": [dict(zip(OVERRUN_COLUMNS, overrun_cells(o), strict=True))
                         for o in report.overruns],
        }
        return json.dumps(doc, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        w.writerow(total)
        return buf.getvalue()
    parts = [f"Keel ledger report for {report.period} ({report.state}), as of "
             f"{iso_utc(report.as_of_ms)}, amounts in USD", "",
             text_table(header, [*rows, total])]
    if report.budgets:
        parts += ["", "Burn-rate forecast to the end of the period, per budget", "",
                  text_table(BUDGET_COLUMNS, [budget_cells(b) for b in report.budgets])]
    if report.exceptions:
        parts += ["", "Exceptions requested in the period, with their outcome and the spend "
                  "they allowed", "",
                  text_table(EXCEPTION_COLUMNS, [exception_cells(x) for x in report.exceptions])]
    if report.overruns:
        parts += ["", "Settlements booked above what their permit allowed (flagged for review)",
                  "", text_table(OVERRUN_COLUMNS, [overrun_cells(o) for o in report.overruns])]
    return "\n".join(parts) + "\n"


def parse_as_of(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("--as-of needs a timezone, e.g. 2026-11-15T00:00:00Z")
    return to_ms(dt)


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="forecast, actual and variance for a period")
    add_store(p)
    p.add_argument("--period", type=period_arg, required=True)
    p.add_argument("--by", default="tenant,workload",
                   help=f"comma-separated: {', '.join(DIMENSIONS)}")
    p.add_argument("--mapping", help="YAML file: tenant -> cost center / business unit")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--as-of", help="ISO time the burn rate is measured at (default: now)")
    p.set_defaults(func=cmd_report)


def cmd_report(ns: argparse.Namespace) -> int:
    def go(ns: argparse.Namespace) -> int:
        mapping = CostMapping.load(ns.mapping)
        by = [d.strip() for d in ns.by.split(",") if d.strip()]
        as_of = parse_as_of(ns.as_of) if ns.as_of else None
        store = open_for_cli(ns.store)
        try:
            report = build_report(store, ns.period, by, mapping, as_of)
        finally:
            store.close()
        sys.stdout.write(render(report, ns.format))
        return 0

    return run_cli(go, ns)
