"""Attribute every difference between the invoice and the ledger to a category,
request by request, with the evidence behind it.

The provider's card is read off the export: for each account, model, token
type and tier (long-context lines are their own series), the unit rate is the
line amount over the tokens of the requests the provider billed on it, taken
where the days agree (a day whose line rose without usage behind it does not
set a rate). Every internal request is re-rated at that card; its difference
with what the ledger booked goes to one category by the request's own
evidence, in this order:

1. ``clock_skew``: the provider's month (UTC) and the ledger month (the
   tenant's own calendar month when the mapping gives it a time zone) differ;
   the request counts whole: + the provider's cost of a request the provider
   put in the period and the ledger did not, - the ledger's cost of the reverse;
2. ``failed_request_billing``: a failed attempt (either direction: billed by
   the provider and booked at $0, or booked and not billed); which error classes
   a provider bills is configuration (``failed_billing`` in the mapping);
3. ``tier_breakpoint``: input above the tier threshold, billed on tier-marked
   lines;
4. ``cache_read_rate``: the cache-read (or cache-write) tokens times the rate
   difference.

Line-level categories: ``credits`` and ``prior_period_correction`` (invoice
lines that are not usage), ``rounding`` (a line amount minus the per-request
provider costs at micro precision, within what rounding can produce, plus
per-request differences of a micro-dollar or two). Everything else is
``unexplained``, on the line item it sits on. Nothing is absorbed: in micro-USD,
per provider and per account, sum(categories) = provider total - internal total.
"""

from __future__ import annotations

import gc
import itertools
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.internal import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping, Workload
from keel_pdp.reconcile.model import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    CORRECTION,
    CREDIT,
    INPUT,
    OUTPUT,
    TOKEN_TYPES,
    ProviderLine,
    normalise_model,
)
from keel_pdp.reconcile.period import Period, day_of_ms
from keel_pdp.reconcile.prices import PriceBook, PriceCards

CLOCK_SKEW = "clock_skew"
CACHE_RATE = "cache_read_rate"
TIER = "tier_breakpoint"
FAILED = "failed_request_billing"
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
REQUEST_CATEGORIES = (CLOCK_SKEW, CACHE_RATE, TIER, FAILED)
# A request's difference on one token type up to this many micro-USD is the two
# sides rounding the same rate (the gateway rounds each request up).
REQUEST_ROUNDING_MICROS = 2
# A day needs this much evidence (days in a row at one rate) to set a rate that
# differs from the rest of the month.
MIN_RATE_RUN_DAYS = 2
# A published price is taken for the pooled rate only when it is this close.
SNAP_RELATIVE = Fraction(1, 100)
LEDGER_CLOCK_TENANT = "tenant"
LEDGER_CLOCK_UTC = "utc"

Series = tuple[str, str, str, str]  # account, model, token type, tier


@dataclass(frozen=True, slots=True, order=True)
class CellKey:
    day: date
    account: str
    model: str
    token_type: str
    tier: str = ""

    @property
    def series(self) -> Series:
        return (self.account, self.model, self.token_type, self.tier)


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
    cache_internal_rates: dict[tuple[str, str, str], set[Fraction]] = field(
        default_factory=lambda: defaultdict(set))


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


@dataclass
class _Request:
    line: InternalUsageLine
    account: str
    model: str
    day: date
    in_provider: bool
    in_ledger: bool
    tiered: bool
    billed: bool
    tokens: dict[str, int]
    internal: dict[str, int]
    provider: dict[str, int] = field(default_factory=dict)


def ledger_month(line: InternalUsageLine, mapping: Mapping, clock: str) -> Period:
    """The month the ledger books a request in: the tenant's local month."""
    zone = mapping.tenant_zone(line.tenant) if clock == LEDGER_CLOCK_TENANT else None
    return _month_at(line.ts_ms, zone)


def _month_at(ts_ms: int, zone: tzinfo | None) -> Period:
    at = datetime.fromtimestamp(ts_ms / 1000, tz=zone or UTC)
    return Period(at.year, at.month)


def ledger_window_ms(period: Period, mapping: Mapping, clock: str) -> tuple[int, int]:
    """Widest UTC window any tenant's ledger month of ``period`` can cover."""
    pad = 0
    if clock == LEDGER_CLOCK_TENANT:
        for t in mapping.doc.tenants:
            zone = mapping.tenant_zone(t.tenant)
            if zone is None:
                continue
            for edge in (period.start, period.end):
                offset = zone.utcoffset(edge.replace(tzinfo=None))
                if offset is not None:
                    pad = max(pad, abs(int(offset.total_seconds() * 1000)))
    return period.start_ms - pad - 3_600_000, period.end_ms + pad + 3_600_000


