"""The compiled, immutable policy snapshot that every decision reads.

Matching is a constant number of dictionary look-ups (one per combination of
exact and wildcard dimensions), so it does not slow down as the bundle grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, TypeVar

from keel_pdp.pricing import (
    AUTO_TIER,
    DEFAULT_TIER,
    HIGHEST_TIER,
    Price,
    highest_price,
)
from keel_pdp.windows import WindowKind

if TYPE_CHECKING:
    from keel_pdp.policy.callers import CallerIndex

DIMENSIONS = ("tenant", "workload", "model", "provider")
WILDCARD = "*"
# Which of (workload, model, provider) to replace by the wildcard in each of the
# 8 probes made inside a tenant's (or the wildcard tenant's) sub-index.
_MASKS3 = tuple(product((False, True), repeat=3))
MATCH_CACHE_SIZE = 65_536
SHAPE_CACHE_SIZE = 65_536
SMALL_TENANT = 12
_K = TypeVar("_K")
_V = TypeVar("_V")


def bounded_put(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> _V:
    """``cache[key] = value``, emptying the cache first when it holds ``limit``
    entries (the caches of this package keep what recurs; a full one is rebuilt
    from what comes next)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


def _scope_text(scope: tuple[str, str, str, str], per: tuple[int, ...]) -> str:
    text = " ".join(f"{d}={v}" for d, v in zip(DIMENSIONS, scope, strict=True))
    if per:
        text += " per " + ",".join(DIMENSIONS[i] for i in per)
    return text


@dataclass(frozen=True, slots=True)
class CompiledBudget:
    id: str
    scope: tuple[str, str, str, str]
    per: tuple[int, ...]  # indexes into DIMENSIONS
    window: WindowKind
    timezone: str
    limit_micros: int
    enforce: bool
    fail_open: bool
    exception_path: str
    description: str = ""
    thresholds: tuple[int, ...] = (80, 100)
    parent: str = ""
    spec_id: str = ""  # the YAML id (several windows of one spec share it)

    scope_text: str = ""  # filled in from scope and per

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope_text", _scope_text(self.scope, self.per))


@dataclass(frozen=True, slots=True)
class ModelPrice:
    provider: str
    model: str
    price: Price
    max_output_tokens: int
    effective_from_ms: int = 0
    # (above_input_tokens, price), ascending
    tiers: tuple[tuple[int, Price], ...] = ()
    # Service tiers with rates of their own (OpenAI's flex, priority, ...), by name in
    # ascending order; each is the whole price of that tier, context-length tiers
    # included (and has no service tiers itself). The model's own rates are "default".
    service_tiers: tuple[tuple[str, ModelPrice], ...] = ()
    # Every rate at the highest the model's tiers have, at every input size (this
    # price itself when it has no service tiers); derived, see ``highest``.
    _top: ModelPrice | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.service_tiers:
            object.__setattr__(self, "_top", _highest(self, [
                self, *(mp for _, mp in self.service_tiers)]))

    def for_input(self, input_tokens: int) -> Price:
        chosen = self.price
        for above, price in self.tiers:
            if input_tokens > above:
                chosen = price
        return chosen

    @property
    def highest(self) -> ModelPrice:
        """Each rate at the highest any tier of the model (the standard one included)
        has for the input size (README "Service tiers")."""
        return self._top if self._top is not None else self

    def service_tier(self, name: str) -> ModelPrice | None:
        """The price of one tier: "default" is the model's own rates; None when the
        model has no rate of its own for ``name`` (and for "highest")."""
        if name in ("", DEFAULT_TIER):
            return self
        if name == HIGHEST_TIER:
            return self.highest
        for tier, mp in self.service_tiers:
            if tier == name:
                return mp
        return None

    def for_service_tier(self, requested: str, auto: str = HIGHEST_TIER,
                         ) -> tuple[str, ModelPrice, bool]:
        """The price a call asking for ``requested`` is held at: (the tier priced,
        its price, whether ``requested`` names a tier without a rate of its own).

        "default" holds at the model's own rates and a listed tier at its rates.
        Not set and "auto" (the provider chooses) hold at ``auto``: the bundle's
        ``auto_service_tier``, the highest rate of the model by default. Any other
        tier (one the table does not price) holds at the highest rate. A model
        without service tiers holds everything at its own rates (tier "")."""
        if not self.service_tiers:
            return "", self, requested not in ("", AUTO_TIER, DEFAULT_TIER)
        # A tier the caller named and the table lacks is flagged; the bundle's
        # auto_service_tier naming a tier this model lacks is not (documented).
        target, named = (auto, False) if requested in ("", AUTO_TIER) else (requested, True)
        if target == DEFAULT_TIER:
            return DEFAULT_TIER, self, False
        for tier, mp in self.service_tiers:
            if tier == target:
                return tier, mp, False
        return HIGHEST_TIER, self.highest, named


