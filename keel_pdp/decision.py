"""The decision itself: pure functions over a policy snapshot. No I/O, no gRPC.

``plan`` turns a validated request into what the budget store must check and
hold; ``conclude`` turns the store's answer into the caller's decision;
``without_store`` applies each budget's fail mode when the store is unreachable.

The per-request values (``AuthorizeInput``, ``Plan``, ``Outcome`` and their
parts) are plain slotted dataclasses that nothing changes once built: a frozen
dataclass's ``__init__`` costs about six times as much, and every Authorize
builds a dozen of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar, cast

from keel_pdp.budget.replies import HoldReply
from keel_pdp.caller import CALLER
from keel_pdp.policy.snapshot import (
    SHAPE_CACHE_SIZE,
    CompiledBudget,
    ModelPrice,
    PolicySnapshot,
    bounded_put,
)
from keel_pdp.pricing import MAX_TOKENS, PICO_PER_MICRO, Price, ceil_div, format_usd
from keel_pdp.windows import window_bounds

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


# Reasons that explain an answer without blocking it.
INFORMATIONAL = frozenset({
    Code.SHADOW_BUDGET_EXCEEDED, Code.FALLBACK_PRICE_USED, Code.SHADOW_MODEL_NOT_ALLOWED,
    Code.BUDGET_THRESHOLD_CROSSED, Code.EXCEPTION_GRANT_APPLIED,
})


class InvalidRequest(ValueError):
    """A request field is invalid; the message names the field."""


@dataclass(slots=True)
class AuthorizeInput:
    request_id: str
    tenant: str
    workload: str
    model: str
    provider: str
    estimated_input_tokens: int
    max_output_tokens: int = 0
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Reason:
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
    rate: Price  # the tier that applies to this request's input tokens
    output_tokens: int
    estimate_micros: int
    target_idx: tuple[int, ...]  # indexes into Plan.targets
    may_constrain: bool


@dataclass(slots=True)
class Plan:
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

    @property
    def observe(self) -> bool:
        return self.route_mode == "observe"

    @property
    def expires_at_ms(self) -> int:
        return self.now_ms + self.snapshot.settings.hold_ttl_seconds * 1000


@dataclass(slots=True)
class Outcome:
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

    @property
    def primary_code(self) -> str:
        for r in self.reasons:
            if r.code not in INFORMATIONAL:
                return str(r.code)
        return self.reasons[0].code if self.reasons else "NONE"


class _RandomHex:
    """64-bit random values as hex, from os.urandom read 4 KiB at a time (one
    system call per 512 permits instead of one per permit)."""

    def __init__(self) -> None:
        self._buf, self._pos = b"", 0

    def next(self) -> str:
        pos = self._pos
        if pos + 8 > len(self._buf):
            self._buf, pos = os.urandom(4096), 0
        self._pos = pos + 8
        return self._buf[pos:pos + 8].hex()


_random_hex = _RandomHex()
if hasattr(os, "register_at_fork"):  # a forked worker must not reuse its parent's bytes
    os.register_at_fork(after_in_child=lambda: setattr(_random_hex, "_buf", b""))


_PLAIN_NIBBLE = "0123456701234567"
_DEGRADED_NIBBLE = "89abcdef89abcdef"


def new_permit_id(now_ms: int | None = None) -> str:
    """``pmt_`` + 12 hex digits of issue time (ms) + 16 random hex digits. The top bit
    of the random part is clear: it is set only on degraded permits (see below)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rnd = _random_hex.next()
    return f"pmt_{ms:012x}{_PLAIN_NIBBLE[int(rnd[0], 16)]}{rnd[1:]}"


def degraded_permit_id(permit_id: str) -> str:
    """The id of a permit issued by fail mode instead of ``permit_id`` (whose hold
    script may still run): the same id with the random part's top bit set, so any
    sidecar can tell that such a permit exists before its record reaches the store."""
    return f"{permit_id[:16]}{_DEGRADED_NIBBLE[int(permit_id[16], 16)]}{permit_id[17:]}"