def per_million(rate: Fraction) -> str:
    """micro-USD per token is numerically USD per million tokens."""
    value = Decimal(rate.numerator) / Decimal(rate.denominator)
    text = value.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN).normalize()
    if text.as_tuple().exponent > -2:  # type: ignore[operator]
        text = text.quantize(Decimal("0.01"))
    return f"${text:f}"


def _snap(rate: Fraction, tolerance: Fraction) -> Fraction:
    """A published price (USD per 1M tokens, six decimals) when rounding allows it."""
    for digits in (0, 1, 2, 3, 4, 6):
        step = Fraction(1, 10 ** digits)
        snapped = Fraction(round(rate / step)) * step
        if abs(snapped - rate) <= min(tolerance, rate * SNAP_RELATIVE):
            return snapped
    return rate


@dataclass
class _Day:
    day: date
    amount: int
    tokens: int
    allowance: int

    @property
    def rate(self) -> Fraction:
        return Fraction(self.amount, self.tokens)

    @property
    def tolerance(self) -> Fraction:
        return Fraction(self.allowance, self.tokens)


def _agree(a: _Day, b: _Day) -> bool:
    return abs(a.rate - b.rate) <= a.tolerance + b.tolerance


def _pooled(days: list[_Day]) -> Fraction:
    amount = sum(d.amount for d in days)
    tokens = sum(d.tokens for d in days)
    rate = Fraction(amount, tokens)
    return _snap(rate, Fraction(sum(d.allowance for d in days), tokens))


def derive_card(days: list[_Day]) -> dict[date, Fraction]:
    """The provider's rate for each day of a series, as its lines evidence it.

    The month's rate is the one most of the billed tokens agree on; a run of at
    least ``MIN_RATE_RUN_DAYS`` consecutive days at another rate is a rate
    change from its first day. A lone day off the rate does not set a rate: what
    its line carries beyond the card stays on the line (unexplained).
    """
    evidence = sorted((d for d in days if d.tokens > 0), key=lambda d: d.day)
    if not evidence:
        return {}
    best: list[_Day] = []
    best_score = (-1, -1)
    for candidate in sorted(evidence, key=lambda d: -d.tokens)[:12]:
        agree = [d for d in evidence if _agree(d, candidate)]
        score = (sum(d.tokens for d in agree), len(agree))
        if score > best_score:
            best, best_score = agree, score
    main = _pooled(best)
    card: dict[date, Fraction] = {d.day: main for d in evidence}
    members = {d.day for d in best}
    others = [d for d in evidence if d.day not in members]
    run: list[_Day] = []

    def close(run: list[_Day]) -> None:
        if len(run) >= MIN_RATE_RUN_DAYS:
            rate = _pooled(run)
            for d in run:
                card[d.day] = rate

    for d in others:
        if run and (d.day - run[-1].day == timedelta(days=1)) and _agree(d, run[0]):
            run.append(d)
        else:
            close(run)
            run = [d]
    close(run)
    # Days without evidence take the rate in force before them (or the month's).
    return card


def _rate_on(card: dict[date, Fraction], day: date) -> Fraction | None:
    if not card:
        return None
    if day in card:
        return card[day]
    before = [d for d in card if d <= day]
    return card[max(before)] if before else card[min(card)]


