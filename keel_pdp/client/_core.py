"""What the sync and asyncio clients share: values, errors, request building, retry rules.

No I/O here: ``sync.py`` and ``aio.py`` each drive the same steps over their own
gRPC channel, so both behave the same way by construction.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.client.usage import UsageMeter, read_service_tier, read_usage
from keel_pdp.mesh import settle as rule
from keel_pdp.pricing import TokenUsage, tier_problem

log = logging.getLogger("keel_pdp.client")
T = TypeVar("T")

# gRPC codes after which the same Authorize may be sent again with the same
# request id: the sidecar did not decide (unreachable, restarting, draining, or
# at its concurrency limit). Authorize is idempotent by request id while the
# permit is held, so a retry never holds twice.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# The store did not answer in time, or the permit is a degraded one its issuing
# sidecar has not journaled into the store yet: the same Closeout/Void may be
# sent again (README "Degraded permits": PENDING is answered for up to an hour).
CLOSEOUT_RETRY = frozenset({pb.CLOSEOUT_STORE_UNAVAILABLE, pb.CLOSEOUT_PERMIT_PENDING})
VOID_RETRY = frozenset({pb.VOID_STORE_UNAVAILABLE})


class FailMode(StrEnum):
    """What ``permit()`` does when the sidecar cannot be reached within the deadline.

    The same meaning as a budget's ``fail_mode``: ``closed`` refuses the call
    (``SidecarUnavailable``), ``open`` lets it through unmetered with a local,
    degraded permit (``Permit.local``) and logs it.
    """

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Retry:
    """Retries of one RPC on UNAVAILABLE, all inside the caller's deadline.

    ``attempts`` bounds the Authorize attempts; None (the default) retries for as
    long as the deadline allows, so a sidecar restart shorter than the deadline
    costs a delay, not a fail-mode decision."""

    attempts: int | None = None
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.25
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        growth = self.multiplier ** min(attempt, 64)  # no float overflow on long deadlines
        return float(min(self.max_backoff_s, self.initial_backoff_s * growth))


@dataclass(frozen=True, slots=True)
class BlockReason:
    code: str
    message: str
    budget_id: str = ""
    scope: str = ""
    limit_micros: int = 0
    settled_micros: int = 0
    held_micros: int = 0
    requested_micros: int = 0
    window_start_ms: int = 0
    window_end_ms: int = 0
    exception_path: str = ""
    retry_after_seconds: int = 0
    rule_id: str = ""


def block_reasons(resp: pb.AuthorizeResponse) -> tuple[BlockReason, ...]:
    return tuple(BlockReason(
        pb.ReasonCode.Name(r.code), r.message, r.budget_id, r.scope, r.limit_micros,
        r.settled_micros, r.held_micros, r.requested_micros, r.window_start_ms, r.window_end_ms,
        r.exception_path, r.retry_after_seconds, r.rule_id) for r in resp.block_reasons)


class KeelError(Exception):
    """Base of the client's errors."""


class KeelRequestError(KeelError, ValueError):
    """The sidecar refused the request as invalid (a bug in the caller, not a denial)."""


class PermitDenied(KeelError):
    """Authorize answered DENY; ``reasons`` say which budget or rule, and what to ask for."""

    def __init__(self, message: str, reasons: tuple[BlockReason, ...] = (),
                 request_id: str = "", policy_revision: str = "") -> None:
        super().__init__(message)
        self.reasons = reasons
        self.request_id = request_id
        self.policy_revision = policy_revision

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons)

    @property
    def retry_after_seconds(self) -> int:
        return max((r.retry_after_seconds for r in self.reasons), default=0)

    @property
    def exception_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.exception_path for r in self.reasons if r.exception_path))


class SidecarUnavailable(PermitDenied):
    """The sidecar could not be reached in time and the caller chose ``fail_mode="closed"``."""


def denial(resp: pb.AuthorizeResponse, request_id: str) -> PermitDenied:
    reasons = block_reasons(resp)
    text = "; ".join(f"{r.code}: {r.message}" for r in reasons) or "denied"
    return PermitDenied(f"Keel denied request {request_id}: {text}", reasons, request_id,
                        resp.policy_revision)


