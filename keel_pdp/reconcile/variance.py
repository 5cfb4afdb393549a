"""Join both sides at one grain and put every difference in a category.

Grain: UTC day x provider account (project or workspace) x model x token type.
Each line item's gap (provider minus internal) is explained, in this order, by
the categories that have evidence for it; what is left goes to rounding when
it is within what rounding can produce, and to unexplained otherwise:

1. credits and prior-period corrections: provider lines that are not usage;
2. failed-request billing: internal surplus on lines that include failed
   attempts (the gateway counts attempts, the invoice counts billable units);
3. cache-read tokens at a different rate: same input token total for a day,
   account and model, split differently between fresh input and cache reads or
   writes; sized as the moved tokens at the provider's unit rates;
4. tier breakpoints: same tokens, a different unit rate, where the provider's
   rate for that account, model and token type changed during the month;
5. clock skew at window boundaries: provider surplus on the first or last day
   matched by internal calls stamped just outside the month, and offsetting
   gaps on adjacent days matched by calls near the midnight between them;
6. rounding: what is left on a line within the rounding of its sources (half
   the provider's amount step per provider line, one micro-dollar per request);
7. unexplained: everything else, with its line items.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.internal import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping, Workload
from keel_pdp.reconcile.model import (
    CACHED_INPUT,
    CORRECTION,
    CREDIT,
    INPUT,
    INPUT_GROUP,
    ProviderLine,
    normalise_model,
)
from keel_pdp.reconcile.money import round_fraction
from keel_pdp.reconcile.period import Period, day_of_ms
from keel_pdp.reconcile.prices import PriceBook

CLOCK_SKEW = "clock_skew"
CACHE_RATE = "cache_rate"
TIER = "tier_breakpoint"
FAILED = "failed_requests"
CREDITS = "credits"
PRIOR_PERIOD = "prior_period_correction"
ROUNDING = "rounding"
UNEXPLAINED = "unexplained"
CATEGORIES: tuple[tuple[str, str], ...] = (
    (CLOCK_SKEW, "Clock skew at window boundaries"),
    (CACHE_RATE, "Cache-read tokens at a different rate"),
    (TIER, "Tier breakpoints"),
    (FAILED, "Failed-request billing"),
    (CREDITS, "Credits and promotional balances"),
    (PRIOR_PERIOD, "Provider corrections that belong to a prior period"),
    (ROUNDING, "Rounding"),
    (UNEXPLAINED, "Unexplained"),
)
TITLES = dict(CATEGORIES)
# Two unit rates closer than this (relative) are the same rate.
RATE_TOLERANCE = Fraction(1, 100)
DAY_MS = 86_400_000

AccountKey = tuple[str, str, str]  # account, model, token type
Event = tuple[int, int, int]  # ts_ms, micros, call number


@dataclass(frozen=True, slots=True, order=True)
class CellKey:
    day: date
    account: str
    model: str
    token_type: str

    @property
    def series(self) -> AccountKey:
        return (self.account, self.model, self.token_type)


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
    failed_micros: int = 0
    failed_tokens: int = 0
    failed_requests: int = 0
    failed_calls: set[int] = field(default_factory=set)
    by_workload: dict[Workload, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    alloc: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def gap(self) -> int:
        return self.provider_micros - self.internal_micros

    @property
    def residual(self) -> int:
        return self.gap - sum(self.alloc.values())

    @property
    def allowance(self) -> int:
        """The most rounding alone can put on this line."""
        return self.provider_allowance + self.internal_requests + 1

    @property
    def billed_tokens(self) -> int:
        """Internal tokens of the attempts the provider would bill."""
        return self.internal_tokens - self.failed_tokens

    def allocate(self, category: str, micros: int, note: str = "") -> None:
        if micros == 0:
            return
        self.alloc[category] = self.alloc.get(category, 0) + micros
        if note:
            prev = self.notes.get(category)
            self.notes[category] = f"{prev}; {note}" if prev else note


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A provider line that is not usage: a credit or a prior-period correction."""

    category: str
    line: ProviderLine


