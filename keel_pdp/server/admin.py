"""Admin RPCs (exception grants and the exception workflow, live budget status,
forced reload), behind a bearer token or a mutual-TLS client identity.

The token is compared in constant time. With no token configured every admin
call is refused, so an operator cannot expose the API by accident.

An identity may be bound to approver roles (``--admin-identities
finance-bot=finance-owner``): it then decides exceptions as itself and only in
those roles. A token holder, or an identity without roles, names the approver
and the role in the call; the ledger records both.

With ``--caller-auth enforce`` a ``kind: Callers`` binding opens the API too
(``keel_pdp.server.identity``): ``admin`` every method on every tenant, the
exception RPCs only the exception methods and only on the binding's tenants:
each call is judged here on the tenant (and workload, where it names one) of
the budget counter it concerns, and a listing shows only what the caller may
decide, and its own requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from keel_pdp import grants
from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.status import StatusReader, WindowStatus
from keel_pdp.budget.store import StoreUnavailable
from keel_pdp.decision import InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.overage import workflow as wf
from keel_pdp.policy.callers import budget_owner
from keel_pdp.policy.snapshot import PolicySnapshot
from keel_pdp.server.identity import admin_binding, bearer_token, peer_names, token_matches

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name

_STATE_PB = {"pending": pb.EXCEPTION_PENDING, "approved": pb.EXCEPTION_APPROVED,
             "rejected": pb.EXCEPTION_REJECTED, "expired": pb.EXCEPTION_EXPIRED}
_STATE_NAME = {v: k for k, v in _STATE_PB.items()}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: a client certificate identity (with the roles it is bound to,
    None for any), or a token holder (identity ""). ``scoped``: let in by a
    Callers binding's exception RPC, so limited to that binding's tenants."""

    identity: str = ""
    roles: frozenset[str] | None = None
    scoped: bool = False


