"""Credits and prior-period corrections among provider line items.

Provider usage and cost APIs describe consumption; credits and corrections show
up on the invoice or as specially described lines. A line whose description
names a credit or promotion (or a negative amount with no model) is a credit;
a line described as a correction or adjustment that names an earlier period
(``YYYY-MM``) belongs to that period.
"""

from __future__ import annotations

import re

from keel_pdp.reconcile.model import CORRECTION, CREDIT, USAGE
from keel_pdp.reconcile.period import Period

_CREDIT = re.compile(r"\b(credits?|promo|promotion(al)?|grant|free[- ]tier|voucher)\b", re.I)
_CORRECTION = re.compile(r"\b(correction|adjustment|adjusted|true[- ]?up|re-?bill(ed|ing)?)\b",
                         re.I)
_PERIOD_TEXT = re.compile(r"\b(20\d{2})-(0[1-9]|1[0-2])\b")


def classify(description: str, amount_micros: int | None, has_model: bool,
             period: Period) -> tuple[str, str]:
    """(kind, belongs_to period or "") for one provider line."""
    if _CORRECTION.search(description):
        for m in _PERIOD_TEXT.finditer(description):
            named = Period(int(m.group(1)), int(m.group(2)))
            if named < period:
                return CORRECTION, str(named)
    if _CREDIT.search(description):
        return CREDIT, ""
    if amount_micros is not None and amount_micros < 0 and not has_model:
        return CREDIT, ""
    return USAGE, ""