class _Builder:
    def __init__(self, period: Period, provider: str, mapping: Mapping,
                 prices: PriceBook | PriceCards | None, ledger_clock: str) -> None:
        self.period = period
        self.provider = provider
        self.mapping = mapping
        self.prices = prices
        self.clock = ledger_clock
        self.aliases = mapping.aliases(provider)
        self.cells: dict[CellKey, Cell] = {}
        self.adjustments: list[Adjustment] = []
        self.requests: list[_Request] = []
        self.window: list[InternalUsageLine] = []
        self.boundary: list[InternalUsageLine] = []
        self.evidence = Evidence()
        self.unmapped: set[str] = set()
        self.tier_series: dict[tuple[str, str], int] = {}  # (account, model) -> threshold
        self.zones: dict[str, tzinfo | None] = {}
        self.start_ms, self.end_ms = period.start_ms, period.end_ms
        self.accounts: dict[tuple[str, str, str], str] = {}

    def cell(self, key: CellKey) -> Cell:
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = Cell(key)
        return found

    def add_provider(self, line: ProviderLine) -> None:
        account = self.mapping.canonical_account(self.provider, line.account)
        if line.kind == CREDIT:
            self.adjustments.append(Adjustment(CREDITS, replace(line, account=account)))
            return
        if line.kind == CORRECTION:
            self.adjustments.append(Adjustment(PRIOR_PERIOD, replace(line, account=account)))
            return
        if not self.mapping.is_mapped(self.provider, account):
            self.unmapped.add(account)
        key = CellKey(line.day, account, line.model, line.token_type, line.tier)
        cell = self.cell(key)
        if line.tier:
            threshold = line.tier_from or self.mapping.tier_threshold(self.provider, line.model)
            self.tier_series[(account, line.model)] = threshold
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
        in_provider = self.start_ms <= line.ts_ms < self.end_ms
        if line.tenant not in self.zones:
            self.zones[line.tenant] = (self.mapping.tenant_zone(line.tenant)
                                       if self.clock == LEDGER_CLOCK_TENANT else None)
        in_ledger = _month_at(line.ts_ms, self.zones[line.tenant]) == self.period
        if in_ledger:
            self.window.append(line)
        else:
            self.boundary.append(line)
        if not (in_provider or in_ledger):
            return
        model = normalise_model(line.model, self.aliases)
        akey = (line.account, line.tenant, line.workload)
        account = self.accounts.get(akey)
        if account is None:
            account = self.accounts[akey] = self.internal_account(line)
        if account.startswith("(unmapped"):
            self.unmapped.add(account)
        book = (self.prices.book(account) if isinstance(self.prices, PriceCards)
                else self.prices)
        costs = line.costs_by_type(book, model)
        tokens = line.tokens_by_type()
        billed = (not line.failed) or self.mapping.failed_attempt_billed(
            self.provider, line.error_type, line.status)
        self.requests.append(_Request(
            line=line, account=account, model=model, day=day_of_ms(line.ts_ms),
            in_provider=in_provider, in_ledger=in_ledger, tiered=False, billed=billed,
            tokens={t: tokens.get(t, 0) for t in TOKEN_TYPES},
            internal={t: costs.get(t, 0) for t in TOKEN_TYPES}))

    # ------------------------------------------------------------------ the card

    def route(self) -> None:
        """Tier requests, and the billed tokens of every provider line."""
        for r in self.requests:
            threshold = self.tier_series.get((r.account, r.model))
            r.tiered = threshold is not None and r.line.input_tokens > threshold
            workload = (r.line.tenant, r.line.workload)
            for t in TOKEN_TYPES:
                n, micros = r.tokens[t], r.internal[t]
                if n == 0 and micros == 0:
                    continue
                cell = self.cell(self.key(r, t))
                if r.in_ledger:
                    cell.internal_micros += micros
                    cell.internal_tokens += n
                    cell.internal_requests += 1
                    cell.by_workload[workload] = cell.by_workload.get(workload, 0) + micros
                if r.in_provider and r.billed:
                    cell.billed_tokens += n
                    cell.billed_requests += 1

    def key(self, r: _Request, token_type: str) -> CellKey:
        return CellKey(r.day, r.account, r.model, token_type,
                       "long_context" if r.tiered else "")

    def rate_tokens(self, key: CellKey, cell: Cell) -> int:
        """The tokens a line's amount is divided by: the provider's own count when
        its usage export gives one for exactly this line (so requests the gateway
        missed do not inflate the rate), else those of the requests it billed."""
        if (cell.provider_tokens and not key.tier
                and (key.account, key.model) not in self.tier_series):
            return cell.provider_tokens
        return cell.billed_tokens

    def cards(self) -> dict[Series, dict[date, Fraction]]:
        by_series: dict[Series, list[_Day]] = defaultdict(list)
        for key, cell in self.cells.items():
            tokens = self.rate_tokens(key, cell)
            if cell.provider_has_cost and tokens > 0 and cell.billed_tokens > 0:
                by_series[key.series].append(_Day(
                    key.day, cell.provider_micros, tokens,
                    cell.provider_allowance + cell.billed_requests + 1))
        cards = {s: derive_card(days) for s, days in by_series.items()}
        for s, card in cards.items():
            self.evidence.rates[s] = sorted(card.items())
        return cards


# ------------------------------------------------------------------ attribution


