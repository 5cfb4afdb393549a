"""Concluding: the store's answer (or its absence) -> the caller's decision.

``conclude`` turns the hold script's typed reply into the answer; ``without_store``
applies each budget's fail mode when the store could not be consulted; the rest
build the answers that need no store at all.
"""

from __future__ import annotations

from dataclasses import replace

from keel_pdp.budget.replies import HoldReply
from keel_pdp.decision.model import (
    AuthorizeInput,
    Code,
    DecisionKind,
    HoldFigure,
    Outcome,
    Plan,
    Reason,
    Target,
)
from keel_pdp.permits import degraded_permit_id
from keel_pdp.pricing import ceil_div, format_usd


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
        degraded, p.web_search_calls)


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
