"""Price tables compiled: exact prices per model, with their dated history,
context-length tiers and service tiers, and the USD amounts (caps, overage
limits) of a bundle.

Reconciliation prices provider exports with ``price_history`` too, so the
sidecars and finance use one reading of a price table.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel

from keel_pdp.money import MAX_MICROS, parse_usd
from keel_pdp.policy.model import PriceSpec, PriceTableDoc, PriceTier, ServiceTierPrice
from keel_pdp.policy.problems import Problem
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price, parse_call_fee, parse_price

Prices = dict[tuple[str, str], tuple[ModelPrice, ...]]


def usd_to_micros(text: str) -> int:
    """A decimal USD amount of the bundle (a cap, an overage limit) in micro-USD;
    ValueError saying why when it is not an exact, non-negative amount."""
    return parse_usd(text, non_negative=True, max_micros=MAX_MICROS)


def price_of(spec: PriceSpec | PriceTier | ServiceTierPrice,
             web_search: int | None = None) -> Price:
    """The exact price of one spec or tier (cached input and cache writes default
    to the input price, one-hour cache writes to the cache-write price).
    ``web_search``: the model's fee per search call, which its context-length and
    service tiers share (a PriceSpec's own ``web_search_per_1k`` when not given)."""
    inp = parse_price(spec.input)
    write = parse_price(spec.cache_write) if spec.cache_write is not None else inp
    if web_search is None and isinstance(spec, PriceSpec) and spec.web_search_per_1k:
        web_search = parse_call_fee(spec.web_search_per_1k)
    return Price(
        input=inp,
        output=parse_price(spec.output),
        cached_input=parse_price(spec.cached_input) if spec.cached_input is not None else inp,
        cache_write=write,
        cache_write_1h=(parse_price(spec.cache_write_1h) if spec.cache_write_1h is not None
                        else write),
        web_search=web_search,
    )


def price_history(provider: str, model: str,
                  specs: PriceSpec | list[PriceSpec]) -> tuple[ModelPrice, ...]:
    """One model's prices, oldest first (raises ValueError on a bad history).

    Also used by reconciliation, which prices provider exports with the same
    table the sidecars used.
    """
    history = specs if isinstance(specs, list) else [specs]
    if not history:
        raise ValueError("the price history is an empty list: give the model's price, or a "
                         "list of dated prices")
    dates = [sp.effective_from for sp in history]
    known = [dt for dt in dates if dt is not None]
    if None in dates[1:] or known != sorted(set(known)):
        raise ValueError("a price history needs effective_from on every entry after the "
                         "first, in strictly ascending order")
    compiled = []
    for sp in history:
        eff = 0
        if sp.effective_from is not None:
            d = sp.effective_from
            eff = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)
        compiled.append(model_price(provider, model, sp, eff))
    return tuple(sorted(compiled, key=lambda mp: mp.effective_from_ms))


def model_price(provider: str, model: str, spec: PriceSpec, effective_from_ms: int = 0,
                ) -> ModelPrice:
    """One compiled price: the spec's own rates with its context-length tiers, and
    each service tier's (by name, in order). The model's web search fee applies to
    all of them."""
    base = price_of(spec)
    fee = base.web_search

    def tiers(t: list[PriceTier]) -> tuple[tuple[int, Price], ...]:
        return tuple((x.above_input_tokens, price_of(x, fee)) for x in t)

    return ModelPrice(
        provider, model, base, spec.max_output_tokens, effective_from_ms,
        tiers(spec.tiers),
        tuple((name, ModelPrice(provider, model, price_of(st, fee), spec.max_output_tokens,
                                effective_from_ms, tiers(st.tiers)))
              for name, st in sorted(spec.service_tiers.items())))


# Providers that bill prompt-cache writes kept for one hour at a rate of their own
# (Anthropic: 2x input, against 1.25x for five minutes; Bedrock's Claude models too).
ONE_HOUR_WRITE_PROVIDERS = ("anthropic", "bedrock", "vertex")


def _one_hour_warning(name: str, where: str, provider: str, model: str,
                      specs: PriceSpec | list[PriceSpec]) -> str | None:
    history = specs if isinstance(specs, list) else [specs]
    priced: list[PriceSpec | PriceTier | ServiceTierPrice] = [
        *history, *(t for sp in history for t in sp.tiers),
        *(st for sp in history for st in sp.service_tiers.values()),
        *(t for sp in history for st in sp.service_tiers.values() for t in st.tiers)]
    if provider not in ONE_HOUR_WRITE_PROVIDERS or "claude" not in model.lower() or not any(
            p.cache_write is not None and p.cache_write_1h is None for p in priced):
        return None
    return (f"{name}: {where}: cache_write is set but cache_write_1h is not: one-hour "
            "prompt-cache writes will be priced at the cache_write (five-minute) rate; "
            "the provider bills them at their own rate (2x input for Claude models)")