@dataclass(frozen=True, slots=True)
class PermitRequest:
    """What ``permit()`` asks for; ``request_id`` is fresh per permit unless given."""

    tenant: str
    workload: str
    model: str
    provider: str = ""
    estimated_input_tokens: int = 0
    max_output_tokens: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    # The provider's processing tier the call asks for (OpenAI's service_tier; "" not set).
    service_tier: str = ""
    # The most web searches the call may make (0 none; -1 a search tool without a bound).
    max_web_search_calls: int = 0
    # The longest prompt-cache lifetime the call marks ("5m", "1h"; "" none).
    cache_write_ttl: str = ""

    def to_pb(self, request_id: str) -> pb.AuthorizeRequest:
        return pb.AuthorizeRequest(
            request_id=request_id, tenant=self.tenant, workload=self.workload, model=self.model,
            provider=self.provider, estimated_input_tokens=self.estimated_input_tokens,
            max_output_tokens=self.max_output_tokens, labels=dict(self.labels),
            service_tier=self.service_tier, max_web_search_calls=self.max_web_search_calls,
            cache_write_ttl=self.cache_write_ttl)


def new_request_id() -> str:
    return "kc-" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Settlement:
    """The sidecar's answer to the permit's Closeout or Void."""

    action: str  # closeout | void
    status: str  # CloseoutStatus or VoidStatus name
    actual_cost_micros: int = 0
    estimated_cost_micros: int = 0
    correction_micros: int = 0
    held_micros: int = 0
    priced_cost_micros: int = 0
    released_micros: int = 0


def closeout_settlement(r: pb.CloseoutResponse) -> Settlement:
    return Settlement("closeout", pb.CloseoutStatus.Name(r.status), r.actual_cost_micros,
                      r.estimated_cost_micros, r.correction_micros, r.held_micros,
                      r.priced_cost_micros)


def void_settlement(r: pb.VoidResponse) -> Settlement:
    return Settlement("void", pb.VoidStatus.Name(r.status), released_micros=r.released_micros)


def usage_pb(u: TokenUsage) -> pb.Usage:
    return pb.Usage(input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
                    cache_write_tokens=u.cache_write_tokens, output_tokens=u.output_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                    cache_write_1h_tokens=u.cache_write_1h_tokens,
                    web_search_calls=u.web_search_calls)


OUTCOMES = {"SUCCEEDED": pb.SUCCEEDED, "FAILED": pb.FAILED, "CANCELLED": pb.CANCELLED,
            "PARTIAL": pb.PARTIAL}


