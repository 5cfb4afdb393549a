"""The categories a difference between invoice and ledger is attributed to.

Their names are the memo's, the report's and the CSV outputs' column names, and
their order is the order the memo lists them in; ``keel_pdp.reconcile.variance``
says which evidence puts a difference in each.
"""

from __future__ import annotations

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