def is_degraded_permit_id(permit_id: str) -> bool:
    return len(permit_id) > 16 and permit_id[16] in "89abcdef"


def permit_issued_ms(permit_id: str) -> int:
    return int(permit_id[4:16], 16)


DIMENSION_NAMES = ("tenant", "workload", "model", "provider")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _utf8_len(value: str) -> int:
    # At most 4 bytes a character: short strings need no encoding to be checked.
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def check_name(field_name: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidRequest(f"{field_name} is required")
        return
    if value == "*":
        raise InvalidRequest(f"{field_name} must not be '*' (the policy wildcard)")
    if len(value) * 4 > MAX_NAME_BYTES and _utf8_len(value) > MAX_NAME_BYTES:
        raise InvalidRequest(f"{field_name} is longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(value):
        raise InvalidRequest(f"{field_name} contains control characters")


def validate(req: AuthorizeInput) -> None:
    if not req.request_id:
        raise InvalidRequest("request_id is required (the caller's idempotency key)")
    if _utf8_len(req.request_id) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    check_name("tenant", req.tenant)
    check_name("workload", req.workload)
    check_name("model", req.model)
    check_name("provider", req.provider, required=False)
    for name, value in (("estimated_input_tokens", req.estimated_input_tokens),
                        ("max_output_tokens", req.max_output_tokens)):
        if value < 0:
            raise InvalidRequest(f"{name} must not be negative (got {value})")
        if value > MAX_TOKENS:
            raise InvalidRequest(f"{name} exceeds the maximum of {MAX_TOKENS} (got {value})")
    if len(req.labels) > MAX_LABELS:
        raise InvalidRequest(f"labels has {len(req.labels)} entries; at most {MAX_LABELS}")
    for key, text in req.labels:
        if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_LABEL_KEY_BYTES:
            raise InvalidRequest(f"labels key {key[:40]!r} must be 1..{MAX_LABEL_KEY_BYTES} bytes")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_LABEL_VALUE_BYTES:
            raise InvalidRequest(
                f"labels[{key[:40]!r}] is longer than {MAX_LABEL_VALUE_BYTES} bytes")


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


# Text that JSON writes as it is: no quote, backslash, control or non-ASCII character.
_PLAIN = re.compile(r"[A-Za-z0-9 _.:/@+=,;!#$%&'()*?^`{|}~\[\]<>-]*")
_LABELS: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}


def _labels_json(labels: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(sorted pairs as a JSON list, a JSON object) for a request's labels; callers
    send the same few label sets over and over, so both are kept (bounded)."""
    found = _LABELS.get(labels)
    if found is None:
        found = bounded_put(_LABELS, labels, (_dumps(sorted(labels)), _dumps(dict(labels))),
                            4096)
    return found


def _fingerprint_head(tenant: str, workload: str, model: str, provider: str) -> str:
    return _dumps([tenant, workload, model, provider])[:-1] + ","


def fingerprint(req: AuthorizeInput, head: str = "") -> str:
    """What makes two requests with one request_id the same request (a digest of
    the JSON list [tenant, workload, model, provider, input tokens, max output
    tokens, sorted labels]). ``head``: the list's first four members, as the
    request's shape keeps them."""
    head = head or _fingerprint_head(req.tenant, req.workload, req.model, req.provider)
    labels = _labels_json(req.labels)[0] if req.labels else "[]"
    body = f"{head}{req.estimated_input_tokens},{req.max_output_tokens},{labels}]"
    return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


def _resolve_provider(snapshot: PolicySnapshot, model: str, provider: str) -> str:
    if provider:
        return provider
    providers = sorted({p for (p, m) in snapshot.prices if m == model})
    if len(providers) > 1:
        raise InvalidRequest(
            f"provider is required: model {model!r} is priced by {', '.join(providers)}")
    return providers[0] if providers else ""


def _estimate(rate: Price, input_tokens: int, output_tokens: int) -> int:
    return ceil_div(input_tokens * rate.input + output_tokens * rate.output, PICO_PER_MICRO)


_FOREVER = 1 << 62
_T = TypeVar("_T")


@dataclass(slots=True, eq=False)
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
    event_tail: str = ""  # the static event members, JSON without the opening brace
    fingerprint_head: str = ""
    # prefer-cheap: one shape per allowed option; a request takes the cheapest.
    alternatives: tuple[Shape, ...] = ()
    valid_from_ms: int = 0
    valid_until_ms: int = _FOREVER
    # What the engine derives from the shape for its budget store (Redis keys,
    # script arguments), filled on first use.
    material: object = None


_SHARED: dict[object, object] = {}


def _shared(value: _T) -> _T:
    """One object for equal small values that many shapes hold (the same candidate
    prices, the same budget index lists): a request then touches memory that
    other shapes keep warm."""
    found = _SHARED.get(value)
    return cast(_T, found if found is not None else bounded_put(_SHARED, value, value, 4096))


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


def _shape_event_tail(shape: Shape, price: ModelPrice | None) -> str:
    snap = shape.snapshot
    data: dict[str, object] = {
        "tenant": shape.tenant, "workload": shape.workload, "model": shape.model,
        "provider": price.provider if price else shape.provider,
        "rev": snap.policy_revision, "prev": snap.price_revision,
    }
    if shape.rule_id:
        data["rule"] = shape.rule_id
        data["mode"] = shape.route_mode
    if shape.targets:
        data["budgets"] = [
            {"id": t.budget.id, "scope": t.budget.scope_text, "window": t.budget.window,
             "ws": t.window_start_ms, "we": t.window_end_ms, "limit": t.budget.limit_micros,
             "mode": "enforce" if t.budget.enforce else "observe",
             "split": list(t.split)}
            for t in shape.targets
        ]
    reasons = [*shape.pre_reasons, *shape.denial]
    if reasons:
        data["reasons"] = [r.to_json() for r in reasons]
    return _dumps(data)[1:]


def build_shape(snapshot: PolicySnapshot, tenant: str, workload: str, model: str,
                provider_given: str, now_ms: int) -> Shape:
    """The shape of requests for (tenant, workload, model, provider) at ``now_ms``."""
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
                      denial, _shared(tuple(prices)), _shared(tuple(option_idx)),
                      tuple(targets))
        shape.event_tail = _shape_event_tail(shape, prices[0] if prices else None)
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
        price = ModelPrice(primary[0], primary[1], fb.price, fb.max_output_tokens,
                           tiers=fb.tiers)
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


def shape_for(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int) -> Shape:
    """The cached shape of ``req`` at ``now_ms`` (built on first use or once stale)."""
    # One string, not a tuple: a hit compares one stored object, not four (names
    # cannot contain control characters, so the separator keeps keys apart).
    key = f"{req.tenant}\x1f{req.workload}\x1f{req.model}\x1f{req.provider}"
    cache = snapshot._shape_cache
    shape = cache.get(key)
    if isinstance(shape, Shape) and shape.valid_from_ms <= now_ms < shape.valid_until_ms:
        return shape
    shape = build_shape(snapshot, req.tenant, req.workload, req.model, req.provider, now_ms)
    bounded_put(cache, key, shape, SHAPE_CACHE_SIZE)
    return shape


def plan(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int,
         permit_id: str | None = None) -> Plan:
    """What to check and hold for ``req`` (``req`` must already be validated)."""
    return plan_from_shape(shape_for(snapshot, req, now_ms), req, now_ms, permit_id)


def plan_from_shape(shape: Shape, req: AuthorizeInput, now_ms: int,
                    permit_id: str | None = None) -> Plan:
    tokens = req.estimated_input_tokens
    if shape.alternatives:
        best, best_est = shape.alternatives[0], -1
        for alt in shape.alternatives:
            mp = alt.prices[0]
            est = _estimate(mp.for_input(tokens), tokens,
                            req.max_output_tokens or mp.max_output_tokens)
            if best_est < 0 or est < best_est:
                best, best_est = alt, est
        shape = best
    pid = permit_id or new_permit_id(now_ms)
    fp = fingerprint(req, shape.fingerprint_head)
    if shape.denial:
        return Plan(pid, req, shape.snapshot, now_ms, None, req.max_output_tokens, 0, (),
                    shape.pre_reasons, shape.denial, fp, (), shape.route_mode, shape.rule_id,
                    shape)
    constrain = shape.snapshot.settings.allow_constrain
    cands: list[Candidate] = []
    for mp, idx in zip(shape.prices, shape.option_idx, strict=True):
        rate = mp.for_input(tokens)
        out = req.max_output_tokens or mp.max_output_tokens
        cands.append(Candidate(mp.provider, mp.model, mp, rate, out,
                               _estimate(rate, tokens, out), idx, not cands and constrain))
    first = cands[0]
    return Plan(pid, req, shape.snapshot, now_ms, first.price, first.output_tokens,
                first.estimate_micros, shape.targets, shape.pre_reasons, (), fp, tuple(cands),
                shape.route_mode, shape.rule_id, shape)


def _window(b: CompiledBudget, now_ms: int) -> tuple[int, int]:
    return window_bounds(b.window, now_ms, b.timezone)


def event_data(p: Plan) -> str:
    """The request side of the decision event (the store adds the figures)."""
    req = p.request
    rid = req.request_id
    rid_json = f'"{rid}"' if _PLAIN.fullmatch(rid) else _dumps(rid)
    head = (f'{{"v":1,"rid":{rid_json},"in_tok":{req.estimated_input_tokens},'
            f'"out_tok":{p.output_tokens},"est":{p.estimate_micros},"now":{p.now_ms},'
            f'"exp":{p.expires_at_ms},')
    if p.candidates:
        r = p.candidates[0].rate
        head += f'"price":[{r.input},{r.cached_input},{r.cache_write},{r.output}],'
    if len(p.candidates) > 1 or (p.candidates and p.candidates[0].model != req.model):
        cands = [
            {"p": c.provider, "m": c.model, "est": c.estimate_micros, "out": c.output_tokens,
             "price": [c.rate.input, c.rate.cached_input, c.rate.cache_write, c.rate.output],
             "budgets": list(c.target_idx)}
            for c in p.candidates
        ]
        head += '"cands":' + _dumps(cands) + ","
    if req.labels:
        head += '"labels":' + _labels_json(req.labels)[1] + ","
    who = CALLER.get()  # the authenticated caller, when identities are checked
    if who:
        head += '"caller":' + _dumps(who) + ","
    assert p.shape is not None
    return head + p.shape.event_tail


def _budget_reason(code: Code, t: Target, settled: int, held: int, requested: int,
                   now_ms: int, message: str) -> Reason:
    b = t.budget
    return Reason(
        code, message, budget_id=b.id, scope=b.scope_text, window_start_ms=t.window_start_ms,
        window_end_ms=t.window_end_ms, limit_micros=b.limit_micros, settled_micros=settled,
        held_micros=held, requested_micros=requested, exception_path=b.exception_path,
        retry_after_seconds=max(1, ceil_div(t.window_end_ms - now_ms, 1000)),
    )


_usd = format_usd


def _base_outcome(p: Plan, decision: DecisionKind, *, reasons: tuple[Reason, ...] = (),
                  holds: tuple[HoldFigure, ...] = (), estimated_cost_micros: int | None = None,
                  max_output_tokens: int | None = None, expires_at_ms: int = 0,
                  replayed: bool = False, permit_id: str | None = None,
                  model: str | None = None, provider: str | None = None,
                  matched_budgets: tuple[str, ...] | None = None,
                  degraded: bool = False) -> Outcome:
    price = p.price
    snap = p.snapshot
    return Outcome(
        decision, p.permit_id if permit_id is None else permit_id, snap.policy_revision,
        snap.price_revision,
        p.estimate_micros if estimated_cost_micros is None else estimated_cost_micros,
        p.output_tokens if max_output_tokens is None else max_output_tokens,
        p.request.model if model is None else model,
        (price.provider if price else p.request.provider) if provider is None else provider,
        reasons, holds, expires_at_ms, replayed,
        tuple(t.budget.id for t in p.targets) if matched_budgets is None else matched_budgets,
        degraded)


def denied_by_policy(p: Plan) -> Outcome:
    return _base_outcome(p, DecisionKind.DENY, reasons=p.denial, estimated_cost_micros=0)


def held_by(p: Plan, res: HoldReply) -> tuple[int, tuple[int, ...]]:
    """The candidate the hold script chose (0-based) and the targets it held."""
    c = res.candidate
    return c, res.held or p.candidates[c].target_idx


def conclude(p: Plan, res: HoldReply, replayed: bool = False,
             held: tuple[int, tuple[int, ...]] | None = None) -> Outcome:
    """Turn the hold script's answer into the decision (``held``: ``held_by(p, res)``
    when the caller has it already)."""
    figures = res.figures
    amount = res.amount_micros
    k = res.max_output_tokens
    d = DecisionKind(res.decision)
    c, held_idx = held if held is not None else held_by(p, res)
    chosen = p.candidates[c]
    granted = res.granted or (0,) * len(p.targets)

    def limit(i: int) -> int:
        return p.targets[i].budget.limit_micros + granted[i]

    def figure(i: int) -> HoldFigure:
        t = p.targets[i]
        b = t.budget
        return HoldFigure(b.id, b.scope_text, b.window, t.window_start_ms, t.window_end_ms,
                          limit(i), figures[i][0], figures[i][1],
                          "enforce" if b.enforce else "observe")

    reasons: list[Reason] = list(p.pre_reasons)
    if d is DecisionKind.DENY:
        first = p.candidates[0]
        holds = [figure(i) for i in first.target_idx]
        idx = res.fail
        if 0 <= idx < len(p.targets):
            t = p.targets[idx]
            s, h = figures[idx]
            room = limit(idx) - s - h
            tried = "" if len(p.candidates) == 1 else (
                " No cheaper model of the downgrade chain fits either.")
            reason = _budget_reason(
                Code.BUDGET_EXHAUSTED, t, s, h, amount, p.now_ms,
                f"Budget {t.budget.id} ({t.budget.window}) has {_usd(max(room, 0))} left of "
                f"{_usd(limit(idx))}; this request needs {_usd(amount)}.{tried}"
                + (f" Ask for an exception via {t.budget.exception_path}."
                   if t.budget.exception_path else ""))
            reasons.insert(0, replace(reason, limit_micros=limit(idx), rule_id=p.rule_id))
        return _base_outcome(p, d, reasons=tuple(reasons), holds=tuple(holds),
                             estimated_cost_micros=amount, replayed=replayed)
    holds = [figure(i) for i in held_idx]
    if chosen.model != p.request.model or chosen.provider != (
            p.request.provider or chosen.provider):
        d = DecisionKind.CONSTRAIN
        why = ("the routing rule prefers the cheapest model of its chain"
               if p.route_mode == "prefer-cheap"
               else "the requested model does not fit the remaining budget")
        reasons.insert(0, Reason(
            Code.MODEL_REROUTED,
            f"Rerouted from {p.request.model} to {chosen.provider}/{chosen.model} because {why}.",
            rule_id=p.rule_id, requested_micros=p.estimate_micros))
    elif d is DecisionKind.CONSTRAIN:
        reasons.insert(0, Reason(
            Code.OUTPUT_TOKENS_CAPPED,
            f"max_output_tokens reduced from {chosen.output_tokens} to {k} to fit the remaining "
            "budget.", requested_micros=chosen.estimate_micros))
    for i in held_idx:
        if granted[i]:
            t = p.targets[i]
            reasons.append(Reason(
                Code.EXCEPTION_GRANT_APPLIED,
                f"Budget {t.budget.id} is raised by {_usd(granted[i])} through an exception "
                f"grant on {t.budget.exception_path}.", budget_id=t.budget.id,
                limit_micros=limit(i), exception_path=t.budget.exception_path))
    for idx in res.shadow:
        t = p.targets[idx]
        fig = figures[idx]
        reasons.append(replace(_budget_reason(
            Code.SHADOW_BUDGET_EXCEEDED, t, fig[0], fig[1] - amount, amount, p.now_ms,
            f"Budget {t.budget.id} would have blocked this request "
            f"({'observe-mode routing rule' if p.observe else 'observe-mode budget'})."),
            limit_micros=limit(idx)))
    for i, pct in res.alerts:
        t = p.targets[i]
        reasons.append(replace(_budget_reason(
            Code.BUDGET_THRESHOLD_CROSSED, t, figures[i][0], figures[i][1], amount,
            p.now_ms, f"Budget {t.budget.id} crossed {pct}% of its cap in this window."),
            limit_micros=limit(i)))
    return _base_outcome(
        p, d, reasons=tuple(reasons), holds=tuple(holds), estimated_cost_micros=amount,
        max_output_tokens=k, expires_at_ms=res.expires_at_ms or p.expires_at_ms,
        replayed=replayed, permit_id=res.permit_id or p.permit_id,
        model=chosen.model, provider=chosen.provider,
        matched_budgets=tuple(p.targets[i].budget.id for i in held_idx))


def without_store(p: Plan, code: Code = Code.STORE_UNAVAILABLE) -> Outcome:
    """Apply each budget's fail mode when the store could not be consulted. The
    answer carries the degraded permit id (``degraded_permit_id``), never the id the
    hold script was sent with (that script may still run; the engine aborts it)."""
    p = replace(p, permit_id=degraded_permit_id(p.permit_id))
    why = {Code.STORE_UNAVAILABLE: "the budget store did not answer in time",
           Code.INTERNAL_ERROR: "the sidecar failed unexpectedly while deciding",
           }.get(code, "the caller's deadline left no time to consult the budget store")
    closed = [t for t in p.targets if t.budget.enforce and not t.budget.fail_open]
    if closed:
        reasons = tuple(
            _budget_reason(code, t, 0, 0, p.estimate_micros, p.now_ms,
                           f"Budget {t.budget.id} fails closed and {why}.")
            for t in closed
        )
        return _base_outcome(p, DecisionKind.DENY, reasons=reasons, degraded=True)
    note = Reason(code, f"Allowed without a hold because {why} and every matching budget "
                  "fails open.")
    return _base_outcome(p, DecisionKind.ALLOW, reasons=(note, *p.pre_reasons), degraded=True,
                         expires_at_ms=p.expires_at_ms)


def internal_error(req: AuthorizeInput, permit_id: str) -> Outcome:
    """DENY when deciding failed before the matching budgets were known (no fail mode
    can apply to budgets nobody has matched)."""
    return Outcome(
        DecisionKind.DENY, permit_id, "", "", 0, req.max_output_tokens, req.model, req.provider,
        reasons=(Reason(Code.INTERNAL_ERROR,
                        "The sidecar failed unexpectedly before it could match this request's "
                        "budgets; nothing was held. Retry; the error is logged and counted."),),
    )


def request_id_ended(p: Plan, earlier_permit_id: str, state: str) -> Outcome:
    """DENY a replay of a request_id whose permit has ended: a replay returns a permit
    only while it is held, so no second provider call can ride on a finished one."""
    return _base_outcome(p, DecisionKind.DENY, estimated_cost_micros=0, reasons=(Reason(
        Code.REQUEST_ID_REUSED,
        f"request_id {p.request.request_id[:64]!r} already carried permit {earlier_permit_id}, "
        f"which is {state}; a permit serves one provider call. Send a new request_id for a "
        "new call.", requested_micros=p.estimate_micros),))


def not_loaded(req: AuthorizeInput, permit_id: str) -> Outcome:
    return Outcome(
        DecisionKind.DENY, permit_id, "", "", 0, req.max_output_tokens, req.model, req.provider,
        reasons=(Reason(Code.POLICY_NOT_LOADED,
                        "No valid policy bundle has been loaded yet; nothing can be authorized."),),
    )
