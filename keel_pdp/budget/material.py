"""What a request shape means to the budget store, and the permit record's metadata.

Both are Redis encodings, so they live in ``budget/``: the window and grant keys of
a shape, the authorize script's arguments every request of the shape shares
(``hold_shape``), and the permit metadata the scripts store with each hold (the
tenant, workload, model and the price in effect, so any sidecar can price its
Closeout). ``Materials`` keeps them per shape, weakly: a shape dropped from the
decision's cache takes its material with it.

Permit metadata is read by every sidecar sharing the store, of this version and
of the previous one (a rolling upgrade): members are only ever added, and a
member the previous version reads keeps its meaning. ``price`` (with ``tiers``
and ``w1h``) is the rate the permit was held at, which a sidecar that knows
nothing of service tiers books the usage at; ``st`` adds each service tier's
rates, so this version prices the usage at the tier the provider reports; ``ws``
is the model's fee per web search call (pico-USD; absent: no fee known). A sidecar
of the previous version reads neither and books no search fee (README "Server-tool
fees").
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from keel_pdp.budget.escrow import Parent, slice_for
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import hold_shape
from keel_pdp.budget.store_types import HoldShape
from keel_pdp.decision.shape import Shape
from keel_pdp.events import ShapeRef, shape_ref
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import AUTO_TIER, DEFAULT_TIER, HIGHEST_TIER, Price, highest_price


@dataclass(frozen=True, slots=True)
class Material:
    """What a shape means to one budget store, derived once per shape."""

    window_keys: tuple[str, ...]
    wexp: tuple[int, ...]  # per window: when its hash may expire (s)
    shared: HoldShape  # the authorize script's KEYS and ARGV common to the shape
    meta_heads: tuple[str, ...]  # per candidate: the permit metadata up to its stamp
    # per window: the shared budget it leases from (escrow), None for its own window
    parents: tuple[Parent | None, ...] = ()
    leased: bool = False  # any window is a lease (a hold may answer "lease")
    # per candidate: its price, and the metadata heads of the service tiers a hold
    # of it was priced at (built on first use: a few per model)
    prices: tuple[ModelPrice, ...] = ()
    tenant: str = ""
    workload: str = ""
    tier_heads: dict[tuple[int, str], str] = field(default_factory=dict)
    # The shape's decision event members stored once (None: written inline)
    ref: ShapeRef | None = None

    def hold_event(self, data: str) -> str:
        """The decision event data as the authorize script writes it: with the
        shape's members replaced by a reference to their copy (``ref``)."""
        ref = self.ref
        if ref is None or not data.endswith(ref.tail):
            return data
        return data[:len(data) - len(ref.tail)] + ref.suffix

    def meta_head_for(self, i: int, tier: str) -> str:
        """Candidate ``i``'s permit metadata for a hold priced at service tier ``tier``
        (``Candidate.tier``; "" for a model without service tiers)."""
        if not tier:
            return self.meta_heads[i]
        head = self.tier_heads.get((i, tier))
        if head is None:
            head = self.tier_heads[(i, tier)] = meta_head(
                self.tenant, self.workload, self.prices[i], tier)
        return head


def _row(p: Price) -> list[int]:
    return [p.input, p.cached_input, p.cache_write, p.output]


def _rates(mp: ModelPrice) -> dict[str, object]:
    """One price's members: ``price`` (four rates), ``tiers`` (context-length tiers,
    each its threshold then four rates) and ``w1h`` (one-hour cache-write rates: the
    base's, then each tier's), the last two only when there is something to say.
    Price rows keep their four members, which a sidecar of the previous version
    reads (rolling upgrade); the one-hour rates are a member of their own."""
    def write_1h(p: Price) -> int:
        return p.cache_write if p.cache_write_1h is None else p.cache_write_1h

    out: dict[str, object] = {"price": _row(mp.price)}
    if mp.tiers:
        out["tiers"] = [[above, *_row(price)] for above, price in mp.tiers]
    prices = [mp.price, *(price for _, price in mp.tiers)]
    if any(write_1h(p) != p.cache_write for p in prices):
        out["w1h"] = [write_1h(p) for p in prices]
    return out