def _attribute(b: _Builder, cards: dict[Series, dict[date, Fraction]]) -> None:
    ev = b.evidence
    for r in sorted(b.requests, key=lambda x: (x.line.ts_ms, x.line.request_id)):
        rid = r.line.request_id
        for t in TOKEN_TYPES:
            n = r.tokens[t]
            rate = _rate_on(cards.get(b.key(r, t).series, {}), r.day)
            r.provider[t] = (_times(n, rate) if r.billed and r.in_provider
                             and rate is not None else 0)
        if r.in_provider and not r.in_ledger:
            _claim(b, r, CLOCK_SKEW, r.provider, {t: 0 for t in TOKEN_TYPES},
                   "billed in this month; the ledger books it in "
                   f"{ledger_month(r.line, b.mapping, b.clock)} (tenant clock)")
            if sum(r.provider.values()):
                ev.skew_provider_only.append(rid)
                ev.skew_provider_micros += sum(r.provider.values())
            continue
        if r.in_ledger and not r.in_provider:
            _claim(b, r, CLOCK_SKEW, {t: 0 for t in TOKEN_TYPES}, r.internal,
                   "booked in this month on the tenant clock; billed by the provider in "
                   f"{Period(r.day.year, r.day.month)} (UTC)")
            if sum(r.internal.values()):
                ev.skew_ledger_only.append(rid)
                ev.skew_ledger_micros += sum(r.internal.values())
            continue
        # A failed attempt one side charged and the other did not. One both sides
        # charged differs (if at all) for the reasons an ordinary request does.
        billed_by_one = (sum(r.provider.values()) > REQUEST_ROUNDING_MICROS) != (
            sum(r.internal.values()) > REQUEST_ROUNDING_MICROS)
        if r.line.failed and billed_by_one:
            kind = r.line.error_type or r.line.status
            note = (f"failed attempts ({kind}) the provider bills" if r.billed
                    else f"failed attempts ({kind}) the provider does not bill")
            _claim(b, r, FAILED, r.provider, r.internal, note)
            side = ev.failed_billed if r.billed else ev.failed_unbilled
            side[0] += 1
            side[1] += sum(r.provider.values())
            side[2] += sum(r.internal.values())
            continue
        if r.tiered:
            _claim(b, r, TIER, r.provider, r.internal,
                   "input above the long-context threshold, billed on tier lines")
            continue
        for t in TOKEN_TYPES:
            diff = r.provider[t] - r.internal[t]
            cell = b.cell(b.key(r, t))
            if diff == 0:
                continue
            if abs(diff) <= REQUEST_ROUNDING_MICROS:
                cell.allocate(ROUNDING, diff)
            elif t in (CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H) and r.tokens[t] > 0:
                _claim_one(b, r, t, CACHE_RATE, cell, diff,
                           f"{t} priced differently internally")
                ev.cache_internal_rates[(r.account, r.model, t)].add(
                    Fraction(r.internal[t], r.tokens[t]))
            else:
                if r.account.startswith("(unmapped") or not b.mapping.is_mapped(
                        b.provider, r.account):
                    note = f"account {r.account} is not in the mapping file"
                elif b.key(r, t).series not in cards:
                    note = ("no provider line for this account, model and token type "
                            "(not billed, or billed under another account or model)")
                elif r.tokens[t] and len(set(cards[b.key(r, t).series].values())) > 1:
                    note = _rate_change(cards[b.key(r, t).series])
                elif r.tokens[t]:
                    note = ("same tokens at a different rate with no evidence for it "
                            "(check the price table)")
                else:
                    note = "cost booked without tokens"
                cell.allocate(UNEXPLAINED, diff, note)
                if rid not in ev.requests[UNEXPLAINED]:
                    ev.requests[UNEXPLAINED].append(rid)


def _rate_change(card: dict[date, Fraction]) -> str:
    """A provider rate that changed during the month, which the internal card
    did not follow: not a tier (no tier lines), so unexplained, with the dates."""
    days = sorted(card)
    changes = [f"{per_million(card[a])} to {per_million(card[d])} per 1M tokens on "
               f"{d.isoformat()}" for a, d in itertools.pairwise(days)
               if card[a] != card[d]]
    return ("the provider's rate changed during the month (" + "; ".join(changes[:3])
            + ") and the internal price table did not: check it")


