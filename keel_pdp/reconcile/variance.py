"""Attribute every difference between the invoice and the ledger to a category,
request by request, with the evidence behind it.

The provider's card is read off the export: for each account, model, token
type, tier (long-context lines are their own series) and service tier (each
billed at its own rates; a request is re-rated at its own), the unit rate is the
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

from keel_pdp.reconcile.attribution import (
    REQUEST_ROUNDING_MICROS,
    Builder,
    attribute_lines,
    attribute_requests,
)
from keel_pdp.reconcile.categories import (
    CACHE_RATE,
    CATEGORIES,
    CLOCK_SKEW,
    CREDITS,
    FAILED,
    PRIOR_PERIOD,
    REQUEST_CATEGORIES,
    ROUNDING,
    TIER,
    TITLES,
    UNEXPLAINED,
)
from keel_pdp.reconcile.clocks import (
    LEDGER_CLOCK_TENANT,
    LEDGER_CLOCK_UTC,
    ledger_month,
    ledger_window_ms,
)
from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.internal_line import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping
from keel_pdp.reconcile.model import INPUT, OUTPUT, ProviderLine
from keel_pdp.reconcile.period import Period
from keel_pdp.reconcile.prices import PriceBook, PriceCards
from keel_pdp.reconcile.rates import MIN_RATE_RUN_DAYS, SNAP_RELATIVE, derive_card, per_million
from keel_pdp.reconcile.result import (
    Adjustment,
    Cell,
    CellKey,
    Evidence,
    Figures,
    Reconciliation,
    Series,
    workloads_of,
)


def reconcile(period: Period, provider: str, provider_lines: list[ProviderLine],
              internal_lines: list[InternalUsageLine], mapping: Mapping,
              prices: PriceBook | PriceCards | None = None, skew_hours: int = 14,
              ledger_clock: str = LEDGER_CLOCK_TENANT) -> Reconciliation:
    """Attribute every difference of ``provider``'s month (module docstring).

    Raises ``ReconcileError`` if any micro-dollar stays outside every category.
    """
    b = Builder(period, provider, mapping, prices, ledger_clock)
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
        attribute_requests(b, cards)
        attribute_lines(b)
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


__all__ = [
    "CACHE_RATE",
    "CATEGORIES",
    "CLOCK_SKEW",
    "CREDITS",
    "FAILED",
    "INPUT",
    "LEDGER_CLOCK_TENANT",
    "LEDGER_CLOCK_UTC",
    "MIN_RATE_RUN_DAYS",
    "OUTPUT",
    "PRIOR_PERIOD",
    "REQUEST_CATEGORIES",
    "REQUEST_ROUNDING_MICROS",
    "ROUNDING",
    "SNAP_RELATIVE",
    "TIER",
    "TITLES",
    "UNEXPLAINED",
    "Adjustment",
    "Cell",
    "CellKey",
    "Evidence",
    "Figures",
    "Reconciliation",
    "Series",
    "derive_card",
    "ledger_month",
    "ledger_window_ms",
    "per_million",
    "reconcile",
    "workloads_of",
]
