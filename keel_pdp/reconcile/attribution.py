"""Both sides of one provider's month, gathered onto line items and attributed.

``Builder`` rolls the provider lines and the internal requests up to line items
(``Cell``) and derives the provider's card (``keel_pdp.reconcile.rates``), one
per service tier: a request is re-rated at its own tier's card, never at a blend
of the tiers an account and model were billed at (``Builder.place_provider``,
``Builder.route`` say how a side that does not say its tier is placed);
``attribute_requests`` re-rates every request at that card and puts its
difference in one category by its own evidence (the order is in
``keel_pdp.reconcile.variance``); ``attribute_lines`` puts what a line carries
beyond its requests in rounding or unexplained.
"""

from __future__ import annotations

import itertools
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, tzinfo
from fractions import Fraction

from keel_pdp.reconcile.categories import (
    CACHE_RATE,
    CLOCK_SKEW,
    CREDITS,
    FAILED,
    PRIOR_PERIOD,
    ROUNDING,
    TIER,
    UNEXPLAINED,
)
from keel_pdp.reconcile.clocks import LEDGER_CLOCK_TENANT, ledger_month, month_at
from keel_pdp.reconcile.internal_line import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping
from keel_pdp.reconcile.model import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    CORRECTION,
    CREDIT,
    STANDARD_TIER,
    TOKEN_TYPES,
    ProviderLine,
    normalise_model,
)
from keel_pdp.reconcile.period import Period, day_of_ms
from keel_pdp.reconcile.prices import PriceBook, PriceCards
from keel_pdp.reconcile.rates import RateDay, at_rate, derive_card, per_million, rate_on
from keel_pdp.reconcile.result import Adjustment, Cell, CellKey, Evidence, Series

# A request's difference on one token type up to this many micro-USD is the two
# sides rounding the same rate (the gateway rounds each request up).
REQUEST_ROUNDING_MICROS = 2


@dataclass
class RequestCosts:
    """One internal request: its tokens and its cost on each side, by token type."""

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
    # The service tier it is re-rated at: its own, else resolved in ``route``.
    service_tier: str = ""
    # Not recorded, and the provider billed its account and model at several tiers:
    # attributed at the standard tier, its difference shown, never blended.
    tier_assumed: bool = False


class Builder:
    """Gathers one provider's month, both sides, onto line items (``Cell``)."""

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
        self.requests: list[RequestCosts] = []
        self.window: list[InternalUsageLine] = []
        self.boundary: list[InternalUsageLine] = []
        self.evidence = Evidence()
        self.unmapped: set[str] = set()
        # (account, model, service tier) -> long-context threshold
        self.tier_series: dict[tuple[str, str, str], int] = {}
        self.pending: list[ProviderLine] = []
        # (account, model) -> the service tiers each side says it was billed at
        self.provider_told: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.internal_told: dict[tuple[str, str], set[str]] = defaultdict(set)
        # (account, model) -> the tiers each side was placed at
        self.provider_tiers: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.internal_tiers: dict[tuple[str, str], set[str]] = defaultdict(set)
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
        if account != line.account:
            line = replace(line, account=account)
        self.pending.append(line)
        if line.service_tier:
            self.provider_told[(account, line.model)].add(line.service_tier)

    def provider_tier(self, line: ProviderLine) -> str | None:
        """The tier of a provider line. A line whose export does not say takes the
        tier the rest of the export gives its account and model when that is one
        tier, else the internal side's when that is one (nothing to blend), else
        the standard tier. Usage without money on an account and model the export
        bills at several tiers is left out (None): its tokens cover every tier, and
        the rates are then read over the requests' tokens."""
        if line.service_tier:
            return line.service_tier
        told = self.provider_told.get((line.account, line.model))
        if told:
            if len(told) == 1:
                return next(iter(told))
            return STANDARD_TIER if line.cost_micros is not None else None
        inside = self.internal_told.get((line.account, line.model))
        if inside and len(inside) == 1:
            return next(iter(inside))
        return STANDARD_TIER

    def place_provider(self) -> None:
        """Every provider line onto its line item, at its service tier."""
        for line in self.pending:
            service_tier = self.provider_tier(line)
            if service_tier is None:
                continue
            self._place(line, service_tier)
        self.pending = []

    def _place(self, line: ProviderLine, service_tier: str) -> None:
        account = line.account
        self.provider_tiers[(account, line.model)].add(service_tier)
        key = CellKey(line.day, account, line.model, line.token_type, line.tier, service_tier)
        cell = self.cell(key)
        if line.tier:
            threshold = line.tier_from or self.mapping.tier_threshold(self.provider, line.model)
            self.tier_series[(account, line.model, service_tier)] = threshold
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
        in_ledger = month_at(line.ts_ms, self.zones[line.tenant]) == self.period
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
        if line.service_tier:
            self.internal_told[(account, model)].add(line.service_tier)
        self.requests.append(RequestCosts(
            line=line, account=account, model=model, day=day_of_ms(line.ts_ms),
            in_provider=in_provider, in_ledger=in_ledger, tiered=False, billed=billed,
            tokens={t: tokens.get(t, 0) for t in TOKEN_TYPES},
            internal={t: costs.get(t, 0) for t in TOKEN_TYPES},
            service_tier=line.service_tier))

    # ------------------------------------------------------------------ the card

    def route(self) -> None:
        """Place the provider lines, tier requests, and the billed tokens of every
        provider line.

        A request without a recorded service tier takes its account and model's
        tier when the provider billed them at one; when it billed several, the
        request is attributed at the standard tier and flagged (``tier_assumed``),
        so its difference shows instead of blending into another tier's card."""
        self.place_provider()
        for r in self.requests:
            if not r.service_tier:
                billed_at = self.provider_tiers.get((r.account, r.model))
                if billed_at and len(billed_at) == 1:
                    r.service_tier = next(iter(billed_at))
                else:
                    r.service_tier = STANDARD_TIER
                    r.tier_assumed = bool(billed_at)
            if r.in_provider:
                self.internal_tiers[(r.account, r.model)].add(r.service_tier)
            threshold = self.tier_series.get((r.account, r.model, r.service_tier))
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

    def key(self, r: RequestCosts, token_type: str) -> CellKey:
        return CellKey(r.day, r.account, r.model, token_type,
                       "long_context" if r.tiered else "", r.service_tier)

    def rate_tokens(self, key: CellKey, cell: Cell) -> int:
        """The tokens a line's amount is divided by: the provider's own count when
        its usage export gives one for exactly this line (so requests the gateway
        missed do not inflate the rate), else those of the requests it billed."""
        if (cell.provider_tokens and not key.tier
                and (key.account, key.model, key.service_tier) not in self.tier_series):
            return cell.provider_tokens
        return cell.billed_tokens

    def cards(self) -> dict[Series, dict[date, Fraction]]:
        by_series: dict[Series, list[RateDay]] = defaultdict(list)
        for key, cell in self.cells.items():
            tokens = self.rate_tokens(key, cell)
            if cell.provider_has_cost and tokens > 0 and cell.billed_tokens > 0:
                by_series[key.series].append(RateDay(
                    key.day, cell.provider_micros, tokens,
                    cell.provider_allowance + cell.billed_requests + 1))
        cards = {s: derive_card(days) for s, days in by_series.items()}
        for s, card in cards.items():
            self.evidence.rates[s] = sorted(card.items())
        return cards


