"""What a request shape means to the budget store, and the permit record's metadata.

Both are Redis encodings, so they live in ``budget/``: the window and grant keys of
a shape, the authorize script's arguments every request of the shape shares
(``hold_shape``), and the permit metadata the scripts store with each hold (the
tenant, workload, model and the price in effect, so any sidecar can price its
Closeout). ``Materials`` keeps them per shape, weakly: a shape dropped from the
decision's cache takes its material with it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

from keel_pdp.budget.escrow import Parent, slice_for
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.resp import Shared
from keel_pdp.budget.store import hold_shape
from keel_pdp.decision.shape import Shape
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price


@dataclass(frozen=True, slots=True)
class Material:
    """What a shape means to one budget store, derived once per shape."""

    window_keys: tuple[str, ...]
    wexp: tuple[int, ...]  # per window: when its hash may expire (s)
    shared: Shared  # the authorize script's KEYS and ARGV common to the shape
    meta_heads: tuple[str, ...]  # per candidate: the permit metadata up to its stamp
    # per window: the shared budget it leases from (escrow), None for its own window
    parents: tuple[Parent | None, ...] = ()
    leased: bool = False  # any window is a lease (a hold may answer "lease")


def meta_head(tenant: str, workload: str, mp: ModelPrice) -> str:
    """The permit record's metadata up to its stamp: ``head + meta_stamp(...)``."""
    def row(p: Price) -> list[int]:
        return [p.input, p.cached_input, p.cache_write, p.output]

    def write_1h(p: Price) -> int:
        return p.cache_write if p.cache_write_1h is None else p.cache_write_1h

    meta: dict[str, object] = {"t": tenant, "w": workload, "m": mp.model, "p": mp.provider,
                               "price": row(mp.price)}
    if mp.tiers:
        meta["tiers"] = [[above, *row(price)] for above, price in mp.tiers]
    # One-hour cache-write rates in a member of their own ("w1h": the base's, then
    # each tier's), only where one differs from cache_write: price rows keep their
    # four members, which a sidecar of the previous version reads (rolling upgrade).
    prices = [mp.price, *(price for _, price in mp.tiers)]
    if any(write_1h(p) != p.cache_write for p in prices):
        meta["w1h"] = [write_1h(p) for p in prices]
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
    tiers = meta.get("tiers") or []
    w1h = meta.get("w1h")
    long_writes = [int(x) for x in w1h] if isinstance(w1h, list) else []

    def price(row: list[Any], i: int) -> Price:
        rates = [int(x) for x in row[:4]]
        return Price(rates[0], rates[1], rates[2], rates[3],
                     long_writes[i] if i < len(long_writes) else None)

    issued = ModelPrice("", "", price(base, 0), 0, tiers=tuple(
        (int(t[0]), price(t[1:], i + 1)) for i, t in enumerate(tiers)))
    return issued.for_input(input_tokens)


def meta_input_estimate(meta: dict[str, Any]) -> int | None:
    ein = meta.get("ein")
    return ein if isinstance(ein, int) else None


class Materials:
    """Material per shape for one key space (weakly keyed by the shape)."""

    def __init__(self, keyspace: KeySpace) -> None:
        self.keyspace = keyspace
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
        return Material(
            tuple(window_keys), wexp,
            hold_shape(
                window_keys, grant_keys, limits, enforce, wexp, thresholds,
                idempotency_ttl_s=settings.idempotency_ttl_seconds,
                permit_retention_s=settings.permit_retention_seconds,
                min_output_tokens=settings.min_output_tokens),
            tuple(meta_head(shape.tenant, shape.workload, mp) for mp in shape.prices),
            tuple(parents), any(parents))