def _highest(base: ModelPrice, prices: list[ModelPrice]) -> ModelPrice:
    """One price that is, at every input size, each rate at the highest of ``prices``:
    its context-length marks are all of theirs."""
    marks = sorted({above for mp in prices for above, _ in mp.tiers})
    return ModelPrice(
        base.provider, base.model, highest_price([mp.price for mp in prices]),
        base.max_output_tokens, base.effective_from_ms,
        tuple((m, highest_price([mp.for_input(m + 1) for mp in prices])) for m in marks))


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    id: str
    scope: tuple[str, str]  # tenant, workload
    allowed: frozenset[tuple[str, str]]  # (provider, model) with "*" model wildcard
    mode: str = "enforce"  # enforce | prefer-cheap | observe
    chain: tuple[tuple[str, str], ...] = ()  # downgrade chain, most capable first

    def allows(self, provider: str, model: str) -> bool:
        if not self.allowed:
            return True
        return (provider, model) in self.allowed or (provider, WILDCARD) in self.allowed


@dataclass(frozen=True, slots=True)
class ExceptionRule:
    name: str
    approver_role: str
    max_overage_micros: int
    max_duration_seconds: int
    description: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    hold_ttl_seconds: int
    min_output_tokens: int
    allow_constrain: bool
    fallback_price: ModelPrice | None
    permit_retention_seconds: int
    idempotency_ttl_seconds: int
    # The tier a call that names none (or "auto") is held at ("highest": the highest
    # rate of the model's tiers).
    auto_service_tier: str = HIGHEST_TIER
    # Searches held for a call that offers web search without a bound.
    web_search_hold_calls: int = 10


