"""The decision itself: pure functions over a policy snapshot. No I/O, no gRPC.

``plan`` turns a validated request into what the budget store must check and
hold; ``conclude`` turns the store's answer into the caller's decision;
``without_store`` applies each budget's fail mode when the store is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, replace
from enum import StrEnum

from keel_pdp.policy.snapshot import CompiledBudget, ModelPrice, PolicySnapshot
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


# Reasons that explain an answer without blocking it.
INFORMATIONAL = frozenset({
    Code.SHADOW_BUDGET_EXCEEDED, Code.FALLBACK_PRICE_USED, Code.SHADOW_MODEL_NOT_ALLOWED,
    Code.BUDGET_THRESHOLD_CROSSED, Code.EXCEPTION_GRANT_APPLIED,
})


class InvalidRequest(ValueError):
    """A request field is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class AuthorizeInput:
    request_id: str
    tenant: str
    workload: str
    model: str
    provider: str
    estimated_input_tokens: int
    max_output_tokens: int = 0
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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

    @property
    def observe(self) -> bool:
        return self.route_mode == "observe"

    @property
    def expires_at_ms(self) -> int:
        return self.now_ms + self.snapshot.settings.hold_ttl_seconds * 1000


@dataclass(frozen=True, slots=True)
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


def new_permit_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"pmt_{ms:012x}{os.urandom(8).hex()}"


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


def fingerprint(req: AuthorizeInput) -> str:
    body = json.dumps(
        [req.tenant, req.workload, req.model, req.provider, req.estimated_input_tokens,
         req.max_output_tokens, sorted(req.labels)],
        ensure_ascii=True, separators=(",", ":"),
    )
    return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


def _resolve_provider(snapshot: PolicySnapshot, req: AuthorizeInput) -> str:
    if req.provider:
        return req.provider
    providers = sorted({p for (p, m) in snapshot.prices if m == req.model})
    if len(providers) > 1:
        raise InvalidRequest(
            f"provider is required: model {req.model!r} is priced by {', '.join(providers)}")
    return providers[0] if providers else ""


def _estimate(rate: Price, input_tokens: int, output_tokens: int) -> int:
    return ceil_div(input_tokens * rate.input + output_tokens * rate.output, PICO_PER_MICRO)


def plan(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int,
         permit_id: str | None = None) -> Plan:
    """What to check and hold for ``req`` (``req`` must already be validated)."""
    provider = _resolve_provider(snapshot, req)
    pid = permit_id or new_permit_id(now_ms)
    base: dict[str, object] = {"permit_id": pid, "snapshot": snapshot, "now_ms": now_ms,
                               "fingerprint": fingerprint(req), "request": req}

    def deny(reason: Reason, **kw: object) -> Plan:
        return Plan(price=None, output_tokens=req.max_output_tokens, estimate_micros=0,
                    targets=(), pre_reasons=(), denial=(reason,), **base, **kw)  # type: ignore[arg-type]

    routes = snapshot.match_routes(req.tenant, req.workload)
    # Only the most specific level of matching rules decides.
    level = [r for r in routes if r.scope == routes[0].scope] if routes else []
    rule = level[0] if level else None
    mode = rule.mode if rule else "enforce"
    rule_kw: dict[str, object] = {"route_mode": mode, "rule_id": rule.id if rule else ""}

    def allowed(p: str, m: str) -> bool:
        return not level or any(r.allows(p, m) for r in level)

    def priced(p: str, m: str) -> ModelPrice | None:
        return snapshot.price_for(p, m, now_ms)

    pre: list[Reason] = []
    primary = (provider, req.model)
    chain = rule.chain if rule else ()
    if mode == "prefer-cheap":
        options = [primary, *[c for c in chain if c != primary]]
        costed: list[tuple[int, int, tuple[str, str]]] = []
        for p_, m_ in options:
            mp = priced(p_, m_)
            if mp is None or not allowed(p_, m_):
                continue
            out = req.max_output_tokens or mp.max_output_tokens
            costed.append((_estimate(mp.for_input(req.estimated_input_tokens),
                                     req.estimated_input_tokens, out), len(costed), (p_, m_)))
        if costed:
            primary = min(costed)[2]
    if not allowed(*primary):
        assert rule is not None
        text = (f"Routing rule {rule.id} does not allow {provider or '?'}/{req.model} for "
                f"workload {req.workload}.")
        if mode != "observe":
            return deny(Reason(Code.MODEL_NOT_ALLOWED, text, rule_id=rule.id), **rule_kw)
        pre.append(Reason(Code.SHADOW_MODEL_NOT_ALLOWED, text + " (observe mode: not enforced)",
                          rule_id=rule.id))

    price = priced(*primary)
    if price is None:
        fb = snapshot.settings.fallback_price
        if fb is None:
            return deny(Reason(
                Code.UNKNOWN_MODEL_PRICE,
                f"No price is known for {primary[0] or '?'}/{primary[1]} and the policy names "
                "no fallback price."), **rule_kw)
        price = ModelPrice(primary[0], primary[1], fb.price, fb.max_output_tokens,
                           tiers=fb.tiers)
        pre.append(Reason(Code.FALLBACK_PRICE_USED,
                          f"{primary[0] or '?'}/{primary[1]} has no price; the fallback price "
                          "was used."))

    options_: list[ModelPrice] = [price]
    if mode == "enforce" and primary in chain:
        for p_, m_ in chain[chain.index(primary) + 1:]:
            mp = priced(p_, m_)
            if mp is not None and allowed(p_, m_):
                options_.append(mp)

    targets: list[Target] = []
    index: dict[tuple[str, tuple[str, ...]], int] = {}
    cands: list[Candidate] = []
    for n, mp in enumerate(options_):
        values = (req.tenant, req.workload, mp.model, mp.provider)
        idx = []
        for b in snapshot.match_budgets(*values):
            split = tuple(values[i] for i in b.per)
            key = (b.id, split)
            if key not in index:
                start, end = _window(b, now_ms)
                index[key] = len(targets)
                targets.append(Target(b, split, start, end))
            idx.append(index[key])
        rate = mp.for_input(req.estimated_input_tokens)
        out = req.max_output_tokens or mp.max_output_tokens
        cands.append(Candidate(mp.provider, mp.model, mp, rate, out,
                               _estimate(rate, req.estimated_input_tokens, out), tuple(idx),
                               n == 0 and snapshot.settings.allow_constrain))
    first = cands[0]
    return Plan(price=first.price, output_tokens=first.output_tokens,
                estimate_micros=first.estimate_micros, targets=tuple(targets),
                pre_reasons=tuple(pre), candidates=tuple(cands), **base, **rule_kw)  # type: ignore[arg-type]