@dataclass
class Evidence:
    """Figures the memo quotes, collected while categorising."""

    skew_call_ids: set[int] = field(default_factory=set)
    skew_evidence_micros: int = 0
    skew_boundary_micros: int = 0
    skew_days: set[date] = field(default_factory=set)
    cache_moved_tokens: int = 0
    cache_provider_cached_tokens: int = 0
    cache_internal_cached_tokens: int = 0
    tier_breaks: dict[AccountKey, tuple[date, Fraction, Fraction]] = field(default_factory=dict)
    failed_calls: set[int] = field(default_factory=set)
    failed_micros: int = 0


@dataclass
class Reconciliation:
    period: Period
    provider: str
    cells: dict[CellKey, Cell]
    adjustments: list[Adjustment]
    window_lines: list[InternalUsageLine]
    boundary_lines: list[InternalUsageLine]
    evidence: Evidence
    unmapped_accounts: list[str]
    skew_hours: int

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


class _Builder:
    def __init__(self, period: Period, provider: str, mapping: Mapping,
                 prices: PriceBook | None) -> None:
        self.period = period
        self.provider = provider
        self.mapping = mapping
        self.prices = prices
        self.aliases = mapping.aliases(provider)
        self.cells: dict[CellKey, Cell] = {}
        self.adjustments: list[Adjustment] = []
        self.pad_before: dict[AccountKey, list[Event]] = defaultdict(list)
        self.pad_after: dict[AccountKey, list[Event]] = defaultdict(list)
        self.calls = 0
        self.window: list[InternalUsageLine] = []
        self.boundary: list[InternalUsageLine] = []
        self.evidence = Evidence()
        self.unmapped: set[str] = set()

    def cell(self, key: CellKey) -> Cell:
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = Cell(key)
        return found

    def add_provider(self, line: ProviderLine) -> None:
        account = self.mapping.canonical_account(self.provider, line.account)
        if line.kind == CREDIT:
            self.adjustments.append(Adjustment(CREDITS, _with_account(line, account)))
            return
        if line.kind == CORRECTION:
            self.adjustments.append(Adjustment(PRIOR_PERIOD, _with_account(line, account)))
            return
        if not self.mapping.is_mapped(self.provider, account):
            self.unmapped.add(account)
        cell = self.cell(CellKey(line.day, account, line.model, line.token_type))
        if line.cost_micros is not None:
            cell.provider_micros += line.cost_micros
            cell.provider_has_cost = True
            cell.provider_allowance += (line.precision_micros + 1) // 2
        if line.tokens is not None:
            cell.provider_tokens = (cell.provider_tokens or 0) + line.tokens
        cell.provider_refs.append(f"{pathlib.PurePath(line.source).name}: {line.where}")

    def internal_account(self, line: InternalUsageLine) -> str:
        if line.account:
            return self.mapping.canonical_account(self.provider, line.account)
        found = self.mapping.account_for(self.provider, line.tenant, line.workload)
        if found is None:
            return f"(unmapped {line.tenant}/{line.workload})"
        return found

    def add_internal(self, line: InternalUsageLine) -> None:
        if line.provider.strip().lower() != self.provider.lower():
            return
        model = normalise_model(line.model, self.aliases)
        account = self.internal_account(line)
        if account.startswith("(unmapped"):
            self.unmapped.add(account)
        costs = line.costs_by_type(self.prices, model)
        tokens = line.tokens_by_type()
        day_ms = line.ts_ms
        inside = self.period.start_ms <= day_ms < self.period.end_ms
        if inside:
            self.window.append(line)
        else:
            self.boundary.append(line)
        day = day_of_ms(line.ts_ms)
        workload = (line.tenant, line.workload)
        self.calls += 1
        for token_type, n in tokens.items():
            micros = costs.get(token_type, 0)
            if n == 0 and micros == 0:
                continue
            series = (account, model, token_type)
            if not inside:
                pad = self.pad_before if day_ms < self.period.start_ms else self.pad_after
                pad[series].append((line.ts_ms, micros, self.calls))
                continue
            cell = self.cell(CellKey(day, account, model, token_type))
            cell.internal_micros += micros
            cell.internal_tokens += n
            cell.internal_requests += 1
            cell.by_workload[workload] = cell.by_workload.get(workload, 0) + micros
            cell.events.append((line.ts_ms, micros, self.calls))
            if line.failed:
                cell.failed_micros += micros
                cell.failed_tokens += n
                cell.failed_requests += 1
                cell.failed_calls.add(self.calls)


def _with_account(line: ProviderLine, account: str) -> ProviderLine:
    return replace(line, account=account)


