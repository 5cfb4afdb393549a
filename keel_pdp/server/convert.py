"""Protobuf <-> domain conversion, at the edge only."""

from __future__ import annotations

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.decision import AuthorizeInput, Outcome
from keel_pdp.engine import CloseoutResult, VoidResult
from keel_pdp.pricing import TokenUsage


def authorize_input(req: pb.AuthorizeRequest) -> AuthorizeInput:
    return AuthorizeInput(
        request_id=req.request_id,
        tenant=req.tenant,
        workload=req.workload,
        model=req.model,
        provider=req.provider,
        estimated_input_tokens=req.estimated_input_tokens,
        max_output_tokens=req.max_output_tokens,
        labels=tuple(sorted(req.labels.items())),
        service_tier=req.service_tier,
        max_web_search_calls=req.max_web_search_calls,
        cache_write_ttl=req.cache_write_ttl,
    )


_HOLD = pb.Hold
_REASON = pb.BlockReason


def authorize_response(out: Outcome) -> pb.AuthorizeResponse:
    # Sub-messages built first and handed to the constructor: cheaper than
    # adding them to the repeated fields one by one.
    return pb.AuthorizeResponse(
        decision=pb.Decision.Value(str(out.decision)),
        permit_id=out.permit_id,
        policy_revision=out.policy_revision,
        price_revision=out.price_revision,
        estimated_cost_micros=out.estimated_cost_micros,
        constraints=pb.Constraints(
            max_output_tokens=out.max_output_tokens, model=out.model, provider=out.provider),
        expires_at_ms=out.expires_at_ms,
        replayed=out.replayed,
        matched_budgets=out.matched_budgets,
        degraded=out.degraded,
        web_search_calls=out.web_search_calls,
        block_reasons=[_REASON(
            code=pb.ReasonCode.Value(str(r.code)), message=r.message, budget_id=r.budget_id,
            scope=r.scope, window_start_ms=r.window_start_ms, window_end_ms=r.window_end_ms,
            limit_micros=r.limit_micros, settled_micros=r.settled_micros,
            held_micros=r.held_micros, requested_micros=r.requested_micros, rule_id=r.rule_id,
            exception_path=r.exception_path, retry_after_seconds=r.retry_after_seconds)
            for r in out.reasons],
        holds=[_HOLD(
            budget_id=h.budget_id, scope=h.scope, window=h.window,
            window_start_ms=h.window_start_ms, window_end_ms=h.window_end_ms,
            limit_micros=h.limit_micros, settled_micros=h.settled_micros,
            held_micros=h.held_micros, remaining_micros=h.remaining_micros, mode=h.mode)
            for h in out.holds],
    )


def usage(u: pb.Usage) -> TokenUsage:
    return TokenUsage(
        input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
        cache_write_tokens=u.cache_write_tokens, output_tokens=u.output_tokens,
        reasoning_tokens=u.reasoning_tokens, cache_write_1h_tokens=u.cache_write_1h_tokens,
        web_search_calls=u.web_search_calls)


def outcome_name(value: int) -> str:
    try:
        return pb.Outcome.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"<unknown outcome {value}>"


def closeout_response(r: CloseoutResult) -> pb.CloseoutResponse:
    return pb.CloseoutResponse(
        status=pb.CloseoutStatus.Value(r.status), actual_cost_micros=r.actual_cost_micros,
        estimated_cost_micros=r.estimated_cost_micros, correction_micros=r.correction_micros,
        held_micros=r.held_micros, priced_cost_micros=r.priced_cost_micros,
        flags=[_flag_reason(r, f) for f in r.flags if f in _FLAG_TEXT])


# A Closeout's flags (booked all the same): the reason code of the same name, and its
# message ({act} and {est}: the booked cost and the permit's estimate, micro-USD).
_FLAG_TEXT = {
    "USAGE_ABOVE_PERMIT":
        "The reported usage is above what the permit allowed (output tokens above its "
        "max_output_tokens, or input tokens above its estimate); booked and flagged for "
        "review.",
    "COST_ABOVE_HOLD":
        "The booked cost ({act} micro-USD) is above the permit's estimate ({est} "
        "micro-USD); booked and flagged.",
    "SERVICE_TIER_UNPRICED":
        "The reported service tier has no rate in the permit's price table; the usage was "
        "priced at the highest rate the permit knows for the model; booked and flagged.",
    "WEB_SEARCH_UNPRICED":
        "The usage reports web searches but the permit's price has no web_search_per_1k: "
        "they were booked at nothing; the monthly reconciliation books the provider's fee.",
}


def _flag_reason(r: CloseoutResult, flag: str) -> pb.BlockReason:
    return pb.BlockReason(
        code=pb.ReasonCode.Value(flag), requested_micros=r.actual_cost_micros,
        held_micros=r.held_micros,
        message=_FLAG_TEXT[flag].format(act=r.actual_cost_micros, est=r.estimated_cost_micros))


def void_response(r: VoidResult) -> pb.VoidResponse:
    return pb.VoidResponse(status=pb.VoidStatus.Value(r.status),
                           released_micros=r.released_micros, state=r.state)