def parse_identities(entries: tuple[str, ...]) -> dict[str, frozenset[str] | None]:
    """``name`` (any role) or ``name=role`` entries; a name may be listed per role."""
    out: dict[str, frozenset[str] | None] = {}
    for entry in entries:
        name, _, role = entry.partition("=")
        name, role = name.strip(), role.strip()
        if not name:
            continue
        if not role:
            out[name] = None  # any role
        elif name not in out:
            out[name] = frozenset({role})
        else:
            bound = out[name]
            if bound is not None:
                out[name] = bound | {role}
    return out


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, token: Callable[[], str | None],
                 identities: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self._token = token
        self._identities = parse_identities(identities)
        self._desk: wf.ExceptionDesk | None = None
        self._status: StatusReader | None = None

    @property
    def desk(self) -> wf.ExceptionDesk:
        if self._desk is None:
            self._desk = wf.ExceptionDesk(self.engine.store, clock_ms=self.engine.ids.now_ms)
        return self._desk

    def _peer_identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller | None:
        if not self._identities:
            return None
        for n in peer_names(context):
            if n in self._identities:
                return Caller(n, self._identities[n])
        return None

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        peer = self._peer_identity(context)
        if peer is not None:
            return peer
        bound = admin_binding()  # a Callers binding opens it too (--caller-auth enforce)
        if bound is not None and bound.identity:
            return Caller(bound.identity, scoped=bound.scoped)
        expected = self._token()
        token_ok = bool(expected) and token_matches(bearer_token(context), expected or "")
        if not token_ok and bound is not None and bound.refusal:
            # An identified caller whose bindings do not open this method.
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, bound.refusal)
        if not expected:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "admin API disabled: no admin token is configured")
        if not token_ok:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong admin token (authorization: Bearer <token>)")
        return Caller()

    @staticmethod
    async def _within_bindings(caller: Caller, rpc: str, snapshot: PolicySnapshot,
                               budget_id: str, scope: dict[str, str],
                               context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Refuse a binding-scoped caller acting on a budget counter outside the
        tenants (and workloads) its bindings grant ``rpc`` for."""
        if not caller.scoped:
            return
        tenant, workload = budget_owner(snapshot.budget(budget_id), scope)
        index = snapshot.callers
        lacks = ("the policy bundle has no Callers bindings" if index is None else
                 index.grants(caller.identity).lacking(rpc, tenant, workload))
        if lacks:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rpc}: caller {caller.identity!r} may not act on budget {budget_id[:128]!r} "
                f"of tenant {tenant[:128]!r}"
                + (f" workload {workload[:128]!r}" if workload else "") + f": {lacks}")

    @staticmethod
    def _visible(caller: Caller, snapshot: PolicySnapshot
                 ) -> Callable[[wf.ExceptionView], bool] | None:
        """What a binding-scoped caller may list: the requests it may decide
        (``grant_exception`` on their budget's tenant) and its own requests."""
        if not caller.scoped:
            return None
        grants = snapshot.callers.grants(caller.identity) if snapshot.callers else None

        def keep(v: wf.ExceptionView) -> bool:
            if v.requester == caller.identity:
                return True
            return grants is not None and grants.allows(
                "grant_exception", *budget_owner(snapshot.budget(v.budget_id), dict(v.scope)))
        return keep

    @staticmethod
    async def _acting_as(caller: Caller, approver: str, role: str,
                         context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
        """The approver and role a decision is taken as: a client identity acts
        as itself, and only in the roles it is bound to (if any)."""
        if not caller.identity:
            return approver, role
        if approver and approver != caller.identity:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client {caller.identity} decides as itself, not as {approver}")
        if caller.roles is not None:
            if not role and len(caller.roles) == 1:
                role = next(iter(caller.roles))
            if role not in caller.roles:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client {caller.identity} holds role(s) {', '.join(sorted(caller.roles))}, "
                    f"not {role or '(none given)'!r}")
        return caller.identity, role

    async def _snapshot(self, context: grpc.aio.ServicerContext[Any, Any]) -> PolicySnapshot:
        snapshot = self.engine.policies.current
        if snapshot is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no policy loaded")
        assert snapshot is not None
        return snapshot

    async def GrantException(
        self, request: pb.GrantExceptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GrantExceptionResponse:
        caller = await self._authorize(context)
        snapshot = self.engine.policies.current
        if snapshot is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no policy loaded")
        assert snapshot is not None
        await self._within_bindings(caller, "grant_exception", snapshot, request.budget_id,
                                    dict(request.scope), context)
        approver, role = await self._acting_as(caller, request.approver, request.approver_role,
                                               context)
        g = grants.GrantRequest(
            exception_path=request.exception_path, budget_id=request.budget_id,
            scope=tuple(sorted(request.scope.items())), amount_micros=request.amount_micros,
            duration_seconds=request.duration_seconds, approver=approver,
            approver_role=role, justification=request.justification,
            grant_id=request.grant_id)
        try:
            res = await grants.record(self.engine.store, snapshot, g, self.engine.ids.now_ms())
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        except grants.GrantForbidden as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
            raise
        return pb.GrantExceptionResponse(
            grant_id=res.grant_id, budget_id=res.budget_id, amount_micros=res.amount_micros,
            expires_at_ms=res.expires_at_ms, created=res.created)

    async def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReloadPolicyResponse:
        await self._authorize(context)
        holder = self.engine.policies
        changed = await asyncio.to_thread(holder.reload, True)
        # With --workers, every worker reloads (as on SIGHUP), not only this one.
        from keel_pdp.workers import reload_every_worker

        reload_every_worker()
        problems = [str(p) for p in holder.last_error.problems] if holder.last_error else []
        current = holder.current
        return pb.ReloadPolicyResponse(
            changed=changed, policy_revision=current.policy_revision if current else "",
            problems=problems if not changed else [])


    # ------------------------------------------------------ exception workflow
    async def _run(self, context: grpc.aio.ServicerContext[Any, Any], call: Any) -> Any:
        """Await a domain call, turning its failures into gRPC statuses."""
        try:
            return await call
        except wf.NotADenial as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grants.GrantForbidden as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except wf.UnknownException as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except wf.ExceptionConflict as exc:
            code = (grpc.StatusCode.ALREADY_EXISTS if "already requested" in str(exc)
                    else grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(code, str(exc))
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
        raise AssertionError("unreachable: abort raises")

    async def RequestException(
        self, request: pb.RequestExceptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExceptionRecord:
        caller = await self._authorize(context)
        snapshot = await self._snapshot(context)
        await self._within_bindings(caller, "request_exception", snapshot, request.budget_id,
                                    dict(request.scope), context)
        requester = request.requester or caller.identity
        if caller.identity and request.requester and request.requester != caller.identity:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client {caller.identity} asks as itself, not as "
                                f"{request.requester}")
        ask = wf.ExceptionAsk(
            denial_permit_id=request.denial_permit_id, budget_id=request.budget_id,
            scope=tuple(sorted(request.scope.items())), amount_micros=request.amount_micros,
            duration_seconds=request.duration_seconds, justification=request.justification,
            requester=requester)
        view: wf.ExceptionView = await self._run(context, self.desk.request(snapshot, ask))
        return exception_record(view)

    async def _decide(self, action: Literal["approve", "reject"],
                      request: pb.DecideExceptionRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.ExceptionRecord:
        caller = await self._authorize(context)
        snapshot = await self._snapshot(context)
        if caller.scoped:
            found: wf.ExceptionView | None = await self._run(
                context, self.desk.get(request.exception_id))
            if found is not None:  # an unknown id is NOT_FOUND, from decide()
                await self._within_bindings(caller, "grant_exception", snapshot,
                                            found.budget_id, dict(found.scope), context)
        approver, role = await self._acting_as(caller, request.approver, request.approver_role,
                                               context)
        view: wf.ExceptionView = await self._run(context, self.desk.decide(
            snapshot, request.exception_id, action, approver, role, request.note))
        return exception_record(view)

    async def ApproveException(
        self, request: pb.DecideExceptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExceptionRecord:
        return await self._decide("approve", request, context)

    async def RejectException(
        self, request: pb.DecideExceptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExceptionRecord:
        return await self._decide("reject", request, context)

    async def ListExceptions(
        self, request: pb.ListExceptionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListExceptionsResponse:
        caller = await self._authorize(context)
        keep = None
        if caller.scoped:
            keep = self._visible(caller, await self._snapshot(context))
        state = _STATE_NAME.get(request.state, "")
        views: list[wf.ExceptionView] = await self._run(context, self.desk.list(
            state, request.budget_id, request.limit, keep=keep))
        return pb.ListExceptionsResponse(exceptions=[exception_record(v) for v in views])

    # ------------------------------------------------------------ budget status
    async def BudgetStatus(
        self, request: pb.BudgetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BudgetStatusResponse:
        await self._authorize(context)
        snapshot = await self._snapshot(context)
        if self._status is None:
            self._status = StatusReader(self.engine.store)
        rows: list[WindowStatus] = await self._run(context, self._status.status(
            snapshot, request.tenant, request.budget_id))
        as_of = rows[0].as_of_ms if rows else 0
        return pb.BudgetStatusResponse(
            as_of_ms=as_of, policy_revision=snapshot.policy_revision,
            budgets=[window_status(w) for w in rows])


def exception_record(v: wf.ExceptionView, changed: bool | None = None) -> pb.ExceptionRecord:
    return pb.ExceptionRecord(
        exception_id=v.exception_id, state=_STATE_PB[v.state],
        denial_permit_id=v.denial_permit_id, budget_id=v.budget_id, scope=dict(v.scope),
        exception_path=v.exception_path, approver_role=v.approver_role,
        amount_micros=v.amount_micros, duration_seconds=v.duration_seconds,
        justification=v.justification, requester=v.requester,
        requested_at_ms=v.requested_at_ms, pending_until_ms=v.pending_until_ms,
        decided_by=v.decided_by, decided_role=v.decided_role, decided_at_ms=v.decided_at_ms,
        decision_note=v.decision_note, grant_id=v.grant_id,
        grant_expires_at_ms=v.grant_expires_at_ms,
        changed=v.changed if changed is None else changed, denial_seen=v.denial_seen,
        policy_revision=v.policy_revision)


def window_status(w: WindowStatus) -> pb.BudgetWindowStatus:
    b = w.budget
    return pb.BudgetWindowStatus(
        budget_id=b.id, scope=b.scope_text, split=w.split_map, window=str(b.window),
        window_start_ms=w.window_start_ms, window_end_ms=w.window_end_ms,
        mode="enforce" if b.enforce else "observe", cap_micros=b.limit_micros,
        granted_micros=w.granted_micros, effective_cap_micros=w.effective_cap_micros,
        settled_micros=w.settled_micros, held_micros=w.held_micros,
        remaining_micros=w.remaining_micros,
        grants=[pb.ActiveGrant(grant_id=g.grant_id, amount_micros=g.amount_micros,
                               expires_at_ms=g.expires_at_ms) for g in w.grants],
        burn_rate_micros_per_hour=w.burn_rate_micros_per_hour,
        projected_end_micros=w.projected_end_micros, projected_over_cap=w.projected_over_cap,
        exception_path=b.exception_path)


def add_admin(engine: Engine, token: Callable[[], str | None],
              identities: tuple[str, ...] = ()) -> Callable[[Any], list[str]]:
    def add(server: Any) -> list[str]:
        pb_grpc.add_AdminServicer_to_server(AdminServicer(engine, token, identities), server)
        return [ADMIN_SERVICE]
    return add