# ------------------------------------------------------------------ attribution


def attribute_requests(b: Builder, cards: dict[Series, dict[date, Fraction]]) -> None:
    """Re-rate every request at the card and put its difference in one category."""
    ev = b.evidence
    for r in sorted(b.requests, key=lambda x: (x.line.ts_ms, x.line.request_id)):
        rid = r.line.request_id
        for t in TOKEN_TYPES:
            n = r.tokens[t]
            rate = rate_on(cards.get(b.key(r, t).series, {}), r.day)
            r.provider[t] = (at_rate(n, rate) if r.billed and r.in_provider
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
            elif (t in (CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H) and r.tokens[t] > 0
                  and not r.tier_assumed and b.key(r, t).series in cards):
                _claim_one(b, r, t, CACHE_RATE, cell, diff,
                           f"{t} priced differently internally")
                ev.cache_internal_rates[(r.account, r.model, t, r.service_tier)].add(
                    Fraction(r.internal[t], r.tokens[t]))
            else:
                billed_at = sorted(b.provider_tiers.get((r.account, r.model), ()))
                if r.account.startswith("(unmapped") or not b.mapping.is_mapped(
                        b.provider, r.account):
                    note = f"account {r.account} is not in the mapping file"
                elif r.tier_assumed:
                    note = (f"service tier not recorded: attributed at the {STANDARD_TIER} "
                            "tier, but the provider billed this account and model at "
                            f"{', '.join(billed_at)} (record each request's service_tier)")
                elif b.key(r, t).series not in cards and billed_at and (
                        r.service_tier not in billed_at):
                    note = (f"no provider line at the {r.service_tier} service tier for this "
                            "account and model: the provider billed it at "
                            f"{', '.join(billed_at)}")
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


def _claim(b: Builder, r: RequestCosts, category: str, provider: dict[str, int],
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


def _claim_one(b: Builder, r: RequestCosts, t: str, category: str, cell: Cell, diff: int,
               note: str) -> None:
    fig = b.evidence.figures[category][t]
    fig.tokens += r.tokens[t]
    fig.provider_micros += r.provider[t]
    fig.internal_micros += r.internal[t]
    cell.allocate(category, diff, note)
    ids = b.evidence.requests[category]
    if not ids or ids[-1] != r.line.request_id:
        ids.append(r.line.request_id)


def attribute_lines(b: Builder) -> None:
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
        recorded = b.internal_tiers.get((key.account, key.model), set())
        if cell.billed_tokens == 0 and recorded and key.service_tier not in recorded:
            note = (f"billed by the provider at the {key.service_tier} service tier; the "
                    f"internal usage of this account and model is at "
                    f"{', '.join(sorted(recorded))}")
        elif cell.billed_tokens == 0:
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