# Providers whose requests may name a service tier billed at its own rates
# (OpenAI's service_tier: flex at about half the standard rate, priority at about
# twice it; Azure OpenAI's priority processing).
SERVICE_TIER_PROVIDERS = ("openai", "azure")


def _service_tier_warning(name: str, where: str, provider: str,
                          specs: PriceSpec | list[PriceSpec]) -> str | None:
    """A model that lists service tiers but not priority: a priority call is then
    priced at the highest rate the table has for the model, below what the provider
    bills (a missing flex rate books flex calls high, which the flag shows and the
    budgets survive; a missing priority rate books them low)."""
    history = specs if isinstance(specs, list) else [specs]
    latest = history[-1]
    if provider not in SERVICE_TIER_PROVIDERS or not latest.service_tiers \
            or "priority" in latest.service_tiers:
        return None
    return (f"{name}: {where}: service_tiers has no rate for priority: a priority call "
            "is priced at the highest rate the table has for the model, below what the "
            "provider bills, and flagged SERVICE_TIER_UNPRICED; list the priority rate if "
            "the model offers the tier")


# Models whose calls may use a web search billed per call: Anthropic's Claude models
# (the web search tool), OpenAI's models that take the web_search tool in the
# Responses API, and its search models in Chat Completions. Audio, realtime, image,
# speech and embedding models do not search.
_SEARCHING_OPENAI = re.compile(r"^(gpt-4o|gpt-4\.1|gpt-5|o3|o4)|search")
_NOT_SEARCHING = re.compile(r"audio|realtime|transcribe|tts|image|embedding|moderation")


def can_search(provider: str, model: str) -> bool:
    """Whether ``provider``/``model`` is a model whose calls may make web searches the
    provider bills per call (``policy check`` warns when it has no fee)."""
    name = model.lower()
    if _NOT_SEARCHING.search(name):
        return False
    if provider == "anthropic":
        return "claude" in name
    if provider == "openai":
        return _SEARCHING_OPENAI.search(name) is not None
    return False


def _web_search_warning(name: str, where: str, provider: str, model: str,
                        specs: PriceSpec | list[PriceSpec]) -> str | None:
    """A model that can search but has no fee: its searches are booked at nothing
    (flagged WEB_SEARCH_UNPRICED) until the monthly reconciliation."""
    latest = specs[-1] if isinstance(specs, list) else specs
    if latest.web_search_per_1k is not None or not can_search(provider, model):
        return None
    return (f"{name}: {where}: web_search_per_1k is not set: this model's calls may use "
            "web search, which the provider bills per call; such searches are booked at "
            "nothing (flagged WEB_SEARCH_UNPRICED) until the monthly reconciliation; set "
            "the fee (USD per 1,000 calls), \"0\" if the workload never searches")


def compile_prices(docs: list[tuple[str, BaseModel]], problems: list[Problem],
                   warnings: list[str] | None = None) -> tuple[Prices, list[str]]:
    """Every PriceTable's models (a model priced twice is a problem), and the
    tables' revisions; ``warnings`` gets what is served but likely wrong."""
    prices: Prices = {}
    price_revisions: list[str] = []
    for name, doc in docs:
        if not isinstance(doc, PriceTableDoc):
            continue
        price_revisions.append(doc.revision)
        for provider, models in doc.providers.items():
            for model_name, specs in models.items():
                key = (provider, model_name)
                where = f"providers.{provider}.{model_name}"
                if key in prices:
                    problems.append(Problem(name, where, "price defined twice"))
                    continue
                try:
                    prices[key] = price_history(provider, model_name, specs)
                except ValueError as exc:
                    problems.append(Problem(name, where, str(exc)))
                    continue
                for warning in (_one_hour_warning(name, where, provider, model_name, specs),
                                _service_tier_warning(name, where, provider, specs),
                                _web_search_warning(name, where, provider, model_name,
                                                    specs)):
                    if warning is not None and warnings is not None:
                        warnings.append(warning)
    return prices, price_revisions
