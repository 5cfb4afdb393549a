"""Planning: a validated request and its shape -> what the budget store must check
and hold (candidates, their exact cost shapes, the budget windows)."""

from __future__ import annotations

from keel_pdp.decision.model import AuthorizeInput, Candidate, Code, Plan, Reason
from keel_pdp.decision.shape import Shape, ShapeCache, fingerprint, shape_for
from keel_pdp.policy.snapshot import ModelPrice, PolicySnapshot
from keel_pdp.pricing import (
    PICO_PER_MICRO,
    WEB_SEARCH_UNBOUNDED,
    Price,
    ceil_div,
    hold_fixed_pico,
)


def plan(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int, permit_id: str,
         cache: ShapeCache | None = None) -> Plan:
    """What to check and hold for ``req`` (``req`` must already be validated) under
    ``permit_id`` (the engine's to make: the decision has no randomness)."""
    return plan_from_shape(shape_for(snapshot, req, now_ms, cache), req, now_ms, permit_id)


def held_searches(req: AuthorizeInput, hold_calls: int) -> int:
    """The web searches a hold covers: the request's bound, or ``hold_calls`` (the
    bundle's web_search_hold_calls) for a search tool without one."""
    n = req.max_web_search_calls
    return hold_calls if n == WEB_SEARCH_UNBOUNDED else max(n, 0)


def plan_from_shape(shape: Shape, req: AuthorizeInput, now_ms: int, permit_id: str) -> Plan:
    tokens = req.estimated_input_tokens
    tier = req.service_tier
    ttl = req.cache_write_ttl
    settings = shape.snapshot.settings
    auto = settings.auto_service_tier
    searches = held_searches(req, settings.web_search_hold_calls)
    if shape.alternatives:
        best, best_est = shape.alternatives[0], -1
        for alt in shape.alternatives:
            mp = alt.prices[0]
            rate = mp.for_service_tier(tier, auto)[1].for_input(tokens)
            out = req.max_output_tokens or mp.max_output_tokens
            est = _estimate(hold_fixed_pico(rate, tokens, ttl, searches), out, rate)
            if best_est < 0 or est < best_est:
                best, best_est = alt, est
        shape = best
    pid = permit_id
    fp = fingerprint(req, shape.fingerprint_head)
    if shape.denial:
        return Plan(pid, req, shape.snapshot, now_ms, None, req.max_output_tokens, 0, (),
                    shape.pre_reasons, shape.denial, fp, (), shape.route_mode, shape.rule_id,
                    shape, searches)
    constrain = shape.snapshot.settings.allow_constrain
    cands: list[Candidate] = []
    pre = shape.pre_reasons
    for mp, idx in zip(shape.prices, shape.option_idx, strict=True):
        held_tier, held, unpriced = mp.for_service_tier(tier, auto)
        rate = held.for_input(tokens)
        out = req.max_output_tokens or mp.max_output_tokens
        if unpriced and not cands:
            pre = (*pre, _unpriced(mp, tier))
        if searches and rate.web_search is None and not cands:
            pre = (*pre, _search_unpriced(mp, searches))
        fixed = hold_fixed_pico(rate, tokens, ttl, searches)
        cands.append(Candidate(mp.provider, mp.model, mp, rate, out,
                               _estimate(fixed, out, rate), idx,
                               not cands and constrain, held_tier, fixed))
    first = cands[0]
    return Plan(pid, req, shape.snapshot, now_ms, first.price, first.output_tokens,
                first.estimate_micros, shape.targets, pre, (), fp, tuple(cands),
                shape.route_mode, shape.rule_id, shape, searches)


def _estimate(fixed_pico: int, output_tokens: int, rate: Price) -> int:
    """A hold's estimate in micro-USD: its fixed part and its output, rounded up once."""
    return ceil_div(fixed_pico + output_tokens * rate.output, PICO_PER_MICRO)


def _unpriced(mp: ModelPrice, tier: str) -> Reason:
    held = "its own rates" if not mp.service_tiers else "the highest rate of its tiers"
    return Reason(Code.SERVICE_TIER_UNPRICED,
                  f"The price table has no {tier[:64]!r} service tier for "
                  f"{mp.provider}/{mp.model}; the request is held at {held}.")


def _search_unpriced(mp: ModelPrice, searches: int) -> Reason:
    return Reason(Code.WEB_SEARCH_UNPRICED,
                  f"The price table has no web_search_per_1k for {mp.provider}/{mp.model}; "
                  f"the {searches} web searches this call may make are held at nothing and "
                  "booked at nothing until the monthly reconciliation.")
