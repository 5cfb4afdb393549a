"""Split an internal line's total cost across token types.

The ledger records one actual cost per settlement; reconciliation compares each
token type. When the internal export carries only the total, the split follows
the price table the gateway used (a Keel ``PriceTable`` document): each type's
share is tokens x price, and the parts add up to the recorded total exactly.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import yaml
from pydantic import ValidationError

from keel_pdp.policy.loader import price_history
from keel_pdp.policy.model import PriceTableDoc
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    STANDARD_TIER,
    normalise_model,
)
from keel_pdp.reconcile.money import split_exact


@dataclass
class PriceBook:
    """Dated prices with context tiers, compiled by the policy loader's own code."""

    entries: dict[tuple[str, str], list[ModelPrice]] = field(default_factory=dict)

    def add(self, provider: str, model: str, entry: ModelPrice) -> None:
        found = self.entries.setdefault((provider, model), [])
        found.append(entry)
        found.sort(key=lambda e: e.effective_from_ms)

    def price_for(self, provider: str, model: str, ts_ms: int, input_tokens: int,
                  service_tier: str = "") -> Price | None:
        """The price in effect at ``ts_ms``, at the context tier the request's input
        reached, of its service tier (the table's ``service_tiers``). The standard
        tier, an unknown one and one the table does not price take the model's own
        rates: the split needs only their proportions, which a provider's tiers
        usually scale alike (batch and flex at half of each rate, priority at about
        twice)."""
        history = self.entries.get((provider, model))
        if not history:
            return None
        current = history[0]
        for entry in history:
            if entry.effective_from_ms <= ts_ms:
                current = entry
        if service_tier not in ("", STANDARD_TIER):
            current = current.service_tier(service_tier) or current
        return current.for_input(input_tokens)

    def __bool__(self) -> bool:
        return bool(self.entries)


@dataclass
class PriceCards:
    """The gateway's price cards: one default and one per provider account
    (project / workspace) that was priced differently."""

    default: PriceBook | None = None
    by_account: dict[str, PriceBook] = field(default_factory=dict)

    def book(self, account: str) -> PriceBook | None:
        return self.by_account.get(account, self.default)


def load_cards(specs: list[str]) -> PriceCards | None:
    """``--prices FILE|DIR`` (the default card) and ``--prices ACCOUNT=FILE|DIR``."""
    cards = PriceCards()
    for spec in specs:
        account, sep, rest = spec.partition("=")
        if sep and account and not pathlib.Path(spec).exists():
            if account in cards.by_account:
                raise InputError("--prices", f"account {account!r} is given two price cards")
            cards.by_account[account] = load_prices(pathlib.Path(rest))
        else:
            if cards.default is not None:
                raise InputError("--prices", "two default price cards; name the account of "
                                 "the others as ACCOUNT=FILE")
            cards.default = load_prices(pathlib.Path(spec))
    return cards if (cards.default or cards.by_account) else None


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
                try:
                    history = price_history(provider, model, spec)
                except ValueError as exc:
                    raise InputError(str(file), str(exc),
                                     where=f"providers.{provider}.{model}") from None
                for one in history:
                    book.add(provider, normalise_model(model), one)
    if not book:
        raise InputError(str(path), "no PriceTable document found")
    return book


def split_cost(total_micros: int, price: Price, tokens: dict[str, int]) -> dict[str, int]:
    """``total_micros`` across token types in proportion to tokens x price.

    The price table has one cache-write rate: 1-hour writes are priced with it and
    take their share of the cache-write part by token count."""
    rates = {INPUT: price.input, CACHED_INPUT: price.cached_input,
             CACHE_WRITE: price.cache_write, OUTPUT: price.output}
    types = [INPUT, CACHED_INPUT, CACHE_WRITE, OUTPUT]
    five, hour = tokens.get(CACHE_WRITE, 0), tokens.get(CACHE_WRITE_1H, 0)
    merged = {**tokens, CACHE_WRITE: five + hour}
    weights = [merged.get(t, 0) * rates[t] for t in types]
    if sum(weights) == 0:
        weights = [merged.get(t, 0) for t in types]
    parts = split_exact(total_micros, weights)
    out = {t: p for t, p in zip(types, parts, strict=True) if p or merged.get(t, 0)}
    if hour:
        out[CACHE_WRITE], out[CACHE_WRITE_1H] = split_exact(out.pop(CACHE_WRITE, 0),
                                                            [five, hour])
    return out
