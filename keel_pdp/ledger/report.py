"""Forecast, actual and variance for a period, and a burn-rate forecast per budget.

Definitions (integer micro-USD; per group of permits belonging to the period; each
figure shown is the exact sum of its entries, rounded once, half to even — see
``keel_pdp.ledger.figures``):

- forecast: the cost estimated and held when the permits were issued;
- actual: provider-reported (or priced) cost of the settled permits, plus manual
  adjustments;
- accrued: estimated cost of permits still open (no settlement, void or expiry);
- cost = actual + accrued, the period's cost as the ledger knows it now;
- variance = cost - forecast (negative: the estimates were generous);
- booked: what the period's books hold (entries booked in it, including
  adjustments for earlier closed periods); late_out: amounts belonging to the
  period but booked in a later one because they arrived after it closed.

This module assembles the report and registers ``keel-pdp ledger report``; the parts
are ``figures`` (the groups), ``burn`` (per budget), ``sections`` (exceptions,
overruns) and ``render`` (table, CSV, JSON), re-exported here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keel_pdp.ledger.burn import BudgetBurn, budget_burn
from keel_pdp.ledger.cli_support import add_store, open_for_cli, period_arg, run_cli
from keel_pdp.ledger.figures import (
    DIMENSIONS,
    Figures,
    RawKey,
    dims_of,
    group_figures,
    raw_figures,
)
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.periods import pid_bound, to_ms
from keel_pdp.ledger.render import (
    BUDGET_COLUMNS,
    EXCEPTION_COLUMNS,
    FIGURE_COLUMNS,
    OVERRUN_COLUMNS,
    budget_cells,
    exception_cells,
    figure_cells,
    overrun_cells,
    render,
    text_table,
)
from keel_pdp.ledger.sections import (
    DENIAL_LOOKBACK_MS,
    ExceptionLine,
    OverrunLine,
    exception_lines,
    overrun_lines,
)
from keel_pdp.ledger.store import LedgerStore, now_ms

__all__ = [
    "BUDGET_COLUMNS", "DENIAL_LOOKBACK_MS", "DIMENSIONS", "EXCEPTION_COLUMNS", "FIGURE_COLUMNS",
    "OVERRUN_COLUMNS", "BudgetBurn", "ExceptionLine", "Figures", "OverrunLine", "RawKey",
    "Report", "budget_burn", "budget_cells", "build_report", "cmd_report", "dims_of",
    "exception_cells", "exception_lines", "figure_cells", "group_figures", "overrun_cells",
    "overrun_lines", "parse_as_of", "pid_bound", "raw_figures", "register", "render",
    "text_table",
]


@dataclass
class Report:
    """A period's report: figures per group, budgets' burn, exceptions and overruns,
    as of one moment (``render`` turns it into text, CSV or JSON)."""

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
    mapping = (mapping or CostMapping()).for_store(store)
    as_of = now_ms() if as_of_ms is None else as_of_ms
    groups = group_figures(raw_figures(store, period), by, mapping)
    return Report(period, store.period_state(period), tuple(by), as_of, groups,
                  budget_burn(store, period, as_of), exception_lines(store, period, as_of),
                  overrun_lines(store, period))


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
