"""The settlement rule: every call ext_proc sees ends its permit exactly one way."""

from __future__ import annotations

from keel_pdp.mesh.settle import Permit, Stage, settle
from keel_pdp.mesh.usage import Reading
from keel_pdp.pricing import TokenUsage

P = Permit("pmt_x", input_tokens=500, max_tokens=300)
FULL = TokenUsage(480, 100, 0, 120, 0)


def reading(usage: TokenUsage | None = None, partial: TokenUsage | None = None,
            text: int = 0, error: bool = False) -> Reading:
    return Reading(usage, partial, text, text, error, False)


def test_finished_response_with_usage_settles_at_the_provider_usage() -> None:
    s = settle(P, Stage.ENDED, 200, reading(FULL))
    assert (s.kind, s.outcome, s.usage, s.estimated) == ("closeout", "SUCCEEDED", FULL, False)


def test_finished_response_without_usage_estimates_output_from_text() -> None:
    s = settle(P, Stage.ENDED, 200, reading(text=401))
    assert s.usage == TokenUsage(input_tokens=500, output_tokens=101)
    assert s.estimated and s.outcome == "SUCCEEDED"


def test_estimated_output_never_exceeds_the_permit_cap() -> None:
    s = settle(P, Stage.ENDED, 200, reading(text=10_000))
    assert s.usage.output_tokens == 300
    unlimited = Permit("pmt_x", 5, 0)
    assert settle(unlimited, Stage.ENDED, 200, reading(text=10_000)).usage.output_tokens == 2500


def test_error_event_in_a_finished_stream_is_a_failed_closeout() -> None:
    s = settle(P, Stage.ENDED, 200, reading(FULL, error=True))
    assert (s.kind, s.outcome, s.usage) == ("closeout", "FAILED", FULL)


def test_upstream_error_status_voids() -> None:
    for status in (400, 401, 429, 500, 502, 503):
        s = settle(P, Stage.RESPONDING, status, reading())
        assert s.kind == "void" and str(status) in s.reason
        assert settle(P, Stage.ENDED, status, reading(text=50)).kind == "void"


def test_gateway_timeout_books_the_hold() -> None:
    s = settle(P, Stage.RESPONDING, 504, reading())
    assert (s.kind, s.outcome, s.usage) == (
        "closeout", "FAILED", TokenUsage(input_tokens=500, output_tokens=300))


def test_broken_response_settles_what_was_seen_as_partial() -> None:
    s = settle(P, Stage.RESPONDING, 200, reading(text=80))
    assert (s.outcome, s.usage, s.estimated) == (
        "PARTIAL", TokenUsage(input_tokens=500, output_tokens=20), True)
    seen = TokenUsage(900, 800, 50, 1, 0)  # Anthropic message_start
    s = settle(P, Stage.RESPONDING, 200, reading(partial=seen, text=40))
    assert s.usage == TokenUsage(900, 800, 50, 10, 0)
    s = settle(P, Stage.RESPONDING, 200, reading(FULL))  # final usage arrived, then a break
    assert (s.outcome, s.usage, s.estimated) == ("PARTIAL", FULL, False)


def test_client_gone_before_any_response_books_the_hold_as_cancelled() -> None:
    s = settle(P, Stage.SENT, 0, None)
    assert (s.kind, s.outcome, s.usage) == (
        "closeout", "CANCELLED", TokenUsage(input_tokens=500, output_tokens=300))


def test_client_gone_before_the_request_left_voids() -> None:
    assert settle(P, Stage.REQUEST, 0, None).kind == "void"


def test_every_settlement_usage_is_valid_for_closeout() -> None:
    cases = [reading(FULL), reading(text=7), reading(partial=TokenUsage(3, 3, 0, 9, 0), text=1)]
    for stage in Stage:
        for status in (0, 200, 204, 404, 504):
            for r in [*cases, None]:
                s = settle(P, stage, status, r)
                assert s.kind in ("closeout", "void")
                assert not s.usage.problems()
