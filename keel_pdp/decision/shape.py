"""Request shapes: what every request of one (tenant, workload, model, provider)
shares at a moment — routing rule, prices in effect, matching budgets and their
windows — built once per shape and window (``ShapeCache``) and reused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TypeVar, cast

from keel_pdp.decision.model import AuthorizeInput, Code, InvalidRequest, Reason, Target
from keel_pdp.events import dumps
from keel_pdp.policy.snapshot import (
    SHAPE_CACHE_SIZE,
    CompiledBudget,
    ModelPrice,
    PolicySnapshot,
    bounded_put,
)
from keel_pdp.pricing import AUTO_TIER
from keel_pdp.windows import window_bounds


def _fingerprint_head(tenant: str, workload: str, model: str, provider: str) -> str:
    return dumps([tenant, workload, model, provider])[:-1] + ","


def fingerprint(req: AuthorizeInput, head: str = "") -> str:
    """What makes two requests with one request_id the same request (a digest of
    the JSON list [tenant, workload, model, provider, input tokens, max output
    tokens, sorted labels], then, when any is set, [service tier, web search bound,
    cache-write lifetime]: what the hold is priced at, so a retry asking for another
    tier or more searches is another request, not a replay of a cheaper hold).
    ``head``: the list's first four members, as the request's shape keeps them. A
    request that sets none of the last three digests as earlier versions did (their
    idempotency records still recognise its retries)."""
    head = head or _fingerprint_head(req.tenant, req.workload, req.model, req.provider)
    labels = dumps(sorted(req.labels)) if req.labels else "[]"
    priced = ""
    # "auto" asks for no tier in particular, as naming none does: one request.
    tier = "" if req.service_tier == AUTO_TIER else req.service_tier
    if tier or req.max_web_search_calls or req.cache_write_ttl:
        priced = "," + dumps([tier, req.max_web_search_calls, req.cache_write_ttl])
    body = f"{head}{req.estimated_input_tokens},{req.max_output_tokens},{labels}{priced}]"
    return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


def _resolve_provider(snapshot: PolicySnapshot, model: str, provider: str) -> str:
    if provider:
        return provider
    providers = sorted({p for (p, m) in snapshot.prices if m == model})
    if len(providers) > 1:
        raise InvalidRequest(
            f"provider is required: model {model!r} is priced by {', '.join(providers)}")
    return providers[0] if providers else ""


_FOREVER = 1 << 62
_T = TypeVar("_T")


@dataclass(slots=True, eq=False, weakref_slot=True)
class Shape:
    """Everything in a plan that depends on the request's shape, not on the request.

    The shape is (tenant, workload, model, provider) at a moment: routing rule,
    prices in effect, matching budgets and their current windows, and the static
    members of the decision event. It holds from ``valid_from_ms`` until
    ``valid_until_ms`` (the first window end or price change), so it is built
    once per shape and window and reused by every request of that shape.
    """

    snapshot: PolicySnapshot
    tenant: str
    workload: str
    model: str
    provider: str  # as the request gave it ("" when left to the price table)
    route_mode: str
    rule_id: str
    pre_reasons: tuple[Reason, ...]
    denial: tuple[Reason, ...]
    prices: tuple[ModelPrice, ...]  # the candidates, requested (or chosen) first
    option_idx: tuple[tuple[int, ...], ...]  # per candidate: indexes into targets
    targets: tuple[Target, ...]
    # The static members of the decision event, JSON without the opening brace:
    # written by keel_pdp.events on first use (a cache slot, not decision state).
    event_tail: str = ""
    fingerprint_head: str = ""
    # prefer-cheap: one shape per allowed option; a request takes the cheapest.
    alternatives: tuple[Shape, ...] = ()
    valid_from_ms: int = 0
    valid_until_ms: int = _FOREVER


class _Interner:
    """One object for equal small values that many shapes hold (the same candidate
    prices, the same budget index lists): a request then touches memory that other
    shapes keep warm. Owned by a ``ShapeCache`` (bounded), never module state."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[object, object] = {}

    def __call__(self, value: _T) -> _T:
        found = self._values.get(value)
        return cast(_T, found if found is not None else bounded_put(
            self._values, value, value, 4096))


class _Validity:
    """The span of time in which everything a shape read stays the same."""

    __slots__ = ("hi", "lo", "now")

    def __init__(self, now_ms: int) -> None:
        self.now, self.lo, self.hi = now_ms, 0, _FOREVER

    def prices(self, history: tuple[ModelPrice, ...]) -> None:
        for mp in history:
            if mp.effective_from_ms <= self.now:
                self.lo = max(self.lo, mp.effective_from_ms)
            else:
                self.hi = min(self.hi, mp.effective_from_ms)

    def window(self, start: int, end: int) -> None:
        self.lo, self.hi = max(self.lo, start), min(self.hi, end)