# ------------------------------------------------------------------ categorisers


def _failed(rec: Reconciliation) -> None:
    for cell in sorted(rec.cells.values(), key=lambda c: c.key):
        if cell.failed_micros > 0 and cell.residual < 0:
            amount = min(-cell.residual, cell.failed_micros)
            cell.allocate(FAILED, -amount, f"{cell.failed_requests} failed attempt(s) "
                          "recorded internally, not billed by the provider")
            rec.evidence.failed_calls |= cell.failed_calls
            rec.evidence.failed_micros += cell.failed_micros


def _rate(micros: int, tokens: int) -> Fraction | None:
    return Fraction(micros, tokens) if tokens > 0 else None


def _cache(rec: Reconciliation) -> None:
    groups: dict[tuple[date, str, str], dict[str, Cell]] = defaultdict(dict)
    for key, cell in rec.cells.items():
        if key.token_type in INPUT_GROUP:
            groups[(key.day, key.account, key.model)][key.token_type] = cell
    for gkey in sorted(groups):
        present = groups[gkey]
        if len(present) < 2:
            continue
        billed = [c for c in present.values() if c.provider_has_cost or c.provider_tokens]
        known = bool(billed) and all(c.provider_tokens is not None for c in billed)
        if known:
            p_total = sum(c.provider_tokens or 0 for c in present.values())
            i_total = sum(c.billed_tokens for c in present.values())
            if p_total != i_total:
                continue
            moves: list[tuple[Cell, int, Fraction]] = []
            for cell in present.values():
                delta = (cell.provider_tokens or 0) - cell.billed_tokens
                if delta == 0:
                    continue
                rate = (_rate(cell.provider_micros, cell.provider_tokens or 0)
                        if cell.provider_has_cost else None)
                if rate is None:
                    rate = _rate(cell.internal_micros - cell.failed_micros, cell.billed_tokens)
                if rate is None:
                    moves = []
                    break
                moves.append((cell, delta, rate))
            if not moves:
                continue
            for cell, delta, rate in moves:
                kind = cell.key.token_type
                fresh = kind == INPUT
                if not fresh and delta > 0:
                    note = f"{delta:,} tokens billed as {kind} at the provider rate"
                    rec.evidence.cache_moved_tokens += delta
                elif not fresh:
                    note = f"{-delta:,} tokens recorded as {kind} internally"
                elif delta < 0:
                    note = f"{-delta:,} tokens priced as fresh input internally"
                else:
                    note = f"{delta:,} tokens billed as fresh input"
                cell.allocate(CACHE_RATE, round_fraction(delta * rate), note)
            cached = present.get(CACHED_INPUT)
            if cached is not None:
                rec.evidence.cache_provider_cached_tokens += cached.provider_tokens or 0
                rec.evidence.cache_internal_cached_tokens += cached.billed_tokens
            continue
        # Cost-only exports: a cache-read (or write) line the provider billed above
        # the internal figure, next to a fresh-input line the gateway priced higher,
        # netting to a saving: without token counts both lines are taken whole.
        fresh_cell = present.get(INPUT)
        if fresh_cell is None or fresh_cell.residual >= -fresh_cell.allowance:
            continue
        others = [c for t, c in present.items()
                  if t != INPUT and c.residual > c.allowance]
        if not others or fresh_cell.residual + sum(c.residual for c in others) >= 0:
            continue
        for other in others:
            other.allocate(CACHE_RATE, other.residual, f"billed as {other.key.token_type} "
                           "above the internal figure (cost-only export)")
        fresh_cell.allocate(CACHE_RATE, fresh_cell.residual, "priced as fresh input "
                            "internally (cost-only export)")