def _window(b: CompiledBudget, now_ms: int) -> tuple[int, int]:
    return window_bounds(b.window, now_ms, b.timezone)


def event_data(p: Plan) -> str:
    """The request side of the decision event (the store adds the figures)."""
    req = p.request
    snap = p.snapshot
    data: dict[str, object] = {
        "v": 1,
        "rid": req.request_id,
        "tenant": req.tenant,
        "workload": req.workload,
        "model": req.model,
        "provider": p.price.provider if p.price else req.provider,
        "in_tok": req.estimated_input_tokens,
        "out_tok": p.output_tokens,
        "est": p.estimate_micros,
        "rev": snap.policy_revision,
        "prev": snap.price_revision,
        "now": p.now_ms,
        "exp": p.expires_at_ms,
    }
    if p.candidates:
        r = p.candidates[0].rate
        data["price"] = [r.input, r.cached_input, r.cache_write, r.output]
    if len(p.candidates) > 1 or (p.candidates and p.candidates[0].model != req.model):
        data["cands"] = [
            {"p": c.provider, "m": c.model, "est": c.estimate_micros, "out": c.output_tokens,
             "price": [c.rate.input, c.rate.cached_input, c.rate.cache_write, c.rate.output],
             "budgets": list(c.target_idx)}
            for c in p.candidates
        ]
    if p.rule_id:
        data["rule"] = p.rule_id
        data["mode"] = p.route_mode
    if req.labels:
        data["labels"] = dict(req.labels)
    if p.targets:
        data["budgets"] = [
            {"id": t.budget.id, "scope": t.budget.scope_text, "window": t.budget.window,
             "ws": t.window_start_ms, "we": t.window_end_ms, "limit": t.budget.limit_micros,
             "mode": "enforce" if t.budget.enforce else "observe",
             "split": list(t.split)}
            for t in p.targets
        ]
    reasons = [*p.pre_reasons, *p.denial]
    if reasons:
        data["reasons"] = [r.to_json() for r in reasons]
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"))


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


