"""The decision's values: what a request asks, what the plan holds, what the answer is.

The per-request values (``AuthorizeInput``, ``Plan``, ``Outcome`` and their parts)
are plain slotted dataclasses that nothing changes once built: a frozen
dataclass's ``__init__`` costs about six times as much, and every Authorize builds
a dozen of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from keel_pdp.errors import InvalidRequest, RequestIdReused
from keel_pdp.policy.snapshot import CompiledBudget, ModelPrice, PolicySnapshot
from keel_pdp.pricing import Price

if TYPE_CHECKING:
    from keel_pdp.decision.shape import Shape

__all__ = ["InvalidRequest", "RequestIdReused"]

MAX_NAME_BYTES = 128
MAX_REQUEST_ID_BYTES = 128
MAX_LABELS = 32
MAX_LABEL_KEY_BYTES = 64
MAX_LABEL_VALUE_BYTES = 256



class DecisionKind(StrEnum):
    ALLOW = "ALLOW"
    CONSTRAIN = "CONSTRAIN"
    DENY = "DENY"


class Code(StrEnum):
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    UNKNOWN_MODEL_PRICE = "UNKNOWN_MODEL_PRICE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    POLICY_NOT_LOADED = "POLICY_NOT_LOADED"
    DEADLINE_TOO_SHORT = "DEADLINE_TOO_SHORT"
    OUTPUT_TOKENS_CAPPED = "OUTPUT_TOKENS_CAPPED"
    SHADOW_BUDGET_EXCEEDED = "SHADOW_BUDGET_EXCEEDED"
    FALLBACK_PRICE_USED = "FALLBACK_PRICE_USED"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    MODEL_REROUTED = "MODEL_REROUTED"
    SHADOW_MODEL_NOT_ALLOWED = "SHADOW_MODEL_NOT_ALLOWED"
    BUDGET_THRESHOLD_CROSSED = "BUDGET_THRESHOLD_CROSSED"
    EXCEPTION_GRANT_APPLIED = "EXCEPTION_GRANT_APPLIED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    USAGE_ABOVE_PERMIT = "USAGE_ABOVE_PERMIT"
    COST_ABOVE_HOLD = "COST_ABOVE_HOLD"
    SERVICE_TIER_UNPRICED = "SERVICE_TIER_UNPRICED"
    WEB_SEARCH_UNPRICED = "WEB_SEARCH_UNPRICED"


# Reasons that explain an answer without blocking it.
INFORMATIONAL = frozenset({
    Code.SHADOW_BUDGET_EXCEEDED, Code.FALLBACK_PRICE_USED, Code.SHADOW_MODEL_NOT_ALLOWED,
    Code.BUDGET_THRESHOLD_CROSSED, Code.EXCEPTION_GRANT_APPLIED, Code.SERVICE_TIER_UNPRICED,
    Code.WEB_SEARCH_UNPRICED,
})


@dataclass(slots=True)
class AuthorizeInput:
    """An Authorize request as the decision reads it (validated by ``validate``)."""

    request_id: str
    tenant: str
    workload: str
    model: str
    provider: str
    estimated_input_tokens: int
    max_output_tokens: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    # The provider's processing tier asked for (OpenAI's service_tier; "" = not set).
    service_tier: str = ""
    # The most web searches the call may make: 0 it offers no web search tool, n its
    # bound (Anthropic's max_uses, OpenAI's max_tool_calls), WEB_SEARCH_UNBOUNDED (-1)
    # a search tool without a bound (held at the bundle's web_search_hold_calls).
    max_web_search_calls: int = 0
    # The longest prompt-cache lifetime the call marks ("5m", "1h"; "" none): its
    # estimated input is held at that cache-write rate.
    cache_write_ttl: str = ""


@dataclass(slots=True)
class Reason:
    """Why an answer is what it is: a stable code, words for people, and the figures
    behind it (the budget, its window, limit, settled, held, requested, the
    exception path to ask for)."""

    code: Code
    message: str
    budget_id: str = ""
    scope: str = ""
    window_start_ms: int = 0
    window_end_ms: int = 0
    limit_micros: int = 0
    settled_micros: int = 0
    held_micros: int = 0
    requested_micros: int = 0
    rule_id: str = ""
    exception_path: str = ""
    retry_after_seconds: int = 0

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in _reason_items(self) if v not in ("", 0)}


def _reason_items(r: Reason) -> list[tuple[str, object]]:
    return [
        ("code", str(r.code)), ("message", r.message), ("budget_id", r.budget_id),
        ("scope", r.scope), ("window_start_ms", r.window_start_ms),
        ("window_end_ms", r.window_end_ms), ("limit_micros", r.limit_micros),
        ("settled_micros", r.settled_micros), ("held_micros", r.held_micros),
        ("requested_micros", r.requested_micros), ("rule_id", r.rule_id),
        ("exception_path", r.exception_path), ("retry_after_seconds", r.retry_after_seconds),
    ]


@dataclass(slots=True)
class HoldFigure:
    """One budget window as a decision saw it: limit, settled and held after it."""

    budget_id: str
    scope: str
    window: str
    window_start_ms: int
    window_end_ms: int
    limit_micros: int
    settled_micros: int
    held_micros: int
    mode: str

    @property
    def remaining_micros(self) -> int:
        return self.limit_micros - self.settled_micros - self.held_micros


@dataclass(frozen=True, slots=True)
class Target:
    """One budget window a request must be checked and held against."""

    budget: CompiledBudget
    split: tuple[str, ...]
    window_start_ms: int
    window_end_ms: int


@dataclass(slots=True)
class Candidate:
    """A model the request may be served by, with its exact cost shape."""

    provider: str
    model: str
    price: ModelPrice
    rate: Price  # the rates that apply to this request's service tier and input tokens
    output_tokens: int
    estimate_micros: int
    target_idx: tuple[int, ...]  # indexes into Plan.targets
    may_constrain: bool
    # The service tier the hold is priced at ("" when the model has none; else
    # "default", a tier of the price table, or "highest").
    tier: str = ""
    # The hold before its output: the estimated input (at the cache-write rate when
    # the request marks cache breakpoints) and the web searches held at the fee.
    fixed_pico: int = 0


@dataclass(slots=True)
class Plan:
    """What one request must check and hold: its candidates (the model asked for,
    then cheaper ones of the downgrade chain) with their exact costs, and the budget
    windows each needs. Built by ``plan``; consumed by the engine and ``conclude``."""

    permit_id: str
    request: AuthorizeInput
    snapshot: PolicySnapshot
    now_ms: int
    price: ModelPrice | None
    output_tokens: int
    estimate_micros: int
    targets: tuple[Target, ...]
    pre_reasons: tuple[Reason, ...]  # non-blocking notes (fallback price)
    denial: tuple[Reason, ...] = ()  # non-empty: deny without touching budgets
    fingerprint: str = ""
    candidates: tuple[Candidate, ...] = ()
    route_mode: str = "enforce"
    rule_id: str = ""
    shape: Shape | None = None
    # The web searches the hold covers (the request's bound, or the bundle's
    # web_search_hold_calls for a search tool without one).
    web_search_calls: int = 0

    @property
    def observe(self) -> bool:
        return self.route_mode == "observe"

    @property
    def expires_at_ms(self) -> int:
        return self.now_ms + self.snapshot.settings.hold_ttl_seconds * 1000


@dataclass(slots=True)
class Outcome:
    """The answer to one Authorize: decision, permit, constraints, reasons and the
    holds it made, as the transports return it and the metrics count it."""

    decision: DecisionKind
    permit_id: str
    policy_revision: str
    price_revision: str
    estimated_cost_micros: int
    max_output_tokens: int
    model: str
    provider: str
    reasons: tuple[Reason, ...] = ()
    holds: tuple[HoldFigure, ...] = ()
    expires_at_ms: int = 0
    replayed: bool = False
    matched_budgets: tuple[str, ...] = ()
    degraded: bool = False
    # The web searches the permit's hold covers (what a booking at the hold books).
    web_search_calls: int = 0

    @property
    def primary_code(self) -> str:
        for r in self.reasons:
            if r.code not in INFORMATIONAL:
                return str(r.code)
        return self.reasons[0].code if self.reasons else "NONE"
