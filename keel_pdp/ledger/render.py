"""The report as a text table, CSV or JSON: column names and cell formatting.

Cells are strings made from integers (``keel_pdp.ledger.money``), so a report
shows exactly what the ledger holds; the text table right-aligns numbers.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from keel_pdp.csv_cells import csv_rows
from keel_pdp.ledger.burn import BudgetBurn
from keel_pdp.ledger.figures import Figures
from keel_pdp.ledger.money import ratio_percent, usd
from keel_pdp.ledger.periods import iso_utc
from keel_pdp.ledger.sections import ExceptionLine, OverrunLine

if TYPE_CHECKING:
    from keel_pdp.ledger.report import Report

OVERRUN_COLUMNS = ("permit_id", "settled_at", "tenant", "workload", "status", "estimate_usd",
                   "actual_usd", "output_tokens", "flags")


def overrun_cells(o: OverrunLine) -> list[str]:
    return [o.permit_id, iso_utc(o.ts_ms), o.tenant, o.workload, o.status,
            usd(o.estimate_micros), usd(o.actual_micros), str(o.output_tokens),
            ",".join(o.flags)]


FIGURE_COLUMNS = ("permits", "denials", "settled", "open", "forecast_usd", "actual_usd",
                  "accrued_usd", "cost_usd", "variance_usd", "variance_pct", "booked_usd",
                  "adjustments_in_usd", "late_out_usd")


def figure_cells(f: Figures) -> list[str]:
    return [str(f.permits), str(f.denials), str(f.settlements), str(f.open_permits),
            usd(f.forecast_micros), usd(f.actual_line_micros), usd(f.accrued_line_micros),
            usd(f.cost_line_micros), usd(f.variance_line_micros),
            ratio_percent(f.variance_line_micros, f.forecast_micros),
            usd(f.booked_line_micros), usd(f.adjustments_in_line_micros),
            usd(f.late_out_line_micros)]


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
        w.writerows(csv_rows([header, *rows, total]))
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
