"""Money as integer micro-USD.

Provider amounts arrive as decimal strings (or JSON numbers, which are parsed
straight into ``Decimal``); they are converted once, half-even, to integer
micro-USD. No float ever holds money.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000


def parse_decimal(text: object) -> Decimal:
    """A finite decimal from a string or an already parsed ``Decimal``/int."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a decimal amount")
    if isinstance(text, Decimal):
        value = text
    elif isinstance(text, int):
        value = Decimal(text)
    elif isinstance(text, str):
        try:
            value = Decimal(text.strip().replace(",", "")) if text.strip() else Decimal("NaN")
        except InvalidOperation as exc:
            raise ValueError(f"{text!r} is not a decimal amount") from exc
    else:
        raise ValueError(f"{text!r} is not a decimal amount (floats are not accepted for money)")
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite decimal amount")
    return value


def to_micros(value: Decimal, unit_micros: int = MICROS_PER_USD) -> int:
    """``value`` in units of ``unit_micros`` micro-USD, rounded half-even."""
    return int((value * unit_micros).to_integral_value(rounding=ROUND_HALF_EVEN))


def quantum_micros(value: Decimal, unit_micros: int = MICROS_PER_USD) -> int:
    """The smallest step the decimal string could express, in micro-USD (>= 1)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        return 1
    step = Decimal(unit_micros).scaleb(exponent)
    return max(1, int(step.to_integral_value(rounding=ROUND_HALF_EVEN)))


def round_fraction(value: Fraction) -> int:
    """Half-even rounding of an exact fraction of micro-USD."""
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor


def decimal_str(micros: int) -> str:
    """Integer micro-USD as a plain decimal string of USD with six places."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def usd(micros: int, *, signed: bool = False) -> str:
    """Human figure for the memo: cents, or micro-dollars below one cent."""
    sign = "-" if micros < 0 else ("+" if signed and micros > 0 else "")
    value = abs(micros)
    if 0 < value < MICROS_PER_CENT:
        whole, frac = divmod(value, MICROS_PER_USD)
        return f"{sign}${whole}.{frac:06d}"
    cents = int((Decimal(value) / MICROS_PER_CENT).to_integral_value(rounding=ROUND_HALF_EVEN))
    whole, frac = divmod(cents, 100)
    return f"{sign}${whole:,}.{frac:02d}"


def split_exact(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to non-negative ``weights``; parts sum to ``total``.

    Largest remainder, ties to the earlier weight, so the split is deterministic.
    Equal parts when every weight is zero.
    """
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    denominator = sum(weights)
    sign = -1 if total < 0 else 1
    magnitude = abs(total)
    floors = [magnitude * w // denominator for w in weights]
    rests = [magnitude * w % denominator for w in weights]
    left = magnitude - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-rests[i], i))
    for i in order[:left]:
        floors[i] += 1
    return [sign * f for f in floors]
