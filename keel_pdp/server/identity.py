"""Who is calling, and may they name this tenant and workload?

A caller is identified by its mutual-TLS client certificate (its SPIFFE ID,
the one ``spiffe://`` URI SAN, or else its subject CN) or by a bearer token
that the ``--caller-tokens-file`` maps to an identity; the admin API reads
peer names and bearer tokens through the same functions. The ``kind: Callers``
bindings of the serving policy bundle say which tenants, workloads and RPCs
each identity may use.

The mode (``--caller-auth``) decides what a missing binding does: ``open``
checks nothing (a sidecar on loopback: the application's own business),
``enforce`` refuses with PERMISSION_DENIED naming the identity and what it
lacks (UNAUTHENTICATED when there is no identity at all), ``observe`` logs and
counts what enforce would refuse and serves the call.

Authorize is checked on the tenant and workload it names. Closeout and Void
are checked on the permit's own tenant and workload: remembered when this
process answered the Authorize, otherwise read from the permit record in
Redis (one extra round trip). Envoy's ext_authz is checked in
``keel_pdp.mesh.authz`` through ``envoy_refusal``: a proxy bound to the
``mesh`` RPC may vouch for the principal Envoy verified (``source.principal``);
otherwise the proxy's own identity is the caller.

Everything happens in a gRPC server interceptor, so the servicers are
untouched and open mode costs nothing (the interceptor is not installed).
This module is that interceptor and its wiring; reading the identity is
``keel_pdp.server.peers`` and judging it ``keel_pdp.server.caller_guard`` (both
re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from keel_pdp import caller
from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.caller_guard import (
    MODES,
    OWNER_CACHE_SIZE,
    OWNER_LOOKUP_TIMEOUT_S,
    CallerGuard,
    Refusal,
)
from keel_pdp.server.peers import (
    TOKEN_RECHECK_S,
    CallerTokens,
    bearer_token,
    cert_identity,
    peer_names,
    token_matches,
)
from keel_pdp.settings import ServeSettings

__all__ = ["ADMIN", "AUTHZ_CHECK", "EXCEPTION_METHODS", "EXT_PROC", "MODES", "OWNER_CACHE_SIZE",
           "OWNER_LOOKUP_TIMEOUT_S", "TOKEN_RECHECK_S", "AdminBinding", "CallerGuard",
           "CallerInterceptor",
           "CallerTokens", "Refusal", "admin_binding", "bearer_token", "caller_interceptors",
           "cert_identity", "envoy_refusal", "peer_names", "token_matches"]

log = logging.getLogger("keel_pdp.identity")

_PDP = "/keel.pdp.v1.PolicyDecisionPoint/"
AUTHZ_CHECK = "/envoy.service.auth.v3.Authorization/Check"
EXT_PROC = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


# ----------------------------------------------------------------- admin API
ADMIN = "/keel.pdp.v1.Admin/"
# The Admin methods a binding's exception RPCs open; every other Admin method
# (and any added later) needs ``admin``.
EXCEPTION_METHODS: dict[str, str] = {
    "RequestException": "request_exception", "ListExceptions": "request_exception",
    "GrantException": "grant_exception", "ApproveException": "grant_exception",
    "RejectException": "grant_exception"}


@dataclass(frozen=True, slots=True)
class AdminBinding:
    """What the caller's Callers bindings say about the admin method being served.

    ``identity``: the caller, when a binding opens the method; ``scoped``: it was
    opened by an exception RPC, so the servicer judges each call on the tenant
    of the budget it concerns (``admin`` opens every method on every tenant);
    ``refusal``: why the caller's bindings do not open it ('' when they do)."""

    identity: str = ""
    scoped: bool = False
    refusal: str = ""


_ADMIN: ContextVar[AdminBinding | None] = ContextVar("keel_pdp_admin_caller", default=None)


def admin_binding() -> AdminBinding | None:
    """The Callers bindings' word on the admin method being served (enforce
    mode; None when nothing was judged). See ``CallerInterceptor._admin``."""
    return _ADMIN.get()


# -------------------------------------------------------------- the Envoy path
@dataclass(frozen=True, slots=True)
class _EnvoyCall:
    guard: CallerGuard
    peer: str


