"""Usage normalisation and exact cost.

Prices are decimal strings in USD per million tokens. A USD price per million
tokens is numerically the price in micro-USD per token, so with at most six
fractional digits every price is an integer number of pico-USD per token and
every cost is an exact integer sum, rounded once (up) to micro-USD. Server-tool
fees (web search) are decimal strings in USD per 1,000 calls: with at most six
fractional digits, an integer number of pico-USD per call, added to the same sum.
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
# Web search, billed per call (Anthropic's web search tool, OpenAI's web_search tool
# and search models). A fee is at most $100 per 1,000 calls ($0.10 a call) and a hold
# covers at most MAX_WEB_SEARCH_CALLS searches, so a hold's fixed part stays below
# 2**53 pico-USD with the input's (README "Server-tool fees").
PICO_PER_USD_PER_1K_CALLS = 1_000_000_000  # $1 per 1,000 calls = 10^9 pico-USD a call
MAX_CALL_FEE_PICO = 100 * PICO_PER_USD_PER_1K_CALLS
MAX_WEB_SEARCH_CALLS = 10_000
# AuthorizeRequest.max_web_search_calls: the call offers a web search tool with no
# bound on its searches (held at the bundle's web_search_hold_calls).
WEB_SEARCH_UNBOUNDED = -1
# Prompt-cache write lifetimes a request may mark (Anthropic's cache_control ttl).
CACHE_TTLS = ("5m", "1h")

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


def _usd(text: str, lead: str, word: str) -> Decimal:
    """``text`` as a finite, non-negative decimal; ``lead`` starts the error for a
    value that is no string, ``word`` names the value in the others."""
    if not isinstance(text, str):
        raise PriceError(f"{lead} must be a decimal string such as "
                         f"\"{'2.50' if word == 'price' else '10.00'}\", not a number")
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise PriceError(f"{word} {text!r} is not a decimal number") from exc
    if not value.is_finite() or value < 0:
        raise PriceError(f"{word} {text!r} must be a finite, non-negative decimal")
    return value


def parse_price(text: str) -> int:
    """USD-per-million-tokens decimal string -> integer pico-USD per token."""
    value = _usd(text, "price", "price")
    scaled = value * PICO_PER_MICRO
    if scaled != scaled.to_integral_value():
        raise PriceError(f"price {text!r} has more than 6 fractional digits")
    pico = int(scaled)
    if pico > MAX_PRICE_PICO_PER_TOKEN:
        raise PriceError(f"price {text!r} exceeds the supported maximum of 1000 USD per 1M tokens")
    return pico


def parse_call_fee(text: str) -> int:
    """USD-per-1,000-calls decimal string -> integer pico-USD per call."""
    value = _usd(text, "a fee", "fee")
    if value * PICO_PER_USD_PER_1K_CALLS > MAX_CALL_FEE_PICO:
        raise PriceError(f"fee {text!r} exceeds the supported maximum of 100 USD per 1,000 "
                         "calls")
    scaled = value * 1_000_000
    if scaled != scaled.to_integral_value():
        raise PriceError(f"fee {text!r} has more than 6 fractional digits")
    return int(value * PICO_PER_USD_PER_1K_CALLS)


def format_call_fee(pico: int) -> str:
    """Integer pico-USD per call -> USD per 1,000 calls as a decimal string."""
    return format((Decimal(pico) / PICO_PER_USD_PER_1K_CALLS).normalize(), "f")


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
    # Pico-USD per web search call (the model's ``web_search_per_1k``); None: the
    # price table names no fee (searches are booked at nothing and flagged).
    web_search: int | None = None

    @property
    def write_1h(self) -> int:
        """The one-hour cache-write rate (``cache_write`` when it has none of its own)."""
        return self.cache_write if self.cache_write_1h is None else self.cache_write_1h


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Provider-reported usage in Keel's convention.

    ``input_tokens`` counts every input token the provider processed, including
    cache reads and cache writes (OpenAI's ``prompt_tokens`` convention; for
    Anthropic send ``input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens``). ``cache_write_1h_tokens`` are the part of
    ``cache_write_tokens`` written with a one-hour lifetime (priced at
    ``cache_write_1h``). ``output_tokens`` includes reasoning tokens.
    ``web_search_calls`` are the server-side web searches the provider billed for
    the call (Anthropic's ``server_tool_use.web_search_requests``, OpenAI's
    ``web_search_call`` output items), priced per call at the model's fee.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_search_calls: int = 0

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
        if self.web_search_calls < 0:
            out.append(f"usage.web_search_calls must not be negative (got "
                       f"{self.web_search_calls})")
        elif self.web_search_calls > MAX_WEB_SEARCH_CALLS:
            out.append(f"usage.web_search_calls is implausibly large (got "
                       f"{self.web_search_calls}; at most {MAX_WEB_SEARCH_CALLS})")
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
    first = prices[0]
    if len(prices) == 1:
        return first
    fees = [p.web_search for p in prices if p.web_search is not None]
    return Price(
        input=max(p.input for p in prices), cached_input=max(p.cached_input for p in prices),
        cache_write=max(p.cache_write for p in prices), output=max(p.output for p in prices),
        cache_write_1h=(None if all(p.cache_write_1h is None for p in prices)
                        else max(p.write_1h for p in prices)),
        web_search=max(fees) if fees else None)


def usage_cost_pico(price: Price, usage: TokenUsage) -> int:
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    long_writes = usage.cache_write_1h_tokens
    return (
        fresh * price.input
        + usage.cached_input_tokens * price.cached_input
        + (usage.cache_write_tokens - long_writes) * price.cache_write
        + long_writes * price.write_1h
        + usage.output_tokens * price.output
        + usage.web_search_calls * (price.web_search or 0)
    )


def search_fee_unpriced(price: Price, usage: TokenUsage) -> bool:
    """The usage reports web searches the price has no fee for (booked at nothing)."""
    return usage.web_search_calls > 0 and price.web_search is None


def hold_input_rate(price: Price, cache_write_ttl: str = "") -> int:
    """The rate a hold prices its estimated input at: the input rate, or, for a
    request that marks prompt-cache breakpoints (``cache_write_ttl`` "5m" or "1h"),
    the cache-write rate of that lifetime when it is higher. The whole estimate is
    held at it (README "Cost arithmetic"): the closeout books the real split."""
    if cache_write_ttl == "1h":
        return max(price.input, price.write_1h)
    if cache_write_ttl == "5m":
        return max(price.input, price.cache_write)
    return price.input


def rates_ratio(reported: Price, held: Price) -> int:
    """How many times ``held``'s rates ``reported``'s are, at most, rounded up (1 when
    none is dearer; 4 for a rate where ``held`` has none): what a Closeout's overrun
    ceiling allows for when the provider reports a dearer service tier than the hold's."""
    ratio = 1
    for got, had in ((reported.input, held.input), (reported.output, held.output),
                     (reported.cached_input, held.cached_input)):
        if got > had:
            ratio = max(ratio, ceil_div(got, had) if had > 0 else 4)
    return ratio


