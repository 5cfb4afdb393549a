"""Admin RPCs (exception grants, forced reload), behind a bearer token.

The token is compared in constant time. With no token configured every admin
call is refused, so an operator cannot expose the API by accident.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

import grpc

from keel_pdp import grants
from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.store import StoreUnavailable
from keel_pdp.decision import InvalidRequest
from keel_pdp.engine import Engine

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, token: Callable[[], str | None],
                 identities: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self._token = token
        self._identities = frozenset(identities)

    def _peer_identity_allowed(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        if not self._identities:
            return False
        auth = context.auth_context() or {}
        names = [v.decode() for k in ("x509_common_name", "x509_subject_alternative_name")
                 for v in auth.get(k, [])]
        return any(n in self._identities for n in names)

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._peer_identity_allowed(context):
            return
        expected = self._token()
        if not expected:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "admin API disabled: no admin token is configured")
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                presented = value.removeprefix("Bearer ").strip()
        assert expected is not None
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong admin token (authorization: Bearer <token>)")

    async def GrantException(
        self, request: pb.GrantExceptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GrantExceptionResponse:
        await self._authorize(context)
        snapshot = self.engine.policies.current
        if snapshot is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no policy loaded")
        assert snapshot is not None
        g = grants.GrantRequest(
            exception_path=request.exception_path, budget_id=request.budget_id,
            scope=tuple(sorted(request.scope.items())), amount_micros=request.amount_micros,
            duration_seconds=request.duration_seconds, approver=request.approver,
            approver_role=request.approver_role, justification=request.justification,
            grant_id=request.grant_id)
        try:
            res = await grants.record(self.engine.store, snapshot, g)
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
        problems = [str(p) for p in holder.last_error.problems] if holder.last_error else []
        current = holder.current
        return pb.ReloadPolicyResponse(
            changed=changed, policy_revision=current.policy_revision if current else "",
            problems=problems if not changed else [])


def add_admin(engine: Engine, token: Callable[[], str | None],
              identities: tuple[str, ...] = ()) -> Callable[[Any], list[str]]:
    def add(server: Any) -> list[str]:
        pb_grpc.add_AdminServicer_to_server(AdminServicer(engine, token, identities), server)
        return [ADMIN_SERVICE]
    return add