def _base_outcome(p: Plan, decision: DecisionKind, **kw: object) -> Outcome:
    price = p.price
    kw.setdefault("model", p.request.model)
    kw.setdefault("provider", price.provider if price else p.request.provider)
    kw.setdefault("matched_budgets", tuple(t.budget.id for t in p.targets))
    return Outcome(
        decision=decision, permit_id=kw.pop("permit_id", p.permit_id),  # type: ignore[arg-type]
        policy_revision=p.snapshot.policy_revision, price_revision=p.snapshot.price_revision,
        estimated_cost_micros=kw.pop("estimated_cost_micros", p.estimate_micros),  # type: ignore[arg-type]
        max_output_tokens=kw.pop("max_output_tokens", p.output_tokens),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def denied_by_policy(p: Plan) -> Outcome:
    return _base_outcome(p, DecisionKind.DENY, reasons=p.denial, estimated_cost_micros=0)


def _ints(value: object) -> list[int]:
    return [int(x) for x in value] if isinstance(value, list) else []


def held_by(p: Plan, res: dict[str, object]) -> tuple[int, list[int]]:
    """The candidate the hold script chose (0-based) and the targets it held."""
    c = int(res.get("c", 1)) - 1  # type: ignore[call-overload]
    return c, [i - 1 for i in _ints(res.get("held"))] or list(p.candidates[c].target_idx)


def conclude(p: Plan, res: dict[str, object], replayed: bool = False) -> Outcome:
    """Turn the hold script's answer into the decision."""
    figures = res.get("b") or []
    assert isinstance(figures, list)
    amount = int(res["amt"])  # type: ignore[call-overload]
    k = int(res["k"])  # type: ignore[call-overload]
    d = DecisionKind(str(res["d"]))
    c, held_idx = held_by(p, res)
    chosen = p.candidates[c]
    granted = _ints(res.get("gr")) or [0] * len(p.targets)

    def limit(i: int) -> int:
        return p.targets[i].budget.limit_micros + granted[i]

    def figure(i: int) -> HoldFigure:
        t = p.targets[i]
        b = t.budget
        return HoldFigure(b.id, b.scope_text, b.window, t.window_start_ms, t.window_end_ms,
                          limit(i), int(figures[i][0]), int(figures[i][1]),
                          "enforce" if b.enforce else "observe")

    reasons: list[Reason] = list(p.pre_reasons)
    if d is DecisionKind.DENY:
        first = p.candidates[0]
        holds = [figure(i) for i in first.target_idx]
        idx = res.get("fail")
        if isinstance(idx, int) and 1 <= idx <= len(p.targets):
            t = p.targets[idx - 1]
            s, h = int(figures[idx - 1][0]), int(figures[idx - 1][1])
            room = limit(idx - 1) - s - h
            tried = "" if len(p.candidates) == 1 else (
                " No cheaper model of the downgrade chain fits either.")
            reason = _budget_reason(
                Code.BUDGET_EXHAUSTED, t, s, h, amount, p.now_ms,
                f"Budget {t.budget.id} ({t.budget.window}) has {_usd(max(room, 0))} left of "
                f"{_usd(limit(idx - 1))}; this request needs {_usd(amount)}.{tried}"
                + (f" Ask for an exception via {t.budget.exception_path}."
                   if t.budget.exception_path else ""))
            reasons.insert(0, replace(reason, limit_micros=limit(idx - 1),
                                      rule_id=p.rule_id))
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
    for idx in _ints(res.get("shadow")):
        t = p.targets[idx - 1]
        fig = figures[idx - 1]
        reasons.append(replace(_budget_reason(
            Code.SHADOW_BUDGET_EXCEEDED, t, int(fig[0]), int(fig[1]) - amount, amount, p.now_ms,
            f"Budget {t.budget.id} would have blocked this request "
            f"({'observe-mode routing rule' if p.observe else 'observe-mode budget'})."),
            limit_micros=limit(idx - 1)))
    alerts = res.get("alerts") or []
    assert isinstance(alerts, list)
    for pair in alerts:
        i, pct = int(pair[0]) - 1, int(pair[1])
        t = p.targets[i]
        reasons.append(replace(_budget_reason(
            Code.BUDGET_THRESHOLD_CROSSED, t, int(figures[i][0]), int(figures[i][1]), amount,
            p.now_ms, f"Budget {t.budget.id} crossed {pct}% of its cap in this window."),
            limit_micros=limit(i)))
    exp = res.get("exp", p.expires_at_ms)
    return _base_outcome(
        p, d, reasons=tuple(reasons), holds=tuple(holds), estimated_cost_micros=amount,
        max_output_tokens=k, expires_at_ms=int(exp),  # type: ignore[call-overload]
        replayed=replayed, permit_id=str(res.get("pid", p.permit_id)),
        model=chosen.model, provider=chosen.provider,
        matched_budgets=tuple(p.targets[i].budget.id for i in held_idx))


def without_store(p: Plan, code: Code = Code.STORE_UNAVAILABLE) -> Outcome:
    """Apply each budget's fail mode when the store could not be consulted."""
    why = ("the budget store did not answer in time" if code is Code.STORE_UNAVAILABLE
           else "the caller's deadline left no time to consult the budget store")
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


def not_loaded(req: AuthorizeInput, permit_id: str) -> Outcome:
    return Outcome(
        DecisionKind.DENY, permit_id, "", "", 0, req.max_output_tokens, req.model, req.provider,
        reasons=(Reason(Code.POLICY_NOT_LOADED,
                        "No valid policy bundle has been loaded yet; nothing can be authorized."),),
    )