_ENVOY: ContextVar[_EnvoyCall | None] = ContextVar("keel_pdp_envoy_caller", default=None)


def envoy_refusal(check: Any, tenant: str, workload: str) -> str:
    """For ext_authz: '' when the call may go on, else the message to deny it
    with (enforce mode). Sets the caller recorded on the permit's events.

    ``check`` is Envoy's CheckRequest; outside an identity-checking server
    (open mode, tests of the mesh alone) nothing is checked."""
    call = _ENVOY.get()
    if call is None:
        return ""
    guard = call.guard
    principal = str(check.attributes.source.principal)[:caller.MAX_CALLER_CHARS]
    who = call.peer
    snap = guard.policies.current
    index = snap.callers if snap is not None else None
    if principal and call.peer and index is not None and index.grants(call.peer).allows("mesh"):
        who = principal  # a trusted proxy speaks for the principal it verified
    caller.CALLER.set(who)
    if not tenant or not workload:
        return ""  # refused as a bad request: the header naming who pays is missing
    refusal = guard.judge("authorize", who, tenant, workload)
    if refusal is None:
        return ""
    guard.count("envoy_check", refusal)
    return refusal.message if guard.enforce else ""


# -------------------------------------------------------------- interceptor
Behavior = Callable[[Any, Any], Awaitable[Any]]


async def _cannot_check(request: Any, context: Any) -> Any:
    await context.abort(grpc.StatusCode.INTERNAL, "caller identity checks could not be "
                        "applied to this method; refusing rather than serving it unchecked")


class CallerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks every PDP and Envoy call against the Callers bindings."""

    def __init__(self, guard: CallerGuard) -> None:
        self.guard = guard
        self._wrapped: dict[str, Any] = {}
        self._makers: dict[str, Callable[[Any], Any]] = {
            _PDP + "Authorize": self._authorize,
            _PDP + "Closeout": lambda b: self._settle("closeout", b),
            _PDP + "Void": lambda b: self._settle("void", b),
            AUTHZ_CHECK: self._envoy_check,
        }

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = details.method
        found = self._wrapped.get(method)
        if found is not None or handler is None:
            return found or handler
        if method in self._makers and handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._makers[method](handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif method == EXT_PROC and handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._ext_proc(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif method.startswith(ADMIN) and handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._admin(method.removeprefix(ADMIN), handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif method in self._makers or method == EXT_PROC:
            # Not the servicer's own handler (another interceptor inside this one):
            # refuse rather than serve the call unchecked.
            log.error("caller identity checks cannot wrap %s: refusing its calls", method)
            wrapped = grpc.unary_unary_rpc_method_handler(_cannot_check)
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _authorize(self, behavior: Behavior) -> Behavior:
        guard = self.guard

        async def authorize(request: Any, context: Any) -> Any:
            who = guard.identify(context)
            if request.tenant and request.workload:
                await guard.refuse("authorize", guard.judge(
                    "authorize", who, request.tenant, request.workload), context)
            # else: INVALID_ARGUMENT naming the empty field, from the servicer (no hold)
            caller.CALLER.set(who)
            resp = await behavior(request, context)
            if resp.permit_id and resp.decision != pb.DENY:
                guard.remember(resp.permit_id, request.tenant, request.workload)
            return resp
        return authorize

    def _settle(self, rpc: str, behavior: Behavior) -> Behavior:
        guard = self.guard
        unavailable: Callable[[], Any] = (
            (lambda: pb.CloseoutResponse(status=pb.CLOSEOUT_STORE_UNAVAILABLE))
            if rpc == "closeout" else
            (lambda: pb.VoidResponse(status=pb.VOID_STORE_UNAVAILABLE)))

        async def settle(request: Any, context: Any) -> Any:
            who = guard.identify(context)
            # An identity without the RPC at all is refused before any look-up.
            if not guard.has_rpc(who, rpc):
                await guard.refuse(rpc, guard.judge(rpc, who), context)
            else:
                try:
                    owner = await guard.owner(request.permit_id)
                except StoreUnavailable:
                    if guard.enforce:
                        return unavailable()  # the answer the call itself would get
                    owner = None
                refusal = guard.judge(rpc, who, *owner) if owner is not None else None
                if refusal is not None and owner is not None:
                    refusal = Refusal(
                        refusal.code, "permit_owner",
                        f"{rpc}: caller {who!r} may not settle permit "
                        f"{request.permit_id[:64]!r} of tenant {owner[0]!r} workload "
                        f"{owner[1]!r}: {refusal.lacks}", refusal.lacks)
                await guard.refuse(rpc, refusal, context)
            caller.CALLER.set(who)
            return await behavior(request, context)
        return settle

    def _admin(self, name: str, behavior: Behavior) -> Behavior:
        """Admin keeps its own gate (token, --admin-identities); in enforce mode a
        Callers binding granting ``admin`` (any admin method, any tenant) opens
        it as well, and one granting ``grant_exception`` or ``request_exception``
        opens the exception methods of that RPC for the binding's tenants (the
        servicer checks each call's budget against them)."""
        guard = self.guard
        rpc = EXCEPTION_METHODS.get(name, "admin")

        async def admin(request: Any, context: Any) -> Any:
            if guard.enforce:
                who = guard.identify(context)
                if who:
                    refusal = guard.judge("admin", who)
                    if refusal is None:
                        _ADMIN.set(AdminBinding(who))
                    elif rpc != "admin" and guard.has_rpc(who, rpc):
                        _ADMIN.set(AdminBinding(who, scoped=True))
                    else:
                        # Bindings that match but lack the RPC: say so (unless the
                        # admin token opens the call); a caller no binding matches
                        # gets the token's own answer.
                        refusal = refusal if rpc == "admin" else guard.judge(rpc, who)
                        if refusal is not None and refusal.reason == "rpc":
                            _ADMIN.set(AdminBinding(refusal=refusal.message))
            return await behavior(request, context)
        return admin

    def _envoy_check(self, behavior: Behavior) -> Behavior:
        guard = self.guard

        async def check(request: Any, context: Any) -> Any:
            _ENVOY.set(_EnvoyCall(guard, guard.identify(context)))
            return await behavior(request, context)
        return check

    def _ext_proc(self, behavior: Callable[[Any, Any], AsyncIterator[Any]]
                  ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        guard = self.guard

        async def process(requests: Any, context: Any) -> AsyncIterator[Any]:
            who = guard.identify(context)
            # ext_proc settles the permits its own Envoy's checks were issued:
            # the proxy needs the mesh RPC, or closeout rights of its own.
            refusal = guard.judge("mesh", who)
            if refusal is not None and guard.has_rpc(who, "closeout"):
                refusal = None
            await guard.refuse("ext_proc", refusal, context)
            caller.CALLER.set(who)
            async for resp in behavior(requests, context):
                yield resp
        return process


# ------------------------------------------------------------------- wiring
def caller_interceptors(settings: ServeSettings, policies: PolicyHolder, metrics: Metrics,
                        store: BudgetStore) -> list[Any]:
    """The interceptors ``serve`` installs for its caller-auth mode ([] when open).

    Raises ValueError when the mode checks identities but the sidecar has no
    way to learn one (neither mutual TLS nor a caller tokens file)."""
    policies.listeners.append(_log_warnings)
    mode = settings.caller_auth_mode
    if mode == "open":
        log.info("caller identities: open (not checked): any caller may name any tenant")
        return []
    if not settings.tls_client_ca and not settings.caller_tokens_file:
        raise ValueError(
            f"--caller-auth {mode} (the default beyond loopback) needs a way to identify "
            "callers: mutual TLS (--tls-client-ca) and/or --caller-tokens-file; or set "
            "--caller-auth open if every caller may spend from every budget")
    tokens = CallerTokens(settings.caller_tokens_file) if settings.caller_tokens_file else None
    log.info("caller identities: %s, from %s", mode, " and ".join(
        x for x in ("client certificates" if settings.tls_client_ca else "",
                    "bearer tokens" if tokens else "") if x))
    return [CallerInterceptor(CallerGuard(mode, policies, metrics, store, tokens))]


def _log_warnings(snapshot: object, error: object) -> None:
    for warning in getattr(snapshot, "warnings", ()):
        log.warning("policy bundle: %s", warning)