@dataclass(frozen=True)
class PolicySnapshot:
    revision: str
    content_hash: str
    price_revision: str
    settings: Settings
    # (provider, model) -> prices ordered by effective_from_ms
    prices: dict[tuple[str, str], tuple[ModelPrice, ...]]
    budgets: tuple[CompiledBudget, ...]
    routes: tuple[CompiledRoute, ...]
    exception_paths: dict[str, ExceptionRule]
    files: tuple[str, ...] = ()
    # kind: Callers bindings; None when the bundle has no Callers document.
    callers: CallerIndex | None = None
    # Not errors, but worth a look (a binding naming a tenant no budget knows).
    warnings: tuple[str, ...] = ()
    # kind: Deployments: (provider, deployment name) -> the priced model it serves.
    deployments: dict[tuple[str, str], str] = field(default_factory=dict)
    _budget_index: dict[tuple[str, str, str, str], tuple[CompiledBudget, ...]] = field(
        default_factory=dict, repr=False
    )
    _route_index: dict[tuple[str, str], tuple[CompiledRoute, ...]] = field(
        default_factory=dict, repr=False
    )
    # tenant (or "*") -> (workload, model, provider) -> budgets: the one large
    # dictionary is probed twice per request, the small ones eight times each.
    _by_tenant: dict[str, dict[tuple[str, str, str], tuple[CompiledBudget, ...]]] = field(
        default_factory=dict, repr=False
    )
    _match_cache: dict[tuple[str, str, str, str], tuple[CompiledBudget, ...]] = field(
        default_factory=dict, repr=False
    )
    # Tenants with few budgets are matched by a short scan instead of 8 probes.
    _tenant_lists: dict[str, tuple[CompiledBudget, ...]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        bidx: dict[tuple[str, str, str, str], list[CompiledBudget]] = {}
        for b in self.budgets:
            bidx.setdefault(b.scope, []).append(b)
        self._budget_index.update({k: tuple(v) for k, v in bidx.items()})
        for (t, w, m, p), found in self._budget_index.items():
            self._by_tenant.setdefault(t, {})[(w, m, p)] = found
        for t, sub in self._by_tenant.items():
            flat = [b for budgets in sub.values() for b in budgets]
            if len(flat) <= SMALL_TENANT:
                self._tenant_lists[t] = tuple(flat)
        ridx: dict[tuple[str, str], list[CompiledRoute]] = {}
        for r in self.routes:
            ridx.setdefault(r.scope, []).append(r)
        self._route_index.update({k: tuple(v) for k, v in ridx.items()})

    @property
    def policy_revision(self) -> str:
        return f"{self.revision}@{self.content_hash[:12]}"

    def match_budgets(
        self, tenant: str, workload: str, model: str, provider: str
    ) -> tuple[CompiledBudget, ...]:
        """Every budget whose scope matches, ordered by id (cached per request shape)."""
        key = (tenant, workload, model, provider)
        hit = self._match_cache.get(key)
        if hit is not None:
            return hit
        rest = (workload, model, provider)
        found: list[CompiledBudget] = []
        for t in ((tenant, WILDCARD) if tenant != WILDCARD else (WILDCARD,)):
            short = self._tenant_lists.get(t)
            if short is not None:
                for b in short:
                    _, bw, bm, bp = b.scope
                    if (bw in (WILDCARD, workload) and bm in (WILDCARD, model)
                            and bp in (WILDCARD, provider)):
                        found.append(b)
                continue
            sub = self._by_tenant.get(t)
            if not sub:
                continue
            seen: set[tuple[str, str, str]] = set()
            for mask in _MASKS3:
                probe = (WILDCARD if mask[0] else rest[0], WILDCARD if mask[1] else rest[1],
                         WILDCARD if mask[2] else rest[2])
                if probe in seen:
                    continue
                seen.add(probe)
                budgets = sub.get(probe)
                if budgets:
                    found.extend(budgets)
        found.sort(key=lambda b: b.id)
        return bounded_put(self._match_cache, key, tuple(found), MATCH_CACHE_SIZE)

    def match_routes(self, tenant: str, workload: str) -> tuple[CompiledRoute, ...]:
        """Most specific first: (tenant, workload), (tenant, *), (*, workload), (*, *)."""
        out: list[CompiledRoute] = []
        for key in ((tenant, workload), (tenant, WILDCARD), (WILDCARD, workload),
                    (WILDCARD, WILDCARD)):
            out.extend(self._route_index.get(key, ()))
        return tuple(out)

    def price_for(self, provider: str, model: str, at_ms: int | None = None) -> ModelPrice | None:
        """The price in effect at ``at_ms`` (the latest one when not given)."""
        history = self.prices.get((provider, model))
        if not history:
            return None
        if at_ms is None:
            return history[-1]
        chosen = None
        for mp in history:
            if mp.effective_from_ms <= at_ms:
                chosen = mp
        return chosen

    def deployment_model(self, provider: str, deployment: str) -> str | None:
        """The model a provider's deployment serves, when the bundle maps it."""
        return self.deployments.get((provider, deployment))

    def budget(self, budget_id: str) -> CompiledBudget | None:
        for b in self.budgets:
            if b.id == budget_id:
                return b
        return None
