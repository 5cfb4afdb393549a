"""The blocking client: ``KeelClient(target).permit(...)`` around a provider call."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as rpc
from keel_pdp.client._core import (
    CLOSEOUT_RETRY,
    RETRYABLE,
    VOID_RETRY,
    FailMode,
    Permit,
    PermitRequest,
    Retry,
    classify_authorize_error,
    closeout_settlement,
    denial,
    error_text,
    log,
    new_request_id,
    unreachable,
    void_settlement,
)

# Reconnect quickly after a sidecar restart: the default backoff (1 s, growing
# to 120 s) would turn a short restart into a long fail-mode episode.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 1000))


class KeelClient:
    """A blocking Keel client. Thread-safe; share one per process.

    ``fail_mode`` (``"closed"`` by default) decides what ``permit()`` does when
    the sidecar cannot be reached within ``timeout`` seconds; ``tenant`` and
    ``workload`` are defaults for every permit.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, tenant: str = "",
                 workload: str = "", fail_mode: FailMode | str = FailMode.CLOSED,
                 timeout: float = 0.5, settle_timeout: float = 5.0,
                 retry: Retry | None = None, credentials: grpc.ChannelCredentials | None = None,
                 channel: grpc.Channel | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        if channel is None:
            channel = (grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
                       if credentials is not None
                       else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
            self._own_channel = True
        else:
            self._own_channel = False
        self.channel = channel
        self._stub = rpc.PolicyDecisionPointStub(channel)
        self.tenant, self.workload = tenant, workload
        self.fail_mode = FailMode(fail_mode)
        self.timeout, self.settle_timeout = timeout, settle_timeout
        self.retry = retry or Retry()
        self.metadata = metadata

    # ------------------------------------------------------------------ permits
    def request(self, model: str, *, tenant: str | None = None, workload: str | None = None,
                provider: str = "", estimated_input_tokens: int = 0,
                max_output_tokens: int = 0, labels: Mapping[str, str] | None = None,
                request_id: str = "", service_tier: str = "",
                max_web_search_calls: int = 0, cache_write_ttl: str = "") -> PermitRequest:
        return PermitRequest(tenant or self.tenant, workload or self.workload, model, provider,
                             estimated_input_tokens, max_output_tokens, dict(labels or {}),
                             request_id, service_tier, max_web_search_calls, cache_write_ttl)

    def authorize(self, req: PermitRequest, *, timeout: float | None = None,
                  fail_mode: FailMode | str | None = None) -> Permit:
        """Authorize once (retrying UNAVAILABLE with the same request id inside the
        deadline). Returns the permit; raises ``PermitDenied`` on DENY,
        ``SidecarUnavailable`` when unreachable under ``fail_mode="closed"``."""
        rid = req.request_id or new_request_id()
        mode = FailMode(fail_mode or self.fail_mode)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        message = req.to_pb(rid)
        last: grpc.RpcError | None = None
        limit = self.retry.attempts
        for attempt in itertools.count():
            if limit is not None and attempt >= limit:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                resp: pb.AuthorizeResponse = self._stub.Authorize(
                    message, timeout=remaining, metadata=self.metadata)
            except grpc.RpcError as err:
                bad = classify_authorize_error(err, rid)
                if bad is not None:
                    raise bad from err
                last = err
                if err.code() not in RETRYABLE:
                    break
                time.sleep(max(0.0, min(self.retry.backoff(attempt),
                                        deadline - time.monotonic())))
                continue
            if resp.decision == pb.DENY:
                raise denial(resp, rid)
            return Permit(req, rid, resp)
        return unreachable(req, rid, mode, last)

    @contextlib.contextmanager
    def permit(self, model: str, *, tenant: str | None = None, workload: str | None = None,
               provider: str = "", estimated_input_tokens: int = 0, max_output_tokens: int = 0,
               labels: Mapping[str, str] | None = None, request_id: str = "",
               service_tier: str = "", max_web_search_calls: int = 0,
               cache_write_ttl: str = "", timeout: float | None = None,
               fail_mode: FailMode | str | None = None) -> Iterator[Permit]:
        """``with keel.permit("gpt-4o-mini", ...) as p:`` make the provider call with
        ``p.model`` / ``p.max_output_tokens``, then ``p.record(response)``. On exit
        the permit is closed out with the recorded usage (priced at the service tier the
        response reports; ``service_tier``: the tier the call asks for;
        ``max_web_search_calls``: the most web searches it may make, -1 for a search tool
        without a bound; ``cache_write_ttl``: "5m" or "1h" when it marks prompt-cache
        breakpoints), or voided if the block raised (or recorded nothing); a
        ``p.meter(stream)`` iteration still under way closes it out when it ends instead."""
        req = self.request(model, tenant=tenant, workload=workload, provider=provider,
                           estimated_input_tokens=estimated_input_tokens,
                           max_output_tokens=max_output_tokens, labels=labels,
                           request_id=request_id, service_tier=service_tier,
                           max_web_search_calls=max_web_search_calls,
                           cache_write_ttl=cache_write_ttl)
        p = self.authorize(req, timeout=timeout, fail_mode=fail_mode)
        try:
            yield p
        except BaseException as exc:
            if not p.defer_end(lambda: self.end(p, None)):
                self.end(p, exc)
            raise
        if not p.defer_end(lambda: self.end(p, None)):
            self.end(p, None)

    def end(self, p: Permit, exc: BaseException | None = None) -> None:
        """Close the permit out with its usage, or void it. Never raises: a failure
        is logged and kept in ``p.settle_error`` (the hold then expires)."""
        if p.ended:
            return
        if p.local:
            if p.usage is not None:
                log.warning("unmetered call (fail open, request %s): %s", p.request_id, p.usage)
            return
        try:
            if p.usage is not None:
                self._closeout(p)
            else:
                why = (f"caller raised {type(exc).__name__}" if exc is not None
                       else p.end_reason or "closed without usage")
                self._void(p, why[:200])
        except Exception as err:
            p.settle_error = err
            log.error("keel: could not end permit %s (%s); its hold expires on its own",
                      p.permit_id, error_text(err))

    def _closeout(self, p: Permit) -> None:
        req = p.closeout_request()
        deadline = time.monotonic() + self.settle_timeout
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            try:
                r: pb.CloseoutResponse = self._stub.Closeout(
                    req, timeout=max(remaining, 0.001), metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT and p.book_at_hold():
                    log.warning("keel: permit %s: usage refused as impossible (%s); "
                                "closed out at its hold", p.permit_id, error_text(err))
                    req = p.closeout_request()
                    continue
                if err.code() not in RETRYABLE or remaining <= 0:
                    raise
            else:
                p.settlement = closeout_settlement(r)
                if r.status not in CLOSEOUT_RETRY or remaining <= 0:
                    return
            time.sleep(max(0.0, min(self.retry.backoff(attempt), deadline - time.monotonic())))

    def _void(self, p: Permit, reason: str) -> None:
        req = pb.VoidRequest(permit_id=p.permit_id, reason=reason)
        deadline = time.monotonic() + self.settle_timeout
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            try:
                r: pb.VoidResponse = self._stub.Void(
                    req, timeout=max(remaining, 0.001), metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or remaining <= 0:
                    raise
            else:
                p.settlement = void_settlement(r)
                if r.status not in VOID_RETRY or remaining <= 0:
                    return
            time.sleep(max(0.0, min(self.retry.backoff(attempt), deadline - time.monotonic())))

    # ------------------------------------------------------------------ wrapper
    def wrap(self, sdk_client: Any, *, tenant: str | None = None, workload: str | None = None,
             labels: Mapping[str, str] | None = None,
             fail_mode: FailMode | str | None = None) -> Any:
        """An ``openai.OpenAI`` or ``anthropic.Anthropic`` client whose ``create`` calls
        go through Keel (see ``keel_pdp.client.wrap``)."""
        from keel_pdp.client.wrap import wrap_sync

        return wrap_sync(self, sdk_client, tenant=tenant, workload=workload, labels=labels,
                         fail_mode=fail_mode)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> KeelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
