"""The caller checks themselves: may this identity call this RPC naming this
tenant and workload, under the serving bundle's ``kind: Callers`` bindings?

``CallerGuard`` answers with a ``Refusal`` (or None), counts refusals and, in
enforce mode, ends the call; it also remembers which tenant and workload own the
permits this process issued, so a Closeout or Void is checked on the permit's
owner without a Redis round trip. The gRPC plumbing around it is
``keel_pdp.server.identity``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc

from keel_pdp import caller
from keel_pdp.budget.store import BudgetStore
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.peers import CallerTokens, bearer_token, cert_identity

log = logging.getLogger("keel_pdp.identity")

MODES = ("open", "enforce", "observe")
OWNER_CACHE_SIZE = 100_000
OWNER_LOOKUP_TIMEOUT_S = 0.25


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call is refused: the gRPC status, a metric reason and the message
    naming the identity and what it lacks."""

    code: grpc.StatusCode
    reason: str  # metric label: no_identity | not_bound | rpc | scope | permit_owner
    message: str
    lacks: str = ""  # the missing binding, in words


class CallerGuard:
    """Judges calls against the serving bundle's Callers bindings."""

    def __init__(self, mode: str, policies: PolicyHolder, metrics: Metrics,
                 store: BudgetStore | None = None, tokens: CallerTokens | None = None,
                 owner_cache_size: int = OWNER_CACHE_SIZE) -> None:
        if mode not in MODES:
            raise ValueError(f"caller auth mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.enforce = mode == "enforce"
        self.policies = policies
        self.metrics = metrics
        self.store = store
        self.tokens = tokens
        # permit id -> "tenant\x1fworkload", for permits this process issued.
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._owner_cache_size = owner_cache_size

    def identify(self, context: Any) -> str:
        who = cert_identity(context)
        if not who and self.tokens is not None:
            who = self.tokens.identity(bearer_token(context))
        return who[:caller.MAX_CALLER_CHARS]

    def judge(self, rpc: str, identity: str, tenant: str = "", workload: str = ""
              ) -> Refusal | None:
        if not identity:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "no_identity",
                           f"{rpc}: no caller identity: present a client certificate (mutual "
                           "TLS) or a bearer token known to this service")
        snap = self.policies.current
        index = snap.callers if snap is not None else None
        if index is None:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, "not_bound",
                           f"{rpc}: caller {identity!r} is not allowed: the policy bundle "
                           "has no Callers bindings")
        grants = index.grants(identity)
        lacks = grants.lacking(rpc, tenant, workload)
        if not lacks:
            return None
        reason = ("not_bound" if not grants.bindings else
                  "rpc" if not any(b.has(rpc) for b in grants.bindings) else "scope")
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, reason,
                       f"{rpc}: caller {identity!r} may not name tenant {tenant[:128]!r} "
                       f"workload {workload[:128]!r}: {lacks}" if tenant else
                       f"{rpc}: caller {identity!r} is not allowed: {lacks}", lacks)

    def has_rpc(self, identity: str, rpc: str) -> bool:
        """Whether any binding of ``identity`` grants ``rpc`` (for some tenant)."""
        snap = self.policies.current
        index = snap.callers if snap is not None else None
        return bool(identity) and index is not None and any(
            b.has(rpc) for b in index.grants(identity).bindings)

    def count(self, rpc: str, refusal: Refusal) -> None:
        self.metrics.child(self.metrics.caller_refusals, rpc, refusal.reason, self.mode).inc()
        log.warning("%s%s", "" if self.enforce else "observe mode, served anyway: ",
                    refusal.message)

    async def refuse(self, rpc: str, refusal: Refusal | None, context: Any) -> None:
        """Count a refusal; in enforce mode end the call with it."""
        if refusal is None:
            return
        self.count(rpc, refusal)
        if self.enforce:
            await context.abort(refusal.code, refusal.message)

    # -------------------------------------------------------- permit owners
    def remember(self, permit_id: str, tenant: str, workload: str) -> None:
        self._owners[permit_id] = f"{tenant}\x1f{workload}"
        if len(self._owners) > self._owner_cache_size:
            self._owners.popitem(last=False)

    async def owner(self, permit_id: str) -> tuple[str, str] | None:
        """The permit's (tenant, workload); None when no record of it exists.
        Raises StoreUnavailable when the permit record cannot be read."""
        hit = self._owners.get(permit_id)
        if hit is not None:
            t, _, w = hit.partition("\x1f")
            return t, w
        if self.store is None:
            return None
        rec = await self.store.permit(permit_id, OWNER_LOOKUP_TIMEOUT_S)
        if rec is None:
            return None
        tenant, workload = rec.meta.get("t"), rec.meta.get("w")
        if not isinstance(tenant, str) or not isinstance(workload, str):
            return None
        return tenant, workload