def _tier(rec: Reconciliation) -> None:
    series: dict[AccountKey, list[Cell]] = defaultdict(list)
    for key, cell in sorted(rec.cells.items()):
        if (cell.provider_has_cost and cell.provider_tokens and not cell.alloc
                and cell.provider_tokens == cell.billed_tokens):
            series[key.series].append(cell)
    for skey, cells in series.items():
        rates = [(c, Fraction(c.provider_micros, c.provider_tokens or 1)) for c in cells]
        # Only lines large enough that rounding cannot move their rate by 1% define
        # the rate levels.
        solid = [r for c, r in rates if c.provider_micros >= 100 * (c.allowance + 1)]
        levels: list[Fraction] = []
        for rate in sorted(solid):
            if not levels or rate - levels[-1] > levels[-1] * RATE_TOLERANCE:
                levels.append(rate)
        if len(levels) < 2:
            continue
        first_rate = rates[0][1]
        breakpoint_: tuple[date, Fraction, Fraction] | None = None
        for cell, rate in rates:
            internal_rate = Fraction(cell.internal_micros - cell.failed_micros,
                                     cell.billed_tokens)
            if (abs(cell.residual) > cell.allowance
                    and abs(rate - internal_rate) > internal_rate * RATE_TOLERANCE):
                cell.allocate(TIER, cell.residual,
                              f"provider rate {per_million(rate)} vs internal "
                              f"{per_million(internal_rate)} per 1M tokens")
                if breakpoint_ is None and abs(rate - first_rate) > first_rate * RATE_TOLERANCE:
                    breakpoint_ = (cell.key.day, first_rate, rate)
                elif breakpoint_ is None:
                    breakpoint_ = (cell.key.day, internal_rate, rate)
        if breakpoint_ is not None:
            rec.evidence.tier_breaks[skey] = breakpoint_


def per_million(rate: Fraction) -> str:
    """micro-USD per token is numerically USD per million tokens."""
    value = Decimal(rate.numerator) / Decimal(rate.denominator)
    return f"${value.quantize(Decimal('0.0001'), rounding=ROUND_HALF_EVEN).normalize():f}"


def _clock_skew(rec: Reconciliation, pad_before: dict[AccountKey, list[Event]],
                pad_after: dict[AccountKey, list[Event]]) -> None:
    period = rec.period
    skew_ms = rec.skew_hours * 3_600_000
    by_series: dict[AccountKey, dict[date, Cell]] = defaultdict(dict)
    for key, cell in rec.cells.items():
        by_series[key.series][key.day] = cell
    for series in set(pad_before) | set(pad_after):
        by_series.setdefault(series, {})
    ahead_accounts: set[str] = set()
    behind_accounts: set[str] = set()
    ev = rec.evidence

    def take(cell: Cell, amount: int, note: str, calls: list[Event]) -> None:
        """Allocate ``amount`` (signed) from the calls nearest the boundary first."""
        cell.allocate(CLOCK_SKEW, amount, note)
        used = 0
        for _, micros, call in calls:
            if used >= abs(amount):
                break
            used += micros
            ev.skew_call_ids.add(call)
        ev.skew_evidence_micros += used
        ev.skew_boundary_micros += amount
        ev.skew_days.add(cell.key.day)

    # Month boundaries: provider surplus matched by calls stamped just outside.
    for series, days in sorted(by_series.items()):
        last = days.get(period.last_day)
        after = sorted(e for e in pad_after.get(series, []) if e[0] < period.end_ms + skew_ms)
        if last is not None and last.residual > last.allowance and after:
            amount = min(last.residual, sum(e[1] for e in after))
            if amount > 0:
                take(last, amount, f"calls stamped in the first {rec.skew_hours} h of "
                     f"{period.next()}", after)
                ahead_accounts.add(series[0])
        first = days.get(period.first_day)
        before = sorted((e for e in pad_before.get(series, [])
                         if e[0] >= period.start_ms - skew_ms), reverse=True)
        if first is not None and first.residual > first.allowance and before:
            amount = min(first.residual, sum(e[1] for e in before))
            if amount > 0:
                take(first, amount, f"calls stamped in the last {rec.skew_hours} h of "
                     f"{period.previous()}", before)
                behind_accounts.add(series[0])
    # The mirror image at the other boundary, for telemetry shown to be offset.
    for series, days in sorted(by_series.items()):
        first = days.get(period.first_day)
        if series[0] in ahead_accounts and first is not None and first.residual < -first.allowance:
            early = sorted(e for e in first.events if e[0] < period.start_ms + skew_ms)
            amount = min(-first.residual, sum(e[1] for e in early))
            if amount > 0:
                take(first, -amount, "calls of the previous month stamped into this one",
                     early)
        last = days.get(period.last_day)
        if series[0] in behind_accounts and last is not None and last.residual < -last.allowance:
            late = sorted((e for e in last.events if e[0] >= period.end_ms - skew_ms), reverse=True)
            amount = min(-last.residual, sum(e[1] for e in late))
            if amount > 0:
                take(last, -amount, "calls of the next month stamped into this one", late)
    # Inside the month: offsetting gaps on adjacent days, matched by calls near the
    # midnight between them. They net to zero for the month.
    for _series, days in sorted(by_series.items()):
        for day in period.days()[:-1]:
            a, b = days.get(day), days.get(day + timedelta(days=1))
            if a is None or b is None:
                continue
            ra, rb = a.residual, b.residual
            midnight = b.key.day
            midnight_ms = int(_midnight_ms(midnight))
            if ra > a.allowance and rb < -b.allowance:
                moved = [e for e in b.events if e[0] < midnight_ms + skew_ms]
            elif ra < -a.allowance and rb > b.allowance:
                moved = [e for e in a.events if e[0] >= midnight_ms - skew_ms]
            else:
                continue
            amount = min(abs(ra), abs(rb), sum(e[1] for e in moved))
            if amount <= 0:
                continue
            sign = 1 if ra > 0 else -1
            a.allocate(CLOCK_SKEW, sign * amount, f"offset by {b.key.day.isoformat()}")
            b.allocate(CLOCK_SKEW, -sign * amount, f"offset by {a.key.day.isoformat()}")
            ev.skew_days.update({a.key.day, b.key.day})


