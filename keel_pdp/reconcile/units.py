"""Catch amounts read in the wrong unit before anything is written.

A cost export in cents read as dollars (or the reverse) is about 100 times off
the internal side for the same month; a line whose amount and token count imply
a price no provider charges is off against its own quantities. Either stops the
run (exit 2) naming the file and the likely unit error: a memo built on it would
explain a hundredfold gap as variance.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from fractions import Fraction

from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.internal import InternalUsageLine
from keel_pdp.reconcile.model import USAGE, ProviderLine
from keel_pdp.reconcile.period import Period

# A file's usage total this many times above (or below) the internal total of
# the month is a unit error, not a variance.
RATIO_LIMIT = 10
# USD per 1M tokens no token type of any provider reaches (or falls under).
MAX_RATE = Fraction(1_000)  # micro-USD per token == USD per 1M tokens
MIN_RATE = Fraction(1, 1_000)
# Below this much money on both sides the ratio says nothing.
MIN_MICROS = 1_000_000


def check_units(provider: str, lines: list[ProviderLine],
                internal: list[InternalUsageLine], period: Period) -> None:
    ours = sum(ln.cost_micros for ln in internal
               if ln.provider.strip().lower() == provider.lower()
               and period.start_ms <= ln.ts_ms < period.end_ms)
    by_file: dict[str, int] = defaultdict(int)
    for ln in lines:
        if ln.kind != USAGE or ln.cost_micros is None:
            continue
        by_file[ln.source] += ln.cost_micros
        if ln.tokens and ln.cost_micros > 0:
            rate = Fraction(ln.cost_micros, ln.tokens)
            if rate > MAX_RATE or rate < MIN_RATE:
                raise InputError(
                    ln.source, f"the amount and the {ln.tokens:,} {ln.token_type} tokens of "
                    f"this line imply {float(rate):.6g} USD per 1M tokens: the amounts are "
                    f"likely in the wrong unit ({_which(rate)})", where=ln.where)
    for source, theirs in sorted(by_file.items()):
        if theirs < MIN_MICROS and ours < MIN_MICROS:
            continue
        name = pathlib.PurePath(source).name
        if ours > 0 and theirs >= ours * RATIO_LIMIT:
            raise InputError(source, f"its usage amounts total {theirs / ours:,.0f} times the "
                             f"internal total of {period}: the amounts are likely cents read "
                             f"as dollars (or a wrong amount_unit); check {name}")
        if theirs > 0 and ours >= theirs * RATIO_LIMIT:
            raise InputError(source, f"its usage amounts total 1/{ours / theirs:,.0f} of the "
                             f"internal total of {period}: the amounts are likely dollars "
                             f"read as cents (or a wrong amount_unit); check {name}")


def _which(rate: Fraction) -> str:
    return "cents read as dollars" if rate > MAX_RATE else "dollars read as cents"
