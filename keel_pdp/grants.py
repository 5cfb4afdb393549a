"""Exception grants: a time-boxed cap raise on one budget, approved on a named
exception path and checked against that path's limits before it is recorded."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from keel_pdp import events
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import DIMENSION_NAMES, InvalidRequest, check_name
from keel_pdp.errors import GrantForbidden
from keel_pdp.policy.snapshot import PolicySnapshot

__all__ = ["GrantForbidden"]


@dataclass(frozen=True, slots=True)
class GrantRequest:
    exception_path: str
    budget_id: str
    scope: tuple[tuple[str, str], ...]
    amount_micros: int
    duration_seconds: int
    approver: str
    approver_role: str
    justification: str
    grant_id: str = ""


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_id: str
    budget_id: str
    amount_micros: int
    expires_at_ms: int
    created: bool


def validate(snapshot: PolicySnapshot, g: GrantRequest) -> tuple[str, ...]:
    """Check ``g`` against the bundle; returns the budget's split values."""
    rule = snapshot.exception_paths.get(g.exception_path)
    if rule is None:
        raise InvalidRequest(f"exception_path {g.exception_path!r} is not declared in policy "
                             f"{snapshot.policy_revision}")
    budget = snapshot.budget(g.budget_id)
    if budget is None:
        raise InvalidRequest(f"budget_id {g.budget_id!r} is not a budget of policy "
                             f"{snapshot.policy_revision}")
    if budget.exception_path != g.exception_path:
        raise InvalidRequest(
            f"budget {g.budget_id} names exception path {budget.exception_path or '(none)'!r}, "
            f"not {g.exception_path!r}")
    if g.approver_role != rule.approver_role:
        raise GrantForbidden(f"exception path {rule.name} is approved by role "
                             f"{rule.approver_role!r}, not {g.approver_role!r}")
    if not g.approver.strip():
        raise InvalidRequest("approver is required")
    if len(g.justification.strip()) < 10:
        raise InvalidRequest("justification is required (at least 10 characters)")
    if len(g.justification) > 2000 or len(g.approver) > 200:
        raise InvalidRequest("approver or justification is too long")
    if g.amount_micros <= 0:
        raise InvalidRequest("amount_micros must be positive")
    if g.amount_micros > rule.max_overage_micros:
        raise InvalidRequest(
            f"amount_micros {g.amount_micros} exceeds the maximum overage of exception path "
            f"{rule.name} ({rule.max_overage_micros} micro-USD)")
    if not 1 <= g.duration_seconds <= rule.max_duration_seconds:
        raise InvalidRequest(
            f"duration_seconds must be between 1 and {rule.max_duration_seconds} on exception "
            f"path {rule.name}")
    if g.grant_id and (len(g.grant_id) > 64 or not g.grant_id.replace("-", "").isalnum()):
        raise InvalidRequest("grant_id must be 1..64 letters, digits or '-'")
    wanted = [DIMENSION_NAMES[i] for i in budget.per]
    given = dict(g.scope)
    if sorted(given) != sorted(wanted):
        raise InvalidRequest(
            f"scope must give exactly the budget's per-dimensions {wanted or '(none)'}, "
            f"got {sorted(given)}")
    for k, v in given.items():
        check_name(f"scope[{k}]", v)
    return tuple(given[d] for d in wanted)


async def record(store: BudgetStore, snapshot: PolicySnapshot, g: GrantRequest,
                 now_ms: int | None = None) -> GrantResult:
    split = validate(snapshot, g)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    grant_id = g.grant_id or f"grt_{now:012x}{os.urandom(6).hex()}"
    expires = now + g.duration_seconds * 1000
    data = events.grant_data(now, g.budget_id, tuple(split), g.exception_path, g.amount_micros,
                             expires, g.approver, g.approver_role, g.justification,
                             snapshot.policy_revision)
    budget = snapshot.budget(g.budget_id)
    assert budget is not None  # validate() checked it
    out = await store.grant(store.keys.budget_grants(budget, tuple(split)), grant_id,
                            g.amount_micros, expires, now, data)
    return GrantResult(grant_id, g.budget_id, int(out["amt"]), int(out["exp"]),
                       bool(out["created"]))
