"""Planning: a validated request and its shape -> what the budget store must check
and hold (candidates, their exact cost shapes, the budget windows)."""

from __future__ import annotations

from keel_pdp.decision.model import AuthorizeInput, Candidate, Code, Plan, Reason
from keel_pdp.decision.shape import Shape, ShapeCache, _estimate, fingerprint, shape_for
from keel_pdp.policy.snapshot import ModelPrice, PolicySnapshot


def plan(snapshot: PolicySnapshot, req: AuthorizeInput, now_ms: int, permit_id: str,
         cache: ShapeCache | None = None) -> Plan:
    """What to check and hold for ``req`` (``req`` must already be validated) under
    ``permit_id`` (the engine's to make: the decision has no randomness)."""
    return plan_from_shape(shape_for(snapshot, req, now_ms, cache), req, now_ms, permit_id)


def plan_from_shape(shape: Shape, req: AuthorizeInput, now_ms: int, permit_id: str) -> Plan:
    tokens = req.estimated_input_tokens
    tier = req.service_tier
    auto = shape.snapshot.settings.auto_service_tier
    if shape.alternatives:
        best, best_est = shape.alternatives[0], -1
        for alt in shape.alternatives:
            mp = alt.prices[0]
            est = _estimate(mp.for_service_tier(tier, auto)[1].for_input(tokens), tokens,
                            req.max_output_tokens or mp.max_output_tokens)
            if best_est < 0 or est < best_est:
                best, best_est = alt, est
        shape = best
    pid = permit_id
    fp = fingerprint(req, shape.fingerprint_head)
    if shape.denial:
        return Plan(pid, req, shape.snapshot, now_ms, None, req.max_output_tokens, 0, (),
                    shape.pre_reasons, shape.denial, fp, (), shape.route_mode, shape.rule_id,
                    shape)
    constrain = shape.snapshot.settings.allow_constrain
    cands: list[Candidate] = []
    pre = shape.pre_reasons
    for mp, idx in zip(shape.prices, shape.option_idx, strict=True):
        held_tier, held, unpriced = mp.for_service_tier(tier, auto)
        rate = held.for_input(tokens)
        out = req.max_output_tokens or mp.max_output_tokens
        if unpriced and not cands:
            pre = (*pre, _unpriced(mp, tier))
        cands.append(Candidate(mp.provider, mp.model, mp, rate, out,
                               _estimate(rate, tokens, out), idx, not cands and constrain,
                               held_tier))
    first = cands[0]
    return Plan(pid, req, shape.snapshot, now_ms, first.price, first.output_tokens,
                first.estimate_micros, shape.targets, pre, (), fp, tuple(cands),
                shape.route_mode, shape.rule_id, shape)


def _unpriced(mp: ModelPrice, tier: str) -> Reason:
    held = "its own rates" if not mp.service_tiers else "the highest rate of its tiers"
    return Reason(Code.SERVICE_TIER_UNPRICED,
                  f"The price table has no {tier[:64]!r} service tier for "
                  f"{mp.provider}/{mp.model}; the request is held at {held}.")
