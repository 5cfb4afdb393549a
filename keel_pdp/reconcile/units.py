"""Catch amounts read in the wrong unit before anything is written.

A cost export in cents read as dollars (or the reverse) is about 100 times off
the internal side, day after day; a line whose amount and token count imply
a price no provider charges is off against its own quantities. Either stops the
run (exit 2) naming the file and the likely unit error: a memo built on it would
explain a hundredfold gap as variance.

Each file is held against the internal figures of the accounts it carries on
that day: a pull filtered to some projects or workspaces (one file each) is a
share of the month, not a unit error.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from datetime import date
from fractions import Fraction

from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.internal import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping
from keel_pdp.reconcile.model import USAGE, ProviderLine
from keel_pdp.reconcile.period import Period, day_of_ms

# A file whose usage amounts are typically this many times above (or below) the
# internal figures of the same day is a unit error, not a variance.
RATIO_LIMIT = 10
# USD per 1M tokens no token type of any provider reaches (or falls under).
MAX_RATE = Fraction(1_000)  # micro-USD per token == USD per 1M tokens
MIN_RATE = Fraction(1, 1_000)
# Days with less than this on either side say nothing; fewer such days than
# MIN_DAYS, no verdict.
MIN_MICROS_DAY = 10_000
MIN_DAYS = 3


def check_units(provider: str, lines: list[ProviderLine],
                internal: list[InternalUsageLine], period: Period,
                mapping: Mapping | None = None) -> None:
    """Without ``mapping`` every file is held against the provider's whole day."""

    def account_of(row: InternalUsageLine) -> str:
        if mapping is None:
            return ""
        if row.account:
            return mapping.canonical_account(provider, row.account)
        try:
            return mapping.account_for(provider, row.tenant, row.workload) or ""
        except InputError:  # reported by the reconciliation itself
            return ""

    ours: dict[tuple[date, str], int] = defaultdict(int)
    for row in internal:
        if (row.provider.strip().lower() == provider.lower()
                and period.start_ms <= row.ts_ms < period.end_ms):
            ours[(day_of_ms(row.ts_ms), account_of(row))] += row.cost_micros
    by_file: dict[str, dict[date, int]] = defaultdict(lambda: defaultdict(int))
    accounts: dict[str, dict[date, set[str]]] = defaultdict(lambda: defaultdict(set))
    for ln in lines:
        if ln.kind != USAGE or ln.cost_micros is None:
            continue
        by_file[ln.source][ln.day] += ln.cost_micros
        accounts[ln.source][ln.day].add(
            mapping.canonical_account(provider, ln.account) if mapping is not None else "")
        if ln.tokens and ln.cost_micros > 0:
            rate = Fraction(ln.cost_micros, ln.tokens)
            if rate > MAX_RATE or rate < MIN_RATE:
                raise InputError(
                    ln.source, f"the amount and the {ln.tokens:,} {ln.token_type} tokens of "
                    f"this line imply {float(rate):.6g} USD per 1M tokens: the amounts are "
                    f"likely in the wrong unit ({_which(rate)})", where=ln.where)
    for source, days in sorted(by_file.items()):
        # Day by day, so one line that rose (a genuine variance) cannot pass for a
        # unit error, and a unit error, which moves every day, cannot hide.
        internal_day = {d: sum(ours.get((d, a), 0) for a in accounts[source][d])
                        for d in days}
        ratios = sorted(Fraction(theirs, internal_day[d]) for d, theirs in days.items()
                        if internal_day[d] >= MIN_MICROS_DAY and theirs >= MIN_MICROS_DAY)
        if len(ratios) < MIN_DAYS:
            continue
        typical = ratios[len(ratios) // 2]
        name = pathlib.PurePath(source).name
        if typical >= RATIO_LIMIT:
            raise InputError(source, f"its usage amounts are typically {float(typical):,.0f} "
                             f"times the internal figures of the same day: the amounts are "
                             f"likely cents read as dollars (or a wrong amount_unit); check "
                             f"{name}")
        if typical <= Fraction(1, RATIO_LIMIT):
            raise InputError(source, f"its usage amounts are typically 1/"
                             f"{float(1 / typical):,.0f} of the internal figures of the same "
                             f"day: the amounts are likely dollars read as cents (or a wrong "
                             f"amount_unit); check {name}")


def _which(rate: Fraction) -> str:
    return "cents read as dollars" if rate > MAX_RATE else "dollars read as cents"
