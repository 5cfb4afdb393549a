"""Split an internal line's total cost across token types.

The ledger records one actual cost per settlement; reconciliation compares each
token type. When the internal export carries only the total, the split follows
the price table the gateway used (a Keel ``PriceTable`` document): each type's
share is tokens x price, and the parts add up to the recorded total exactly.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import yaml
from pydantic import ValidationError

from keel_pdp.policy.model import PriceSpec, PriceTableDoc, PriceTier
from keel_pdp.pricing import Price, parse_price
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import CACHE_WRITE, CACHED_INPUT, INPUT, OUTPUT, normalise_model
from keel_pdp.reconcile.money import split_exact


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One dated price of a model, with its context-length tiers (ascending)."""

    effective_from_ms: int
    price: Price
    tiers: tuple[tuple[int, Price], ...] = ()


@dataclass
class PriceBook:
    entries: dict[tuple[str, str], list[PriceEntry]] = field(default_factory=dict)

    def add(self, provider: str, model: str, entry: PriceEntry) -> None:
        found = self.entries.setdefault((provider, model), [])
        found.append(entry)
        found.sort(key=lambda e: e.effective_from_ms)

    def price_for(self, provider: str, model: str, ts_ms: int, input_tokens: int
                  ) -> Price | None:
        """The price in effect at ``ts_ms``, at the tier the request's input reached."""
        history = self.entries.get((provider, model))
        if not history:
            return None
        current = history[0]
        for entry in history:
            if entry.effective_from_ms <= ts_ms:
                current = entry
        price = current.price
        for above, tier_price in current.tiers:
            if input_tokens > above:
                price = tier_price
        return price

    def __bool__(self) -> bool:
        return bool(self.entries)


def _rates(spec: PriceSpec | PriceTier) -> Price:
    inp = parse_price(spec.input)
    return Price(
        input=inp,
        output=parse_price(spec.output),
        cached_input=parse_price(spec.cached_input) if spec.cached_input is not None else inp,
        cache_write=parse_price(spec.cache_write) if spec.cache_write is not None else inp,
    )


def _entry(spec: PriceSpec) -> PriceEntry:
    start = 0
    if spec.effective_from is not None:
        d = spec.effective_from
        start = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * 1000
    return PriceEntry(start, _rates(spec),
                      tuple((t.above_input_tokens, _rates(t)) for t in spec.tiers))


def load_prices(path: pathlib.Path) -> PriceBook:
    """Every ``PriceTable`` document in a YAML file or a policy bundle directory."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) \
        if path.is_dir() else [path]
    book = PriceBook()
    for file in files:
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(str(file), f"cannot read the price table: {exc}") from None
        if not isinstance(raw, dict) or raw.get("kind") != "PriceTable":
            continue
        try:
            doc = PriceTableDoc.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise InputError(str(file), err["msg"],
                             where=".".join(str(x) for x in err["loc"])) from None
        for provider, models in doc.providers.items():
            for model, spec in models.items():
                for one in spec if isinstance(spec, list) else [spec]:
                    book.add(provider, normalise_model(model), _entry(one))
    if not book:
        raise InputError(str(path), "no PriceTable document found")
    return book


def split_cost(total_micros: int, price: Price, tokens: dict[str, int]) -> dict[str, int]:
    """``total_micros`` across token types in proportion to tokens x price."""
    rates = {INPUT: price.input, CACHED_INPUT: price.cached_input,
             CACHE_WRITE: price.cache_write, OUTPUT: price.output}
    types = [t for t in (INPUT, CACHED_INPUT, CACHE_WRITE, OUTPUT)]
    weights = [tokens.get(t, 0) * rates[t] for t in types]
    if sum(weights) == 0:
        weights = [tokens.get(t, 0) for t in types]
    parts = split_exact(total_micros, weights)
    return {t: p for t, p in zip(types, parts, strict=True) if p or tokens.get(t, 0)}