def _times(tokens: int, rate: Fraction) -> int:
    """``tokens x rate`` rounded half-even to the micro-dollar, in integers."""
    q, rest = divmod(tokens * rate.numerator, rate.denominator)
    twice = 2 * rest
    if twice > rate.denominator or (twice == rate.denominator and q % 2):
        q += 1
    return q


def _claim(b: _Builder, r: _Request, category: str, provider: dict[str, int],
           internal: dict[str, int], note: str) -> None:
    claimed = False
    for t in TOKEN_TYPES:
        diff = provider[t] - internal[t]
        if diff == 0 and not r.tokens[t]:
            continue
        fig = b.evidence.figures[category][t]
        fig.tokens += r.tokens[t]
        fig.provider_micros += provider[t]
        fig.internal_micros += internal[t]
        if diff:
            b.cell(b.key(r, t)).allocate(category, diff, note)
            claimed = True
    if claimed:
        b.evidence.requests[category].append(r.line.request_id)


def _claim_one(b: _Builder, r: _Request, t: str, category: str, cell: Cell, diff: int,
               note: str) -> None:
    fig = b.evidence.figures[category][t]
    fig.tokens += r.tokens[t]
    fig.provider_micros += r.provider[t]
    fig.internal_micros += r.internal[t]
    cell.allocate(category, diff, note)
    ids = b.evidence.requests[category]
    if not ids or ids[-1] != r.line.request_id:
        ids.append(r.line.request_id)


def _lines(b: _Builder) -> None:
    """What a line carries beyond its requests at the card: rounding or unexplained."""
    repriced: dict[CellKey, int] = defaultdict(int)
    for r in b.requests:
        if r.in_provider:
            for t in TOKEN_TYPES:
                if r.provider[t]:
                    repriced[b.key(r, t)] += r.provider[t]
    for key, cell in sorted(b.cells.items()):
        cell.repriced_micros = repriced.get(key, 0)
        rest = cell.provider_micros - cell.repriced_micros
        if rest == 0:
            continue
        bound = cell.provider_allowance + (cell.billed_requests + 1) // 2 + 1
        if cell.provider_has_cost and cell.billed_tokens and abs(rest) <= bound:
            cell.allocate(ROUNDING, rest)
            continue
        if cell.billed_tokens == 0:
            note = "billed by the provider, no internal usage recorded"
        elif not cell.provider_has_cost:
            note = "internal usage the provider did not bill"
        elif cell.provider_tokens is not None and b.rate_tokens(key, cell) != (
                cell.billed_tokens):
            note = (f"provider {cell.provider_tokens:,} tokens vs internal "
                    f"{cell.billed_tokens:,} billable tokens")
        else:
            note = (f"the line carries {rest / 1_000_000:+.6f} USD beyond its "
                    f"{cell.billed_requests} request(s) at the provider's card")
        if not b.mapping.is_mapped(b.provider, key.account):
            note = f"account {key.account} is not in the mapping file; {note}"
        cell.allocate(UNEXPLAINED, rest, note)
        b.evidence.lines[UNEXPLAINED].extend(cell.provider_refs)


def reconcile(period: Period, provider: str, provider_lines: list[ProviderLine],
              internal_lines: list[InternalUsageLine], mapping: Mapping,
              prices: PriceBook | PriceCards | None = None, skew_hours: int = 14,
              ledger_clock: str = LEDGER_CLOCK_TENANT) -> Reconciliation:
    b = _Builder(period, provider, mapping, prices, ledger_clock)
    # Hundreds of thousands of small objects and no reference cycles among them:
    # the cyclic collector would only rescan them over and over (superlinear).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for pline in provider_lines:
            b.add_provider(pline)
        for iline in internal_lines:
            b.add_internal(iline)
        b.route()
        cards = b.cards()
        _attribute(b, cards)
        _lines(b)
    finally:
        if collecting:
            gc.enable()
    for adj in b.adjustments:
        b.evidence.lines[adj.category].append(adj.line_id)
    rec = Reconciliation(
        period=period, provider=provider, cells=b.cells,
        adjustments=b.adjustments, window_lines=b.window,
        boundary_lines=b.boundary, evidence=b.evidence,
        unmapped_accounts=sorted(b.unmapped), skew_hours=skew_hours,
        ledger_clock=ledger_clock,
    )
    for cell in rec.cells.values():
        if cell.residual:
            raise ReconcileError(f"internal error: line {cell.key} keeps {cell.residual} "
                                 "micro-USD outside every category")
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


__all__ = ["INPUT", "OUTPUT"]