class Permit:
    """One granted Authorize: what the provider call may do, and its usage once known.

    ``model``, ``provider`` and ``max_output_tokens`` are what to send to the
    provider (Keel may have rerouted or capped the request: ``constrained``).
    Record the usage with ``record(response)``, ``record_usage(TokenUsage(...))``
    or by iterating a stream through ``meter()`` / ``ameter()``; the context
    manager closes the permit out with it on exit, or voids it when the block
    raised before any usage was recorded.
    """

    def __init__(self, req: PermitRequest, request_id: str,
                 resp: pb.AuthorizeResponse | None) -> None:
        self.request = req
        self.request_id = request_id
        self.local = resp is None
        if resp is None:  # fail open without the sidecar
            self.decision = "ALLOW"
            self.permit_id = ""
            self.degraded = True
            self.model, self.provider = req.model, req.provider
            self.max_output_tokens = req.max_output_tokens
            self.estimated_cost_micros = 0
            self.expires_at_ms = 0
            self.policy_revision = ""
            self.reasons: tuple[BlockReason, ...] = ()
            self.replayed = False
            self.matched_budgets: tuple[str, ...] = ()
            self.web_search_calls = 0
        else:
            self.decision = pb.Decision.Name(resp.decision)
            self.permit_id = resp.permit_id
            self.degraded = resp.degraded
            c = resp.constraints
            self.model = c.model or req.model
            self.provider = c.provider or req.provider
            self.max_output_tokens = c.max_output_tokens or req.max_output_tokens
            self.estimated_cost_micros = resp.estimated_cost_micros
            self.expires_at_ms = resp.expires_at_ms
            self.policy_revision = resp.policy_revision
            self.reasons = block_reasons(resp)
            self.replayed = resp.replayed
            self.matched_budgets = tuple(resp.matched_budgets)
            # The web searches the hold covers: what a booking at the hold books.
            self.web_search_calls = resp.web_search_calls
        self.usage: TokenUsage | None = None
        self.outcome = "SUCCEEDED"
        # The service tier the provider reported it served the call at ("" not said).
        self.service_tier = ""
        self.provider_cost_micros: int | None = None
        self.settlement: Settlement | None = None
        self.settle_error: BaseException | None = None
        self.estimated = False  # usage estimated by the settlement rule, not reported
        self.end_reason = ""
        self._meter: UsageMeter | None = None
        self._meters = 0  # meter() / ameter() iterations started and not yet finished
        self._after_meters: Callable[[], object] | None = None

    @property
    def constrained(self) -> bool:
        return self.decision == "CONSTRAIN"

    @property
    def ended(self) -> bool:
        return self.settlement is not None

    def record(self, response: object, *, outcome: str = "SUCCEEDED") -> TokenUsage:
        """Read the usage of a finished openai/anthropic response and keep it for closeout.

        A response whose usage the provider wrote unreadably (a count that is a
        string, a float, negative) was still a provider call: it is kept for
        closeout on Keel's estimate (``estimated``), as the wrapper does."""
        usage = read_usage(response)
        if usage is not None:
            return self.record_usage(usage, outcome=outcome,
                                     service_tier=read_service_tier(response))
        meter = UsageMeter()
        meter.feed(response)
        if not meter.unreadable:
            raise ValueError(f"{type(response).__name__} carries no usage to close out with")
        self._meter = meter
        self._meter_end(broken=False)
        assert self.usage is not None
        return self.usage

    def record_usage(self, usage: TokenUsage, *, outcome: str = "SUCCEEDED",
                     provider_cost_micros: int | None = None,
                     service_tier: str = "") -> TokenUsage:
        """Keep ``usage`` (Keel's convention) for the closeout on exit, with the service
        tier the provider reported it served the call at (``service_tier``, "" when it
        did not say: the usage is priced at the rate the permit was held at)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        problems = usage.problems()
        tier_text = tier_problem(service_tier)
        if tier_text is not None:
            problems.append(f"service_tier {str(service_tier)[:40]!r} {tier_text}")
        if problems:
            raise ValueError("; ".join(problems))
        self.usage = usage
        self.outcome = outcome
        self.provider_cost_micros = provider_cost_micros
        self.service_tier = service_tier
        return usage

    def meter(self, stream: Iterable[T]) -> Iterator[T]:
        """Iterate a provider stream, reading its usage as it passes (sync SDKs).

        An iteration still under way when the ``permit()`` block exits holds the
        permit open: it is closed out when the iteration ends (exhausted, broken
        off, closed or garbage-collected), never voided under it."""
        broken = True
        self._meters += 1
        try:
            for item in stream:
                self._meter_item(item)
                yield item
            broken = False
        finally:
            then = self._meters_done(broken)
            if then is not None:
                then()

    async def ameter(self, stream: AsyncIterable[T]) -> AsyncIterator[T]:
        """Iterate a provider stream, reading its usage as it passes (asyncio SDKs);
        held past the ``permit()`` block, as ``meter()``."""
        broken = True
        self._meters += 1
        try:
            async for item in stream:
                self._meter_item(item)
                yield item
            broken = False
        finally:
            then = self._meters_done(broken)
            if then is not None:
                ended = then()
                if inspect.isawaitable(ended):
                    await ended

    def _meters_done(self, broken: bool) -> Callable[[], object] | None:
        """A meter() iteration ended: take its usage; what ends the permit now that
        the block it was deferred by has exited (``defer_end``), if any."""
        self._meters -= 1
        if not self.ended:
            self._meter_end(broken)
        if self._meters > 0:
            return None
        then, self._after_meters = self._after_meters, None
        return then

    def defer_end(self, end: Callable[[], object]) -> bool:
        """The ``permit()`` block exits while a ``meter()`` iteration of this permit's
        stream is under way and no usage was recorded otherwise: the provider is still
        answering, so ending now would void a call it bills. ``end`` ends the permit
        when the last such iteration ends. False: nothing to wait for."""
        if self._meters <= 0 or self.usage is not None:
            return False
        self._after_meters = end
        return True

    def _meter_item(self, item: object) -> None:
        if self._meter is None:
            self._meter = UsageMeter()
        self._meter.feed(item)

    def _meter_end(self, broken: bool) -> None:
        """A metered stream ended (or broke, or the caller stopped reading it): the
        usage to close out with, by the settlement rule of ``keel_pdp.mesh.settle``
        (the provider's usage when it arrived; otherwise what was seen, with the
        output estimated from the generated text, marked PARTIAL when broken)."""
        meter = self._meter or UsageMeter()
        stage = rule.Stage.RESPONDING if broken else rule.Stage.ENDED
        self.apply_rule(rule.settle(self._rule_permit(), stage, 200, meter.reading()))

    def _rule_permit(self) -> rule.Permit:
        return rule.Permit(self.permit_id, self.request.estimated_input_tokens,
                           self.max_output_tokens, self.web_search_calls)

    def apply_rule(self, s: rule.Settlement) -> None:
        """Adopt the settlement rule's verdict: usage to close out with, or nothing (void)."""
        if s.kind == "closeout":
            self.usage, self.outcome, self.estimated = s.usage, s.outcome, s.estimated
            self.service_tier = s.service_tier
        else:
            self.usage = None
        self.end_reason = s.reason

    def book_at_hold(self) -> bool:
        """The sidecar refused the usage as impossible for the permit (README
        "Overruns"): the call was made, so close out at the hold instead, as the mesh
        does (``settle.at_hold_fallback``), rather than leave the hold to expire with
        nothing booked. False when the usage already was the hold."""
        if self.usage is None:
            return False
        s = rule.at_hold_fallback(self._rule_permit(), rule.Settlement(
            "closeout", self.end_reason, self.outcome, self.usage))
        if s is None:
            return False
        self.apply_rule(s)
        self.provider_cost_micros = None
        return True

    def closeout_request(self) -> pb.CloseoutRequest:
        assert self.usage is not None
        req = pb.CloseoutRequest(permit_id=self.permit_id, usage=usage_pb(self.usage),
                                 outcome=OUTCOMES[self.outcome],
                                 service_tier=self.service_tier)
        if self.provider_cost_micros is not None:
            req.provider_cost_micros = self.provider_cost_micros
        return req

    def __repr__(self) -> str:
        return (f"Permit({self.decision} {self.permit_id or '<local>'} model={self.model} "
                f"max_output_tokens={self.max_output_tokens} degraded={self.degraded})")


def classify_authorize_error(err: grpc.RpcError, request_id: str) -> KeelError | None:
    """A gRPC error of Authorize: a KeelRequestError for a bad request; None when
    the sidecar did not decide (the fail mode applies)."""
    code = err.code() if hasattr(err, "code") else None
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        details = err.details() if hasattr(err, "details") else str(err)
        return KeelRequestError(f"Keel refused request {request_id}: {code.name}: {details}")
    return None


def error_text(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code: Any = err.code()
        return f"{getattr(code, 'name', code)}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def unreachable(req: PermitRequest, request_id: str, fail_mode: FailMode,
                err: BaseException | None) -> Permit:
    """The caller's fail mode, applied when no decision came back in time."""
    why = error_text(err) if err is not None else "deadline spent"
    if fail_mode is FailMode.CLOSED:
        raise SidecarUnavailable(
            f"Keel sidecar unreachable for request {request_id} ({why}); fail_mode=closed",
            (BlockReason("SIDECAR_UNAVAILABLE", why),), request_id)
    log.warning("keel sidecar unreachable for request %s (%s): fail_mode=open, the call "
                "goes ahead unmetered", request_id, why)
    return Permit(req, request_id, None)
