"""How a provider call seen by ext_proc ends its permit: the settlement rule.

Pure code. Every permit ext_proc sees ends in exactly one closeout or void,
chosen by how far the call got (``Stage``) and what the response said:

=====================================  ==========================================
what happened                          what Keel books
=====================================  ==========================================
response ended, usage reported         Closeout with the provider's usage
                                       (SUCCEEDED; FAILED if the body carried an
                                       error event)
response ended, no usage reported      Closeout, input = Keel's estimate, output =
(stream without include_usage)         generated text bytes / 4 (capped at the
                                       permit's max tokens); SUCCEEDED
upstream answered 4xx/5xx              Void (providers do not bill refused or
(except 504)                           failed requests)
upstream reset or closed after the     Closeout at the hold, FAILED: the provider
request went out, before any answer    may have processed and billed the call
(Envoy's 503)                          (a connection that never opened: Void)
504 gateway timeout                    Closeout at the hold (input estimate + max
                                       tokens), FAILED: the provider may still
                                       have finished and billed the call
2xx response broken half-way           Closeout with the usage seen so far (the
(upstream reset, client disconnect)    final usage if it arrived; else Anthropic's
                                       message_start input, else Keel's input
                                       estimate) and output = max(reported,
                                       text bytes / 4), capped at max tokens;
                                       PARTIAL
client gone after the request went     Closeout at the hold, CANCELLED: the
upstream, before any response          provider may have processed and billed it
client gone before Keel released the   Void: the provider never saw the request
request to the provider
=====================================  ==========================================

Usage the budget store refuses as impossible for the permit (a cost above the
overrun ceiling, a count past any plausible one) is booked at the hold instead
(``at_hold_fallback``), never left to expire unbooked.

Web searches (billed per call): a booking at the hold books the searches the hold
covers (``Permit.web_search_calls``); a closeout with the provider's usage books
the searches the answer reports; an estimated one books the searches seen so far
(the stream's search items), as the output is the text seen so far.

Estimates err upward where the provider may have billed; the monthly
reconciliation against the provider's export books the exact difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from keel_pdp.mesh.usage import Reading, consistent
from keel_pdp.pricing import TokenUsage

NO_USAGE = TokenUsage()


class Stage(IntEnum):
    REQUEST = 0  # Keel has not yet released the request to the provider
    SENT = 1  # request released; no response headers yet
    RESPONDING = 2  # response headers seen
    ENDED = 3  # response body ended normally


@dataclass(frozen=True, slots=True)
class Permit:
    permit_id: str
    input_tokens: int  # Keel's input estimate at Authorize
    max_tokens: int  # the output cap the permit was held for
    web_search_calls: int = 0  # the web searches the hold covers


@dataclass(frozen=True, slots=True)
class Settlement:
    kind: str  # "closeout" | "void"
    reason: str
    outcome: str = ""
    usage: TokenUsage = NO_USAGE
    estimated: bool = False
    # The service tier the response reported ("": none; the usage is then priced
    # at the rate the permit was held at, as a booking at the hold always is).
    service_tier: str = ""


def _hold(p: Permit) -> TokenUsage:
    """The usage the permit was held for: Keel's input estimate, the output cap and
    the web searches the hold covers."""
    return TokenUsage(input_tokens=p.input_tokens, output_tokens=p.max_tokens,
                      web_search_calls=p.web_search_calls)


def _at_hold(p: Permit, outcome: str, reason: str) -> Settlement:
    return Settlement("closeout", reason, outcome, _hold(p), estimated=True)


def at_hold_fallback(p: Permit, s: Settlement) -> Settlement | None:
    """What to book when the budget store refuses ``s``'s usage as impossible for the
    permit (far above its hold, or past any plausible count): the hold, estimated.
    The call was made and may have been billed, so the permit is not left to expire
    with nothing booked, and no impossible figure moves a budget; the monthly
    reconciliation books the provider's real cost. None: ``s`` is already that."""
    if s.kind != "closeout":
        return None
    hold = _hold(p)
    if s.usage == hold:
        return None
    return Settlement("closeout", f"usage impossible for the permit ({s.reason}); booked at "
                      "the hold", s.outcome, hold, estimated=True)


def _cap(p: Permit, tokens: int) -> int:
    return min(tokens, p.max_tokens) if p.max_tokens > 0 else tokens


def _from_reading(p: Permit, r: Reading, outcome: str, reason: str) -> Settlement:
    if r.usage is not None:
        return Settlement("closeout", reason, outcome, r.usage, service_tier=r.service_tier)
    seen = r.partial_usage
    est_out = _cap(p, r.estimated_output_tokens())
    if seen is None:
        usage = TokenUsage(input_tokens=p.input_tokens, output_tokens=est_out,
                           web_search_calls=r.web_search_calls)
    else:
        usage = consistent(seen.input_tokens or p.input_tokens, seen.cached_input_tokens,
                           seen.cache_write_tokens, max(seen.output_tokens, est_out),
                           seen.reasoning_tokens, seen.cache_write_1h_tokens,
                           max(seen.web_search_calls, r.web_search_calls))
    return Settlement("closeout", reason, outcome, usage, estimated=True,
                      service_tier=r.service_tier)


# Envoy's reset reasons (``response.code_details`` of a reply Envoy made when the
# upstream reset before answering) under which the request never reached the
# provider: no connection, a refused stream, an overflow.
NOT_SENT_RESETS = ("local_connection_failure", "remote_connection_failure",
                   "connection_timeout", "connect_error", "overflow", "overload_manager",
                   "local_refused_stream_reset", "remote_refused_stream_reset")
_RESET_BEFORE_RESPONSE = "upstream_reset_before_response_started"


def request_sent_no_answer(code_details: str) -> bool:
    """Envoy made the response because the upstream connection reset (or closed) after
    the request went out and before any answer: the provider may have processed it."""
    if not code_details.startswith(_RESET_BEFORE_RESPONSE):
        return False
    reason = code_details[len(_RESET_BEFORE_RESPONSE):].strip("{}").split("|")[0]
    return reason not in NOT_SENT_RESETS


def settle(p: Permit, stage: Stage, status: int, reading: Reading | None,
           request_sent_no_answer: bool = False) -> Settlement:
    """The one terminal action for a permit (see the module table).
    ``request_sent_no_answer``: the status is Envoy's, made after an upstream reset
    once the request had gone out (``request_sent_no_answer()``)."""
    if stage is Stage.REQUEST:
        return Settlement("void", "client went away before the request reached the provider")
    if stage is Stage.SENT or reading is None:
        return _at_hold(p, "CANCELLED", "the call ended before any response; the provider "
                        "may have billed it, booked at the hold")
    if status == 504:
        return _at_hold(p, "FAILED", "gateway timeout: the provider may have finished the "
                        "call, booked at the hold")
    if request_sent_no_answer:
        return _at_hold(p, "FAILED", f"upstream reset after the request went out (Envoy "
                        f"answered {status}): the provider may have billed it, booked at "
                        "the hold")
    if status >= 400:
        return Settlement("void", f"provider answered HTTP {status}; nothing billed")
    if stage is Stage.ENDED:
        outcome = "FAILED" if reading.error else "SUCCEEDED"
        why = ("provider usage" if reading.usage is not None
               else "no usage in the response; output estimated from text length")
        return _from_reading(p, reading, outcome, why)
    return _from_reading(p, reading, "PARTIAL", "response broken off; usage seen so far, "
                         "output estimated from text length")
