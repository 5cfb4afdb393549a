"""Money, in one place: integer micro-USD inside, decimal USD strings outside.

Every amount Keel holds is an integer number of micro-USD (prices: pico-USD per
token). Strings become integers here (``parse_usd``, ``parse_decimal`` +
``to_micros``) and integers become strings here, in three documented shapes:

* ``usd_plain``  "12.345678" — six fractional digits, no sign of currency: CSV,
  JSON and ledger exports, where a program reads the figure back;
* ``format_usd`` "$1,234.50" — block reasons and policy diffs: cents when exact,
  else all six digits;
* ``usd_memo``   "$1,234.50" / "$0.000850" — the variance memo: cents (half-even),
  or micro-dollars below one cent, optionally signed.

Decimal and Fraction only: no float ever holds money.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000
PICOS_PER_USD = 1_000_000_000_000
MAX_MICROS = 10**15  # 1,000,000,000 USD: above any cap or invoice Keel handles


# ---------------------------------------------------------------------- parsing
def parse_decimal(text: object) -> Decimal:
    """A finite decimal from a string (thousands commas allowed) or an already
    parsed ``Decimal``/int; a float is refused."""
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


def parse_usd(text: str, *, non_negative: bool = False, max_micros: int | None = None) -> int:
    """Decimal USD string -> integer micro-USD, exactly: sub-micro precision, a
    negative amount (with ``non_negative``) or one above ``max_micros`` is refused
    with a ValueError naming the text."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a decimal amount") from exc
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite amount")
    if non_negative and value < 0:
        raise ValueError(f"{text!r} must be a finite, non-negative amount")
    micros = value.scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 fractional digits")
    if max_micros is not None and micros > max_micros:
        raise ValueError(f"{text!r} exceeds the supported maximum of "
                         f"{format_usd(max_micros).lstrip('$')} USD")
    return int(micros)


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


# --------------------------------------------------------------------- arithmetic
def round_fraction(value: Fraction) -> int:
    """Half-even rounding of an exact fraction of micro-USD."""
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor


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


def micros_half_even(pico: int) -> int:
    """Integer pico-USD -> integer micro-USD, rounded half to even: how a report,
    an export or a reconciliation line rounds the exact sum it shows, once."""
    q, rest = divmod(pico, 1_000_000)
    twice = 2 * rest
    if twice > 1_000_000 or (twice == 1_000_000 and q % 2):
        q += 1
    return q


def ratio_percent(part: int, whole: int) -> str:
    """part / whole as a percentage string with one decimal ("" when whole is 0)."""
    if whole == 0:
        return ""
    return str((Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.1")))


# --------------------------------------------------------------------- formatting
def usd_plain(micros: int) -> str:
    """Integer micro-USD -> "12.345678" (always six fractional digits)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def usd_from_pico(pico: int) -> str:
    """Integer pico-USD -> exact decimal USD string with trailing zeros removed."""
    value = Decimal(pico).scaleb(-12)
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def format_usd(micros: int) -> str:
    """Integer micro-USD -> "$1,234.50" for people: cents when exact, else all six
    digits. A message quotes the same amount the ledger books."""
    value = Decimal(micros).scaleb(-6)
    if value == value.quantize(Decimal("0.01")):
        return f"${value:,.2f}"
    return f"${value:,.6f}"


def usd_memo(micros: int, *, signed: bool = False) -> str:
    """The memo's figure: cents (half-even), or micro-dollars below one cent."""
    sign = "-" if micros < 0 else ("+" if signed and micros > 0 else "")
    value = abs(micros)
    if 0 < value < MICROS_PER_CENT:
        whole, frac = divmod(value, MICROS_PER_USD)
        return f"{sign}${whole}.{frac:06d}"
    cents = int((Decimal(value) / MICROS_PER_CENT).to_integral_value(rounding=ROUND_HALF_EVEN))
    whole, frac = divmod(cents, 100)
    return f"{sign}${whole:,}.{frac:02d}"