def meta_head(tenant: str, workload: str, mp: ModelPrice, tier: str = "") -> str:
    """The permit record's metadata up to its stamp: ``head + meta_stamp(...)``.

    ``tier``: the service tier the hold is priced at (``ModelPrice.for_service_tier``);
    its rates are the record's ``price``. A model with service tiers also records
    every tier's rates (``st``: "default" and each tier of the price table) and the
    tier held at (``sth``)."""
    held = mp.service_tier(tier) or mp.highest
    meta: dict[str, object] = {"t": tenant, "w": workload, "m": mp.model, "p": mp.provider,
                               **_rates(held)}
    if held.price.web_search is not None:
        meta["ws"] = held.price.web_search
    if mp.service_tiers:
        meta["sth"] = tier or DEFAULT_TIER
        meta["st"] = {DEFAULT_TIER: _rates(mp),
                      **{name: _rates(sub) for name, sub in mp.service_tiers}}
    return json.dumps(meta, separators=(",", ":"))[:-1] + ',"ts":'


def meta_stamp(now_ms: int, estimated_input_tokens: int) -> str:
    """The end of a permit's metadata: when it was issued and its input estimate."""
    return f'{now_ms},"ein":{estimated_input_tokens}}}'


def load_meta(text: str | bytes) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def meta_price(meta: dict[str, Any], input_tokens: int) -> Price:
    """The rate the permit's model had when it was issued, for this input size.

    A record without a price (written by an older version for a fail-open
    settlement) prices at zero: such a permit is settled already, and the
    closeout script answers with the booked figures. Without ``w1h`` (no rate of
    its own, or a record of the previous version) one-hour cache writes are priced
    at cache_write.
    """
    base = meta.get("price")
    if not isinstance(base, list):
        return Price(0, 0, 0, 0)
    return _with_fee(meta, _price(meta, base).for_input(input_tokens))


def _with_fee(meta: dict[str, Any], price: Price) -> Price:
    """``price`` with the permit's web search fee (``ws``; none in a record of the
    previous version, or of a model without a fee)."""
    fee = meta.get("ws")
    if type(fee) is not int or fee < 0:
        return price
    return replace(price, web_search=fee)


def _price(rates: dict[str, Any], base: list[Any]) -> ModelPrice:
    """The price ``_rates`` wrote (``base``: its ``price`` member)."""
    tiers = rates.get("tiers") or []
    w1h = rates.get("w1h")
    long_writes = [int(x) for x in w1h] if isinstance(w1h, list) else []

    def price(row: list[Any], i: int) -> Price:
        r = [int(x) for x in row[:4]]
        return Price(r[0], r[1], r[2], r[3], long_writes[i] if i < len(long_writes) else None)

    return ModelPrice("", "", price(base, 0), 0, tiers=tuple(
        (int(t[0]), price(t[1:], i + 1)) for i, t in enumerate(tiers)))


@dataclass(frozen=True, slots=True)
class TierPrice:
    """The rate a Closeout prices the usage at, and why."""

    price: Price
    tier: str  # the tier whose rate it is ("highest": the highest of them; "" none named)
    unpriced: bool  # the reported tier has no rate in the permit's price (flagged)


def meta_tier_price(meta: dict[str, Any], input_tokens: int, reported: str) -> TierPrice:
    """The rate of the service tier the provider reported (``reported``; "" or "auto"
    when it did not say which: the rate the permit was held at).

    A tier the permit's price has no rate for is priced at each rate's highest
    among the tiers it knows and flagged. So is a tier other than "default" reported
    for a permit without service-tier rates (a model without them, or a record of
    the previous version): it is priced at the record's own rate, the only one known.
    """
    held = meta.get("sth")
    held_tier = held if isinstance(held, str) else ""
    if reported in ("", AUTO_TIER):  # "auto" is a request, never a tier that served one
        return TierPrice(meta_price(meta, input_tokens), held_tier, False)
    tiers = meta.get("st")
    if not isinstance(tiers, dict) or not tiers:
        return TierPrice(meta_price(meta, input_tokens), reported if reported == DEFAULT_TIER
                         else held_tier, reported != DEFAULT_TIER)
    known = {name: rates for name, rates in tiers.items()
             if isinstance(rates, dict) and isinstance(rates.get("price"), list)}
    found = known.get(reported)
    if found is not None:
        return TierPrice(_with_fee(meta, _price(found, found["price"]).for_input(input_tokens)),
                         reported, False)
    prices = [_price(r, r["price"]).for_input(input_tokens) for r in known.values()]
    if not prices:
        return TierPrice(meta_price(meta, input_tokens), held_tier, True)
    return TierPrice(_with_fee(meta, highest_price(prices)), HIGHEST_TIER, True)


