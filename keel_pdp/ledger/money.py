"""Money at the edge: integer micro-USD inside, decimal USD strings outside.

Nothing here ever holds money in a float; formatting goes through Decimal.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
PICOS_PER_USD = 1_000_000_000_000


def usd(micros: int) -> str:
    """Integer micro-USD -> "12.345678" (always six fractional digits)."""
    return str(Decimal(micros).scaleb(-6).quantize(Decimal("0.000001")))


def usd_from_pico(pico: int) -> str:
    """Integer pico-USD -> exact decimal USD string with trailing zeros removed."""
    value = Decimal(pico).scaleb(-12)
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def parse_usd(text: str) -> int:
    """Decimal USD string -> integer micro-USD; rejects sub-micro precision."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a decimal amount") from exc
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite amount")
    micros = value.scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 fractional digits")
    return int(micros)


def ratio_percent(part: int, whole: int) -> str:
    """part / whole as a percentage string with one decimal ("" when whole is 0)."""
    if whole == 0:
        return ""
    return str((Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.1")))
