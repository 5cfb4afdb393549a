"""What a reconciliation produces: line items on both sides, what each category
claims on them, and the evidence behind every claim.

The memo, the report and the CSV outputs read these; the attribution
(``keel_pdp.reconcile.attribution``) writes them.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from fractions import Fraction

from keel_pdp.reconcile.categories import CREDITS, PRIOR_PERIOD
from keel_pdp.reconcile.clocks import LEDGER_CLOCK_TENANT
from keel_pdp.reconcile.internal_line import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping, Workload
from keel_pdp.reconcile.model import STANDARD_TIER, ProviderLine
from keel_pdp.reconcile.period import Period

Series = tuple[str, str, str, str, str]  # account, model, token type, tier, service tier


@dataclass(frozen=True, slots=True, order=True)
class CellKey:
    """The reconciliation grain: UTC day, account, model, token type, tier (long
    context) and service tier (each billed at its own rates)."""

    day: date
    account: str
    model: str
    token_type: str
    tier: str = ""
    service_tier: str = STANDARD_TIER

    @property
    def series(self) -> Series:
        return (self.account, self.model, self.token_type, self.tier, self.service_tier)


@dataclass
class Cell:
    """One line item at the reconciliation grain, both sides."""

    key: CellKey
    provider_micros: int = 0
    provider_has_cost: bool = False
    provider_tokens: int | None = None
    provider_allowance: int = 0
    provider_refs: list[str] = field(default_factory=list)
    internal_micros: int = 0
    internal_tokens: int = 0
    internal_requests: int = 0
    billed_tokens: int = 0  # tokens of the requests the provider bills on this line
    billed_requests: int = 0
    repriced_micros: int = 0  # those requests at the provider's card
    by_workload: dict[Workload, int] = field(default_factory=dict)
    alloc: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def gap(self) -> int:
        return self.provider_micros - self.internal_micros

    @property
    def residual(self) -> int:
        return self.gap - sum(self.alloc.values())

    def allocate(self, category: str, micros: int, note: str = "") -> None:
        if micros == 0:
            return
        self.alloc[category] = self.alloc.get(category, 0) + micros
        if note:
            prev = self.notes.get(category)
            if prev is None:
                self.notes[category] = note
            elif note not in prev.split("; "):
                self.notes[category] = f"{prev}; {note}"


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A provider line that is not usage: a credit or a prior-period correction."""

    category: str
    line: ProviderLine

    @property
    def line_id(self) -> str:
        return f"{pathlib.PurePath(self.line.source).name}: {self.line.where}"


@dataclass
class Figures:
    """Both sides of the requests in one category, for one token type."""

    tokens: int = 0
    provider_micros: int = 0
    internal_micros: int = 0


@dataclass
class Evidence:
    """What each category claims, and the requests and lines behind it."""

    requests: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lines: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    figures: dict[str, dict[str, Figures]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Figures)))
    # clock skew: request ids on each side of each boundary
    skew_provider_only: list[str] = field(default_factory=list)
    skew_ledger_only: list[str] = field(default_factory=list)
    skew_provider_micros: int = 0
    skew_ledger_micros: int = 0
    rates: dict[Series, list[tuple[date, Fraction]]] = field(default_factory=dict)
    # failed attempts: (requests, provider micros, internal micros) each way
    failed_billed: list[int] = field(default_factory=lambda: [0, 0, 0])
    failed_unbilled: list[int] = field(default_factory=lambda: [0, 0, 0])
    # (account, model, token type, service tier) -> the internal rates seen
    cache_internal_rates: dict[tuple[str, str, str, str], set[Fraction]] = field(
        default_factory=lambda: defaultdict(set))


@dataclass
class Reconciliation:
    """One provider's month reconciled: line items, adjustments, evidence, totals."""

    period: Period
    provider: str
    cells: dict[CellKey, Cell]
    adjustments: list[Adjustment]
    window_lines: list[InternalUsageLine]
    boundary_lines: list[InternalUsageLine]
    evidence: Evidence
    unmapped_accounts: list[str]
    skew_hours: int
    ledger_clock: str = LEDGER_CLOCK_TENANT

    @property
    def provider_usage_micros(self) -> int:
        return sum(c.provider_micros for c in self.cells.values())

    @property
    def invoice_micros(self) -> int:
        return self.provider_usage_micros + sum(a.line.cost_micros or 0 for a in self.adjustments)

    @property
    def internal_micros(self) -> int:
        return sum(c.internal_micros for c in self.cells.values())

    def category_net(self, category: str) -> int:
        if category in (CREDITS, PRIOR_PERIOD):
            return sum(a.line.cost_micros or 0 for a in self.adjustments
                       if a.category == category)
        return sum(c.alloc.get(category, 0) for c in self.cells.values())

    def category_gross(self, category: str) -> int:
        if category in (CREDITS, PRIOR_PERIOD):
            return sum(abs(a.line.cost_micros or 0) for a in self.adjustments
                       if a.category == category)
        return sum(abs(c.alloc.get(category, 0)) for c in self.cells.values())

    def cells_in(self, category: str) -> list[Cell]:
        return [c for k, c in sorted(self.cells.items()) if c.alloc.get(category, 0)]

    def by_account(self) -> dict[str, dict[str, int]]:
        """Per account: provider, internal and every category, in micro-USD."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for key, cell in self.cells.items():
            row = out[key.account]
            row["provider_micros"] += cell.provider_micros
            row["internal_micros"] += cell.internal_micros
            for cat, micros in cell.alloc.items():
                row[cat] += micros
        for adj in self.adjustments:
            row = out[adj.line.account]
            row["provider_micros"] += adj.line.cost_micros or 0
            row[adj.category] += adj.line.cost_micros or 0
        return {a: {k: v for k, v in row.items()} for a, row in sorted(out.items())}


def workloads_of(rec: Reconciliation, mapping: Mapping, cell: Cell) -> list[Workload]:
    """The internal workloads behind a line item (mapped ones first)."""
    out = list(mapping.workloads_for(rec.provider, cell.key.account))
    for workload in sorted(cell.by_workload):
        if workload not in out:
            out.append(workload)
    return out
