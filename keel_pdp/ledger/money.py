"""The ledger's names for the money functions of ``keel_pdp.money`` (their home).

``usd`` here is ``keel_pdp.money.usd_plain``: six fractional digits, for exports.
"""

from __future__ import annotations

from keel_pdp.money import MICROS_PER_USD, PICOS_PER_USD, parse_usd, ratio_percent, usd_from_pico
from keel_pdp.money import usd_plain as usd

__all__ = ["MICROS_PER_USD", "PICOS_PER_USD", "parse_usd", "ratio_percent", "usd",
           "usd_from_pico"]