def hold_fixed_pico(price: Price, input_tokens: int, cache_write_ttl: str = "",
                    web_searches: int = 0) -> int:
    """What a hold costs before its output: the estimated input (at
    ``hold_input_rate``) and the web searches it covers at the model's fee."""
    return (input_tokens * hold_input_rate(price, cache_write_ttl)
            + web_searches * (price.web_search or 0))


def usage_cost_micros(price: Price, usage: TokenUsage) -> int:
    return ceil_div(usage_cost_pico(price, usage), PICO_PER_MICRO)


def estimate_cost_micros(price: Price, input_tokens: int, output_tokens: int) -> int:
    return ceil_div(input_tokens * price.input + output_tokens * price.output, PICO_PER_MICRO)


def max_output_tokens_within(price: Price, input_tokens: int, headroom_micros: int, *,
                             fixed_pico: int | None = None) -> int:
    """Largest k with estimate_cost_micros(price, input_tokens, k) <= headroom (-1 if none).

    ``fixed_pico``: the hold's part before its output when it is not the input at
    the input rate (``hold_fixed_pico``: cache writes, web searches). The Lua hold
    script computes the same figure; this is the reference the tests compare it with.
    """
    fixed = input_tokens * price.input if fixed_pico is None else fixed_pico
    budget_pico = headroom_micros * PICO_PER_MICRO - fixed
    if budget_pico < 0:
        return -1
    if price.output == 0:
        return MAX_TOKENS
    return budget_pico // price.output
