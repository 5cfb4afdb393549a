"""Decisions and the chargeback ledger, from a categorised reconciliation.

Tolerance: a share of the month's invoice (1% by default). A category whose
variance (gross, so offsetting lines cannot hide each other) is inside it is
accepted with a one-line note; outside it, it is escalated to the engineering
owners of the workloads behind its line items. Credits and prior-period
corrections are recorded: they are invoice facts, not disagreements between
the two sides. An unexplained variance outside tolerance blocks posting.

The chargeback posts the reconciled total, which is the invoice total: usage
line items go to the workloads mapped to their account (split by each
workload's internal share of the line when an account is shared), credits are
spread in proportion to usage, and prior-period corrections become adjustment
rows that name the period they belong to.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from keel_pdp.reconcile.mapping import Mapping, Workload
from keel_pdp.reconcile.money import split_exact
from keel_pdp.reconcile.variance import (
    CATEGORIES,
    CREDITS,
    PRIOR_PERIOD,
    REQUEST_CATEGORIES,
    UNEXPLAINED,
    Cell,
    Reconciliation,
    workloads_of,
)

ACCEPTED = "accepted"
ESCALATED = "escalated"
RECORDED = "recorded"
NONE = "none"
READY = "ready-for-signoff"
BLOCKED = "blocked"
UNMAPPED_TENANT = "(unmapped)"


@dataclass
class CategoryReport:
    category: str
    title: str
    net_micros: int
    gross_micros: int
    provider_micros: int
    internal_micros: int
    line_count: int
    decision: str
    escalate_to: list[str]
    workloads: list[Workload]
    accounts: list[str]
    blocks_posting: bool = False


@dataclass(frozen=True, slots=True)
class ChargebackRow:
    kind: str  # usage | credit | prior_period_adjustment
    belongs_to: str
    tenant: str
    workload: str
    cost_center: str
    engineering_owner: str
    amount_micros: int


@dataclass
class Report:
    rec: Reconciliation
    mapping: Mapping
    tolerance_pct: Decimal
    tolerance_micros: int
    categories: list[CategoryReport]
    chargeback: list[ChargebackRow]
    status: str
    escalations: list[str] = field(default_factory=list)

    def category(self, name: str) -> CategoryReport:
        for c in self.categories:
            if c.category == name:
                return c
        raise KeyError(name)


def tolerance_of(invoice_micros: int, pct: Decimal) -> int:
    value = Decimal(abs(invoice_micros)) * pct / 100
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def _owners(mapping: Mapping, workloads: list[Workload]) -> list[str]:
    out: list[str] = []
    for w in workloads:
        owner = mapping.owner(w)
        label = f"{owner} ({w[0]}/{w[1]})" if owner else f"no owner on file for {w[0]}/{w[1]}"
        if label not in out:
            out.append(label)
    return out


def _category_report(rec: Reconciliation, mapping: Mapping, category: str, title: str,
                     tolerance: int) -> CategoryReport:
    net = rec.category_net(category)
    gross = rec.category_gross(category)
    workloads: list[Workload] = []
    accounts: list[str] = []
    if category in (CREDITS, PRIOR_PERIOD):
        lines = [a.line for a in rec.adjustments if a.category == category]
        provider = sum(ln.cost_micros or 0 for ln in lines)
        internal = 0
        count = len(lines)
        for ln in lines:
            if ln.account not in accounts:
                accounts.append(ln.account)
            for w in mapping.workloads_for(rec.provider, ln.account):
                if w not in workloads:
                    workloads.append(w)
        decision = RECORDED if lines else NONE
    else:
        cells = rec.cells_in(category)
        if category in REQUEST_CATEGORIES:
            figures = rec.evidence.figures.get(category, {}).values()
            provider = sum(f.provider_micros for f in figures)
            internal = sum(f.internal_micros for f in figures)
        else:
            provider = sum(c.provider_micros for c in cells)
            internal = sum(c.internal_micros for c in cells)
        count = len(cells)
        for cell in cells:
            if cell.key.account not in accounts:
                accounts.append(cell.key.account)
            for w in workloads_of(rec, mapping, cell):
                if w not in workloads:
                    workloads.append(w)
        if not cells:
            decision = NONE
        elif gross <= tolerance:
            decision = ACCEPTED
        else:
            decision = ESCALATED
    escalate = _owners(mapping, workloads) if decision == ESCALATED else []
    if decision == ESCALATED and not escalate:
        escalate = [f"the owner of account {a} (not in the mapping)" for a in accounts]
    return CategoryReport(
        category=category, title=title, net_micros=net, gross_micros=gross,
        provider_micros=provider, internal_micros=internal, line_count=count,
        decision=decision, escalate_to=escalate, workloads=workloads, accounts=accounts,
        blocks_posting=category == UNEXPLAINED and decision == ESCALATED,
    )


def _usage_weights(rec: Reconciliation, mapping: Mapping
                   ) -> tuple[dict[Workload, int], dict[str, dict[Workload, int]]]:
    """Provider usage allocated to workloads, in total and per account."""
    by_account_month: dict[str, dict[Workload, int]] = defaultdict(dict)
    for cell in rec.cells.values():
        for w, micros in cell.by_workload.items():
            row = by_account_month[cell.key.account]
            row[w] = row.get(w, 0) + micros
    totals: dict[Workload, int] = defaultdict(int)
    per_account: dict[str, dict[Workload, int]] = defaultdict(lambda: defaultdict(int))
    for key in sorted(rec.cells):
        cell = rec.cells[key]
        if cell.provider_micros == 0:
            continue
        for w, part in _split_cell(rec, mapping, cell, by_account_month):
            totals[w] += part
            per_account[key.account][w] += part
    return dict(totals), {a: dict(v) for a, v in per_account.items()}


def _split_cell(rec: Reconciliation, mapping: Mapping, cell: Cell,
                by_account_month: dict[str, dict[Workload, int]]) -> list[tuple[Workload, int]]:
    mapped = mapping.workloads_for(rec.provider, cell.key.account)
    if not mapped:
        return [((UNMAPPED_TENANT, cell.key.account), cell.provider_micros)]
    if len(mapped) == 1:
        return [(mapped[0], cell.provider_micros)]
    weights = [max(cell.by_workload.get(w, 0), 0) for w in mapped]
    if sum(weights) == 0:
        month = by_account_month.get(cell.key.account, {})
        weights = [max(month.get(w, 0), 0) for w in mapped]
    parts = split_exact(cell.provider_micros, weights)
    return list(zip(mapped, parts, strict=True))


def _spread(amount: int, weights: dict[Workload, int]) -> list[tuple[Workload, int]]:
    names = sorted(weights)
    if not names:
        return []
    parts = split_exact(amount, [max(weights[w], 0) for w in names])
    return list(zip(names, parts, strict=True))


def chargeback(rec: Reconciliation, mapping: Mapping) -> list[ChargebackRow]:
    totals, per_account = _usage_weights(rec, mapping)
    rows: dict[tuple[str, str, Workload], int] = defaultdict(int)
    for w, micros in totals.items():
        rows[("usage", "", w)] += micros
    for adj in rec.adjustments:
        line = adj.line
        amount = line.cost_micros or 0
        kind = "credit" if adj.category == CREDITS else "prior_period_adjustment"
        belongs = line.belongs_to if adj.category == PRIOR_PERIOD else ""
        weights = per_account.get(line.account) or {
            w: 1 for w in mapping.workloads_for(rec.provider, line.account)} or totals
        if not weights:
            weights = {(UNMAPPED_TENANT, line.account or "organization"): 1}
        for w, part in _spread(amount, weights):
            rows[(kind, belongs, w)] += part
    out: list[ChargebackRow] = []
    for (kind, belongs, w), micros in sorted(rows.items()):
        out.append(ChargebackRow(kind=kind, belongs_to=belongs, tenant=w[0], workload=w[1],
                                 cost_center=mapping.cost_center(w),
                                 engineering_owner=mapping.owner(w), amount_micros=micros))
    return out


def build_report(rec: Reconciliation, mapping: Mapping, tolerance_pct: Decimal) -> Report:
    tolerance = tolerance_of(rec.invoice_micros, tolerance_pct)
    categories = [_category_report(rec, mapping, name, title, tolerance)
                  for name, title in CATEGORIES]
    rows = chargeback(rec, mapping)
    posted = sum(r.amount_micros for r in rows)
    if posted != rec.invoice_micros:
        raise AssertionError(f"chargeback {posted} != invoice {rec.invoice_micros}")
    blocked = any(c.blocks_posting for c in categories)
    escalations = [f"{c.title}: {', '.join(c.escalate_to)}" for c in categories
                   if c.decision == ESCALATED]
    return Report(rec=rec, mapping=mapping, tolerance_pct=tolerance_pct,
                  tolerance_micros=tolerance, categories=categories, chargeback=rows,
                  status=BLOCKED if blocked else READY, escalations=escalations)