def build_shape(snapshot: PolicySnapshot, tenant: str, workload: str, model: str,
                provider_given: str, now_ms: int, intern: _Interner | None = None) -> Shape:
    """The shape of requests for (tenant, workload, model, provider) at ``now_ms``."""
    shared = intern or _Interner()
    provider = _resolve_provider(snapshot, model, provider_given)
    span = _Validity(now_ms)
    routes = snapshot.match_routes(tenant, workload)
    # Only the most specific level of matching rules decides.
    level = [r for r in routes if r.scope == routes[0].scope] if routes else []
    rule = level[0] if level else None
    mode = rule.mode if rule else "enforce"
    rule_id = rule.id if rule else ""

    def allowed(p: str, m: str) -> bool:
        return not level or any(r.allows(p, m) for r in level)

    def priced(p: str, m: str) -> ModelPrice | None:
        span.prices(snapshot.prices.get((p, m), ()))
        return snapshot.price_for(p, m, now_ms)

    def make(prices: list[ModelPrice], pre: tuple[Reason, ...] = (),
             denial: tuple[Reason, ...] = ()) -> Shape:
        targets: list[Target] = []
        index: dict[tuple[str, tuple[str, ...]], int] = {}
        option_idx: list[tuple[int, ...]] = []
        for mp in prices:
            values = (tenant, workload, mp.model, mp.provider)
            idx = []
            for b in snapshot.match_budgets(*values):
                split = tuple(values[i] for i in b.per)
                key = (b.id, split)
                if key not in index:
                    start, end = _window(b, now_ms)
                    span.window(start, end)
                    index[key] = len(targets)
                    targets.append(Target(b, split, start, end))
                idx.append(index[key])
            option_idx.append(tuple(idx))
        shape = Shape(snapshot, tenant, workload, model, provider_given, mode, rule_id, pre,
                      denial, shared(tuple(prices)), shared(tuple(option_idx)),
                      tuple(targets))
        shape.fingerprint_head = _fingerprint_head(tenant, workload, model, provider_given)
        return shape

    def finish(shape: Shape) -> Shape:
        for s in (shape, *shape.alternatives):
            s.valid_from_ms, s.valid_until_ms = span.lo, span.hi
        return shape

    primary = (provider, model)
    chain = rule.chain if rule else ()
    if mode == "prefer-cheap":
        alternatives: list[Shape] = []
        for p_, m_ in [primary, *[c for c in chain if c != primary]]:
            mp = priced(p_, m_)
            if mp is not None and allowed(p_, m_):
                alternatives.append(make([mp]))
        if len(alternatives) == 1:
            return finish(alternatives[0])
        if alternatives:
            return finish(replace(alternatives[0], alternatives=tuple(alternatives)))
    pre: list[Reason] = []
    if not allowed(*primary):
        assert rule is not None
        text = (f"Routing rule {rule.id} does not allow {provider or '?'}/{model} for "
                f"workload {workload}.")
        if mode != "observe":
            return finish(make([], denial=(Reason(Code.MODEL_NOT_ALLOWED, text,
                                                  rule_id=rule.id),)))
        pre.append(Reason(Code.SHADOW_MODEL_NOT_ALLOWED, text + " (observe mode: not enforced)",
                          rule_id=rule.id))

    price = priced(*primary)
    if price is None:
        fb = snapshot.settings.fallback_price
        if fb is None:
            return finish(make([], denial=(Reason(
                Code.UNKNOWN_MODEL_PRICE,
                f"No price is known for {primary[0] or '?'}/{primary[1]} and the policy names "
                "no fallback price."),)))
        price = replace(fb, provider=primary[0], model=primary[1])
        pre.append(Reason(Code.FALLBACK_PRICE_USED,
                          f"{primary[0] or '?'}/{primary[1]} has no price; the fallback price "
                          "was used."))

    options: list[ModelPrice] = [price]
    if mode == "enforce" and primary in chain:
        for p_, m_ in chain[chain.index(primary) + 1:]:
            mp = priced(p_, m_)
            if mp is not None and allowed(p_, m_):
                options.append(mp)
    return finish(make(options, pre=tuple(pre)))


class ShapeCache:
    """The shapes built for one policy snapshot, by (tenant, workload, model,
    provider), bounded at ``SHAPE_CACHE_SIZE``. The engine owns one; a new snapshot
    starts it afresh (its shapes read the old one)."""

    def __init__(self, limit: int = SHAPE_CACHE_SIZE) -> None:
        self.limit = limit
        self.snapshot: PolicySnapshot | None = None
        self.shapes: dict[str, Shape] = {}
        self.intern = _Interner()

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int) -> Shape:
        """The cached shape of ``req`` at ``now_ms`` (built on first use or once stale)."""
        if snapshot is not self.snapshot:
            self.snapshot, self.shapes, self.intern = snapshot, {}, _Interner()
        # One string, not a tuple: a hit compares one stored object, not four (names
        # cannot contain control characters, so the separator keeps keys apart).
        key = f"{req.tenant}\x1f{req.workload}\x1f{req.model}\x1f{req.provider}"
        shape = self.shapes.get(key)
        if shape is not None and shape.valid_from_ms <= now_ms < shape.valid_until_ms:
            return shape
        shape = build_shape(snapshot, req.tenant, req.workload, req.model, req.provider,
                            now_ms, self.intern)
        bounded_put(self.shapes, key, shape, self.limit)
        return shape


def shape_for(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int,
              cache: ShapeCache | None = None) -> Shape:
    """The shape of ``req`` at ``now_ms``, from ``cache`` when given."""
    if cache is None:
        return build_shape(snapshot, req.tenant, req.workload, req.model, req.provider, now_ms)
    return cache.get(snapshot, req, now_ms)


def _window(b: CompiledBudget, now_ms: int) -> tuple[int, int]:
    return window_bounds(b.window, now_ms, b.timezone)
