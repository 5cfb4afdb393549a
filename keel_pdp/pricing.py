"""Usage normalisation and exact cost.

Prices are decimal strings in USD per million tokens. A USD price per million
tokens is numerically the price in micro-USD per token, so with at most six
fractional digits every price is an integer number of pico-USD per token and
every cost is an exact integer sum, rounded once (up) to micro-USD.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from keel_pdp.errors import PriceError as PriceError
from keel_pdp.money import format_usd as format_usd

PICO_PER_MICRO = 1_000_000
# Guards that keep every intermediate product below 2**53, so the Lua scripts
# (doubles only) compute the same exact integers as Python.
MAX_PRICE_PICO_PER_TOKEN = 1_000_000_000  # $1,000 per million tokens
MAX_TOKENS = 2_000_000

# Service tiers (OpenAI's ``service_tier``): one model, several processing tiers, each
# billed at its own rates. "default" is the model's own (standard) rates; "auto" lets
# the provider choose (the project's configured tier); a price table lists the others
# by name (``service_tiers``). HIGHEST_TIER is what a hold is priced at when the tier
# is not known in advance: every rate at the highest any tier of the model has.
DEFAULT_TIER = "default"
AUTO_TIER = "auto"
HIGHEST_TIER = "highest"
MAX_TIER_BYTES = 64
TIER_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# What the mesh and the client pass on when a response reports a tier they cannot
# read (not a string, too long, odd characters): a tier without a rate of its own.
UNREADABLE_TIER = "unreadable"


def tier_problem(value: object) -> str | None:
    """Why ``value`` cannot be a service tier's name (None when it can; "" is "not set")."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if value and not TIER_RE.fullmatch(value):
        if len(value) > MAX_TIER_BYTES:
            return f"is longer than {MAX_TIER_BYTES} characters"
        return "may only hold letters, digits, '_', '-' and '.'"
    return None


def parse_price(text: str) -> int:
    """USD-per-million-tokens decimal string -> integer pico-USD per token."""
    if not isinstance(text, str):
        raise PriceError("price must be a decimal string such as \"2.50\", not a number")
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise PriceError(f"price {text!r} is not a decimal number") from exc
    if not value.is_finite() or value < 0:
        raise PriceError(f"price {text!r} must be a finite, non-negative decimal")
    scaled = value * PICO_PER_MICRO
    if scaled != scaled.to_integral_value():
        raise PriceError(f"price {text!r} has more than 6 fractional digits")
    pico = int(scaled)
    if pico > MAX_PRICE_PICO_PER_TOKEN:
        raise PriceError(f"price {text!r} exceeds the supported maximum of 1000 USD per 1M tokens")
    return pico


def format_pico_price(pico: int) -> str:
    """Integer pico-USD per token -> USD per million tokens as a decimal string."""
    # Fixed-point: normalize() alone writes 20 as "2E+1".
    return format((Decimal(pico) / PICO_PER_MICRO).normalize(), "f")


def ceil_div(num: int, den: int) -> int:
    return -(-num // den)


@dataclass(frozen=True, slots=True)
class Price:
    """Integer pico-USD per token for each token type of one model."""

    input: int
    cached_input: int
    cache_write: int
    output: int
    # One-hour prompt-cache writes (Anthropic, Bedrock); None: at ``cache_write``.
    cache_write_1h: int | None = None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Provider-reported usage in Keel's convention.

    ``input_tokens`` counts every input token the provider processed, including
    cache reads and cache writes (OpenAI's ``prompt_tokens`` convention; for
    Anthropic send ``input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens``). ``cache_write_1h_tokens`` are the part of
    ``cache_write_tokens`` written with a one-hour lifetime (priced at
    ``cache_write_1h``). ``output_tokens`` includes reasoning tokens.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in (
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cache_write_1h_tokens",
        ):
            value = getattr(self, name)
            if value < 0:
                out.append(f"usage.{name} must not be negative (got {value})")
            elif value > 100 * MAX_TOKENS:
                out.append(f"usage.{name} is implausibly large (got {value})")
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            out.append(
                "usage.cached_input_tokens + usage.cache_write_tokens exceed usage.input_tokens "
                "(input_tokens must include cached and cache-write tokens)"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            out.append("usage.cache_write_1h_tokens exceed usage.cache_write_tokens "
                       "(cache_write_tokens must include the one-hour writes)")
        if self.reasoning_tokens > self.output_tokens:
            out.append("usage.reasoning_tokens exceed usage.output_tokens (output includes them)")
        return out


def reported_tier(value: object) -> str:
    """A service tier as a provider's response reports it: "" when absent (None),
    ``UNREADABLE_TIER`` when it is no tier name."""
    if value is None:
        return ""
    if not isinstance(value, str) or not value or tier_problem(value) is not None:
        return UNREADABLE_TIER
    return value


def highest_price(prices: list[Price]) -> Price:
    """Each rate at the highest any of ``prices`` has (for a hold whose tier is not
    known yet, and a usage reported at a tier without a rate of its own)."""
    def write_1h(p: Price) -> int:
        return p.cache_write if p.cache_write_1h is None else p.cache_write_1h

    first = prices[0]
    if len(prices) == 1:
        return first
    return Price(
        input=max(p.input for p in prices), cached_input=max(p.cached_input for p in prices),
        cache_write=max(p.cache_write for p in prices), output=max(p.output for p in prices),
        cache_write_1h=(None if all(p.cache_write_1h is None for p in prices)
                        else max(write_1h(p) for p in prices)))


def usage_cost_pico(price: Price, usage: TokenUsage) -> int:
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    long_writes = usage.cache_write_1h_tokens
    write_1h = price.cache_write if price.cache_write_1h is None else price.cache_write_1h
    return (
        fresh * price.input
        + usage.cached_input_tokens * price.cached_input
        + (usage.cache_write_tokens - long_writes) * price.cache_write
        + long_writes * write_1h
        + usage.output_tokens * price.output
    )


def usage_cost_micros(price: Price, usage: TokenUsage) -> int:
    return ceil_div(usage_cost_pico(price, usage), PICO_PER_MICRO)


def estimate_cost_micros(price: Price, input_tokens: int, output_tokens: int) -> int:
    return ceil_div(input_tokens * price.input + output_tokens * price.output, PICO_PER_MICRO)


def max_output_tokens_within(price: Price, input_tokens: int, headroom_micros: int) -> int:
    """Largest k with estimate_cost_micros(price, input_tokens, k) <= headroom (-1 if none).

    The Lua hold script computes the same figure; this is the reference the
    tests compare it with.
    """
    budget_pico = headroom_micros * PICO_PER_MICRO - input_tokens * price.input
    if budget_pico < 0:
        return -1
    if price.output == 0:
        return MAX_TOKENS
    return budget_pico // price.output
