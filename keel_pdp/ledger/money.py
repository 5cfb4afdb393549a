"""The ledger's names for the money functions of ``keel_pdp.money`` (their home).

``usd`` here is ``keel_pdp.money.usd_plain``: six fractional digits, for exports.

Exact amounts: a settlement books its cost rounded up to the micro-dollar (the
budgets move by it) and keeps the exact cost in pico-USD beside it. Reports,
exports and reconciliation sum the exact amounts and round each output line
once, half to even (``micros_half_even``), as reconciliation rounds a provider's
per-request cost.
"""

from __future__ import annotations

from keel_pdp.money import (
    MICROS_PER_USD,
    PICOS_PER_USD,
    micros_half_even,
    parse_usd,
    ratio_percent,
    usd_from_pico,
)
from keel_pdp.money import usd_plain as usd

__all__ = ["MICROS_PER_USD", "PICOS_PER_MICRO", "PICOS_PER_USD", "micros_half_even", "parse_usd",
           "ratio_percent", "usd", "usd_from_pico"]


PICOS_PER_MICRO = 1_000_000
