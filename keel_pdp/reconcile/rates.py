"""The provider's card: the unit rate each invoice line evidences, day by day.

For each series (account, model, token type, tier, service tier) the rate is a
line's amount over the tokens the provider billed on it, taken where the days
agree; a rate is snapped to a published price (USD per million tokens) when
rounding allows.
Arithmetic is exact (``Fraction``); a cost at a rate is rounded once, half-even,
to the micro-dollar.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

# A day needs this much evidence (days in a row at one rate) to set a rate that
# differs from the rest of the month.
MIN_RATE_RUN_DAYS = 2
# A published price is taken for the pooled rate only when it is this close.
SNAP_RELATIVE = Fraction(1, 100)


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
class RateDay:
    """One day of a series as its invoice line evidences it: amount over tokens."""

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


def _agree(a: RateDay, b: RateDay) -> bool:
    return abs(a.rate - b.rate) <= a.tolerance + b.tolerance


def _pooled(days: list[RateDay]) -> Fraction:
    amount = sum(d.amount for d in days)
    tokens = sum(d.tokens for d in days)
    rate = Fraction(amount, tokens)
    return _snap(rate, Fraction(sum(d.allowance for d in days), tokens))


def derive_card(days: list[RateDay]) -> dict[date, Fraction]:
    """The provider's rate for each day of a series, as its lines evidence it.

    The month's rate is the one most of the billed tokens agree on; a run of at
    least ``MIN_RATE_RUN_DAYS`` consecutive days at another rate is a rate
    change from its first day. A lone day off the rate does not set a rate: what
    its line carries beyond the card stays on the line (unexplained).
    """
    evidence = sorted((d for d in days if d.tokens > 0), key=lambda d: d.day)
    if not evidence:
        return {}
    best: list[RateDay] = []
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
    run: list[RateDay] = []

    def close(run: list[RateDay]) -> None:
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


def rate_on(card: dict[date, Fraction], day: date) -> Fraction | None:
    """The card's rate on ``day``: its own, the one in force before it, or the first."""
    if not card:
        return None
    if day in card:
        return card[day]
    before = [d for d in card if d <= day]
    return card[max(before)] if before else card[min(card)]


def at_rate(tokens: int, rate: Fraction) -> int:
    """``tokens x rate`` rounded half-even to the micro-dollar, in integers."""
    q, rest = divmod(tokens * rate.numerator, rate.denominator)
    twice = 2 * rest
    if twice > rate.denominator or (twice == rate.denominator and q % 2):
        q += 1
    return q
