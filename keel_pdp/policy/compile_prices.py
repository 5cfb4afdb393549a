"""Price tables compiled: exact prices per model, with their dated history and
context-length tiers, and the USD amounts (caps, overage limits) of a bundle.

Reconciliation prices provider exports with ``price_history`` too, so the
sidecars and finance use one reading of a price table.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

from keel_pdp.money import MAX_MICROS, parse_usd
from keel_pdp.policy.model import PriceSpec, PriceTableDoc, PriceTier
from keel_pdp.policy.problems import Problem
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price, parse_price

Prices = dict[tuple[str, str], tuple[ModelPrice, ...]]


def usd_to_micros(text: str) -> int:
    """A decimal USD amount of the bundle (a cap, an overage limit) in micro-USD;
    ValueError saying why when it is not an exact, non-negative amount."""
    return parse_usd(text, non_negative=True, max_micros=MAX_MICROS)


def price_of(spec: PriceSpec | PriceTier) -> Price:
    """The exact price of one spec or tier (cached input and cache writes default
    to the input price, one-hour cache writes to the cache-write price)."""
    inp = parse_price(spec.input)
    write = parse_price(spec.cache_write) if spec.cache_write is not None else inp
    return Price(
        input=inp,
        output=parse_price(spec.output),
        cached_input=parse_price(spec.cached_input) if spec.cached_input is not None else inp,
        cache_write=write,
        cache_write_1h=(parse_price(spec.cache_write_1h) if spec.cache_write_1h is not None
                        else write),
    )


def price_history(provider: str, model: str,
                  specs: PriceSpec | list[PriceSpec]) -> tuple[ModelPrice, ...]:
    """One model's prices, oldest first (raises ValueError on a bad history).

    Also used by reconciliation, which prices provider exports with the same
    table the sidecars used.
    """
    history = specs if isinstance(specs, list) else [specs]
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
        tiers = tuple((t.above_input_tokens, price_of(t)) for t in sp.tiers)
        compiled.append(ModelPrice(provider, model, price_of(sp), sp.max_output_tokens, eff,
                                   tiers))
    return tuple(sorted(compiled, key=lambda mp: mp.effective_from_ms))


# Providers that bill prompt-cache writes kept for one hour at a rate of their own
# (Anthropic: 2x input, against 1.25x for five minutes; Bedrock's Claude models too).
ONE_HOUR_WRITE_PROVIDERS = ("anthropic", "bedrock", "vertex")


def _one_hour_warning(name: str, where: str, provider: str, model: str,
                      specs: PriceSpec | list[PriceSpec]) -> str | None:
    history = specs if isinstance(specs, list) else [specs]
    priced: list[PriceSpec | PriceTier] = [*history, *(t for sp in history for t in sp.tiers)]
    if provider not in ONE_HOUR_WRITE_PROVIDERS or "claude" not in model.lower() or not any(
            p.cache_write is not None and p.cache_write_1h is None for p in priced):
        return None
    return (f"{name}: {where}: cache_write is set but cache_write_1h is not: one-hour "
            "prompt-cache writes will be priced at the cache_write (five-minute) rate; "
            "the provider bills them at their own rate (2x input for Claude models)")


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
                warning = _one_hour_warning(name, where, provider, model_name, specs)
                if warning is not None and warnings is not None:
                    warnings.append(warning)
    return prices, price_revisions