def meta_input_estimate(meta: dict[str, Any]) -> int | None:
    ein = meta.get("ein")
    return ein if isinstance(ein, int) else None


class Materials:
    """Material per shape for one key space (weakly keyed by the shape). With
    ``stored_shapes`` the decision events the authorize script writes refer to a
    stored copy of their shape's members (``keel_pdp.events.shape_ref``)."""

    def __init__(self, keyspace: KeySpace, *, stored_shapes: bool = True) -> None:
        self.keyspace = keyspace
        self.stored_shapes = stored_shapes
        self._by_shape: weakref.WeakKeyDictionary[Shape, Material] = (
            weakref.WeakKeyDictionary())

    def __call__(self, shape: Shape) -> Material:
        found = self._by_shape.get(shape)
        if found is None:
            found = self._by_shape[shape] = self._build(shape)
        return found

    def _build(self, shape: Shape) -> Material:
        keyspace = self.keyspace
        targets = shape.targets
        settings = shape.snapshot.settings
        observe = shape.route_mode == "observe"
        wexp = tuple(t.window_end_ms // 1000 + settings.permit_retention_seconds
                     for t in targets)
        # Under an observe-mode routing rule nothing blocks; the script then reports
        # the budgets that would have (shadow).
        enforce = [t.budget.enforce and not observe for t in targets]
        shard = keyspace.tenant_shard(shape.tenant)
        window_keys: list[str] = []
        grant_keys: list[str] = []
        limits: list[int] = []
        thresholds: list[tuple[int, ...]] = []
        parents: list[Parent | None] = []
        for t, enf, wx in zip(targets, enforce, wexp, strict=True):
            b = t.budget
            if not keyspace.is_shared(b, t.split):
                window_keys.append(keyspace.window(b.id, t.split, t.window_start_ms, shard))
                grant_keys.append(keyspace.grants(b.id, t.split, shard))
                limits.append(b.limit_micros)
                thresholds.append(b.thresholds)
                parents.append(None)
                continue
            # A shared budget: held against this shard's lease of it (escrow). The
            # lease's limit is what was leased (-1); the parent's grants count at
            # refill only (never in the lease, even in the parent's own shard);
            # thresholds are the parent's, not a lease's.
            home = keyspace.home_shard(b, t.split)
            window_keys.append(keyspace.lease(b.id, t.split, t.window_start_ms, shard))
            grant_keys.append(keyspace.lease_grants(b.id, t.split, shard))
            limits.append(-1 if enf else b.limit_micros)
            thresholds.append(())
            parents.append(Parent(
                b.id, t.split, t.window_start_ms,
                keyspace.window(b.id, t.split, t.window_start_ms, home),
                keyspace.grants(b.id, t.split, home), home, b.limit_micros, wx,
                slice_for(b.limit_micros, keyspace.shards)))
        ref = shape_ref(shape) if self.stored_shapes else None
        return Material(
            tuple(window_keys), wexp,
            hold_shape(
                window_keys, grant_keys, limits, enforce, wexp, thresholds,
                idempotency_ttl_s=settings.idempotency_ttl_seconds,
                permit_retention_s=settings.permit_retention_seconds,
                min_output_tokens=settings.min_output_tokens,
                shape_copy=(keyspace.shape_copy(shard, ref.digest), ref.mark, ref.copy)
                if ref else None),
            tuple(meta_head(shape.tenant, shape.workload, mp) for mp in shape.prices),
            tuple(parents), any(parents), shape.prices, shape.tenant, shape.workload,
            ref=ref)
