"""Reconciliation's names for the money functions of ``keel_pdp.money`` (their home).

``usd`` here is ``keel_pdp.money.usd_memo`` (cents, or micro-dollars below a cent)
and ``decimal_str`` is ``keel_pdp.money.usd_plain``.
"""

from __future__ import annotations

from keel_pdp.money import (
    MICROS_PER_CENT,
    MICROS_PER_USD,
    parse_decimal,
    quantum_micros,
    round_fraction,
    split_exact,
    to_micros,
)
from keel_pdp.money import usd_memo as usd
from keel_pdp.money import usd_plain as decimal_str

__all__ = ["MICROS_PER_CENT", "MICROS_PER_USD", "decimal_str", "parse_decimal",
           "quantum_micros", "round_fraction", "split_exact", "to_micros", "usd"]