def _midnight_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000


def _rounding(rec: Reconciliation) -> None:
    for cell in rec.cells.values():
        residual = cell.residual
        if residual and abs(residual) <= cell.allowance:
            cell.allocate(ROUNDING, residual)


def _unexplained(rec: Reconciliation, mapping: Mapping) -> None:
    for cell in sorted(rec.cells.values(), key=lambda c: c.key):
        residual = cell.residual
        if not residual:
            continue
        reasons: list[str] = []
        account = cell.key.account
        if account.startswith("(unmapped") or not mapping.is_mapped(rec.provider, account):
            reasons.append(f"account {account} is not in the mapping file")
        if not cell.provider_has_cost and cell.provider_tokens is None:
            reasons.append("internal usage the provider did not bill")
        elif cell.internal_requests == 0:
            reasons.append("billed by the provider, no internal usage recorded")
        elif cell.provider_tokens is not None and cell.provider_tokens != cell.billed_tokens:
            reasons.append(f"provider {cell.provider_tokens:,} tokens vs internal "
                           f"{cell.billed_tokens:,}")
        elif cell.provider_tokens:
            reasons.append(
                f"same tokens, provider rate "
                f"{per_million(Fraction(cell.provider_micros, cell.provider_tokens))} vs "
                f"internal {per_million(Fraction(cell.internal_micros, cell.internal_tokens))}"
                " per 1M tokens all month: check the price table")
        cell.allocate(UNEXPLAINED, residual, "; ".join(reasons))


def reconcile(period: Period, provider: str, provider_lines: list[ProviderLine],
              internal_lines: list[InternalUsageLine], mapping: Mapping,
              prices: PriceBook | None = None, skew_hours: int = 14) -> Reconciliation:
    builder = _Builder(period, provider, mapping, prices)
    for pline in provider_lines:
        builder.add_provider(pline)
    for iline in internal_lines:
        builder.add_internal(iline)
    rec = Reconciliation(
        period=period, provider=provider, cells=builder.cells,
        adjustments=builder.adjustments, window_lines=builder.window,
        boundary_lines=builder.boundary, evidence=builder.evidence,
        unmapped_accounts=sorted(builder.unmapped), skew_hours=skew_hours,
    )
    _failed(rec)
    _cache(rec)
    _tier(rec)
    _clock_skew(rec, builder.pad_before, builder.pad_after)
    _rounding(rec)
    _unexplained(rec, mapping)
    explained = sum(rec.category_net(c) for c, _ in CATEGORIES)
    if rec.internal_micros + explained != rec.invoice_micros:
        raise ReconcileError("internal error: the categories do not add up to the gap "
                             f"({rec.internal_micros} + {explained} != {rec.invoice_micros})")
    return rec


def workloads_of(rec: Reconciliation, mapping: Mapping, cell: Cell) -> list[Workload]:
    """The internal workloads behind a line item (mapped ones first)."""
    out = list(mapping.workloads_for(rec.provider, cell.key.account))
    for workload in sorted(cell.by_workload):
        if workload not in out:
            out.append(workload)
    return out
