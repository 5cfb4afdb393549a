"""Caller bindings (``kind: Callers``), compiled: who may name which tenant and workload.

An identity is the SPIFFE ID or certificate CN of a mutual-TLS client, or the
name a bearer token maps to. A binding pattern is an identity whose ``/``
segments may be ``*`` (one whole, non-empty segment): ``spiffe://corp/ns/support/sa/*``.
Every binding that matches an identity applies (their grants add up); what an
identity is granted is worked out once per identity and snapshot, so a check
is a few set look-ups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from keel_pdp.policy.snapshot import WILDCARD, CompiledBudget, bounded_put

GRANTS_CACHE_SIZE = 4096
# The exception methods of the Admin service, judged on the tenant (and the
# workload, where it names one) of the budget counter an exception raises.
# ``request_exception``: ask, and list one's own requests; ``grant_exception``:
# grant, approve, reject and list, and ask as well (asking is part of granting).
EXCEPTION_RPCS = ("grant_exception", "request_exception")
# RPCs that name a tenant and workload (directly, through a permit's, or through
# a budget's); the others (admin, mesh) are granted or not as a whole.
SCOPED_RPCS = ("authorize", "closeout", "void", *EXCEPTION_RPCS)
# An RPC granted by a binding that names another: rpc -> the RPCs that include it.
IMPLIED_BY = {"request_exception": ("grant_exception",)}


def pattern_problem(pattern: str) -> str:
    """Why ``pattern`` cannot be an identity pattern ('' when it can)."""
    if pattern != pattern.strip() or any(ord(ch) < 32 for ch in pattern):
        return "identity patterns have no surrounding spaces or control characters"
    for seg in pattern.split("/"):
        if "*" in seg and seg != "*":
            return (f"'*' stands for one whole '/' segment; {seg!r} mixes it with other "
                    "characters")
    return ""


@dataclass(frozen=True, slots=True)
class CompiledBinding:
    id: str
    patterns: tuple[str, ...]
    tenants: frozenset[str]
    workloads: frozenset[str]
    rpcs: frozenset[str]
    description: str = ""

    def matches(self, identity: str) -> bool:
        return any(pattern_matches(p, identity) for p in self.patterns)

    def has(self, rpc: str) -> bool:
        """Whether this binding grants ``rpc`` for some tenant (named, or implied
        by an RPC it names)."""
        return rpc in self.rpcs or any(r in self.rpcs for r in IMPLIED_BY.get(rpc, ()))

    def grants(self, rpc: str, tenant: str, workload: str) -> bool:
        """For an exception RPC, ``tenant`` is the tenant of the budget counter
        (``*`` for a counter every tenant spends from: only a ``*`` binding
        grants it) and ``workload`` its workload, '' when the counter names none."""
        if not self.has(rpc):
            return False
        if rpc not in SCOPED_RPCS:
            return True
        if not (tenant in self.tenants or WILDCARD in self.tenants):
            return False
        if rpc in EXCEPTION_RPCS and not workload:
            return True
        return workload in self.workloads or WILDCARD in self.workloads

    def words(self) -> str:
        def names(values: frozenset[str]) -> str:
            return ", ".join(sorted(values)) or "(none)"
        return (f"{self.id} (identities {', '.join(self.patterns)}; tenants "
                f"{names(self.tenants)}; workloads {names(self.workloads)}; rpcs "
                f"{', '.join(sorted(self.rpcs))})")


def budget_owner(budget: CompiledBudget | None, scope: Mapping[str, str]) -> tuple[str, str]:
    """The tenant and workload of the budget counter an exception concerns, as
    the exception RPCs are judged on them: the budget's own scope, else the
    value its ``per`` dimension takes in ``scope``. Tenant ``*``: a counter
    every tenant spends from (only a binding with tenants ``*`` may act on
    it); workload '': the counter names no workload. For a budget the policy
    no longer declares, what ``scope`` names (else ``*`` and '')."""
    if budget is None:
        return scope.get("tenant") or WILDCARD, scope.get("workload") or ""
    tenant, workload = budget.scope[0], budget.scope[1]
    if tenant == WILDCARD and 0 in budget.per:
        tenant = scope.get("tenant") or WILDCARD
    if workload == WILDCARD:
        workload = (scope.get("workload") or "") if 1 in budget.per else ""
    return tenant, workload


def pattern_matches(pattern: str, identity: str) -> bool:
    if "*" not in pattern:
        return pattern == identity
    want = pattern.split("/")
    got = identity.split("/")
    if len(want) != len(got):
        return False
    return all(w == g or (w == WILDCARD and g != "") for w, g in zip(want, got, strict=True))


def specificity(pattern: str) -> tuple[int, int]:
    """Higher is more specific: fewer wildcard segments, then more literal characters."""
    segs = pattern.split("/")
    return (-segs.count(WILDCARD), sum(len(s) for s in segs if s != WILDCARD))


@dataclass(frozen=True, slots=True)
class Grants:
    """Everything the bindings matching one identity allow."""

    identity: str
    bindings: tuple[CompiledBinding, ...]

    def allows(self, rpc: str, tenant: str = "", workload: str = "") -> bool:
        return any(b.grants(rpc, tenant, workload) for b in self.bindings)

    def granting(self, rpc: str, tenant: str = "", workload: str = "") -> tuple[str, ...]:
        return tuple(b.id for b in self.bindings if b.grants(rpc, tenant, workload))

    def lacking(self, rpc: str, tenant: str = "", workload: str = "") -> str:
        """Which binding is missing, in words ('' when allowed)."""
        if self.allows(rpc, tenant, workload):
            return ""
        if not self.bindings:
            return f"no Callers binding matches identity {self.identity!r}"
        ids = ", ".join(b.id for b in self.bindings)
        with_rpc = [b for b in self.bindings if b.has(rpc)]
        if not with_rpc:
            return f"its bindings ({ids}) do not grant the {rpc} RPC"
        if rpc not in SCOPED_RPCS:
            return ""  # pragma: no cover - granted above
        if not any(tenant in b.tenants or WILDCARD in b.tenants for b in with_rpc):
            return (f"no binding grants {rpc} for tenant {tenant!r} (its bindings with {rpc}: "
                    f"{', '.join(b.id for b in with_rpc)})")
        return (f"no binding grants {rpc} for tenant {tenant!r} with workload {workload!r} "
                f"(its bindings with {rpc}: {', '.join(b.id for b in with_rpc)})")


@dataclass(frozen=True)
class CallerIndex:
    bindings: tuple[CompiledBinding, ...]
    _exact: dict[str, tuple[CompiledBinding, ...]] = field(default_factory=dict, repr=False)
    # number of '/' segments -> (pattern, binding) with wildcards
    _wild: dict[int, tuple[tuple[str, CompiledBinding], ...]] = field(
        default_factory=dict, repr=False)
    _cache: dict[str, Grants] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        exact: dict[str, list[CompiledBinding]] = {}
        wild: dict[int, list[tuple[str, CompiledBinding]]] = {}
        for b in self.bindings:
            for p in b.patterns:
                if "*" in p:
                    wild.setdefault(p.count("/") + 1, []).append((p, b))
                else:
                    exact.setdefault(p, []).append(b)
        self._exact.update({k: tuple(dict.fromkeys(v)) for k, v in exact.items()})
        self._wild.update({k: tuple(v) for k, v in wild.items()})

    def grants(self, identity: str) -> Grants:
        hit = self._cache.get(identity)
        if hit is not None:
            return hit
        found = list(self._exact.get(identity, ()))
        for pattern, b in self._wild.get(identity.count("/") + 1, ()):
            if b not in found and pattern_matches(pattern, identity):
                found.append(b)
        found.sort(key=lambda b: b.id)
        return bounded_put(self._cache, identity, Grants(identity, tuple(found)),
                           GRANTS_CACHE_SIZE)

    def matching(self, identity: str) -> list[tuple[CompiledBinding, str]]:
        """Each binding matching ``identity`` with the pattern that matched it
        (its most specific one), most specific first."""
        out: list[tuple[CompiledBinding, str]] = []
        for b in self.bindings:
            pats = [p for p in b.patterns if pattern_matches(p, identity)]
            if pats:
                out.append((b, max(pats, key=specificity)))
        out.sort(key=lambda bp: (specificity(bp[1]), bp[0].id), reverse=True)
        return out


RPC_NAMES = ("authorize", "closeout", "void", "admin", "grant_exception", "request_exception",
             "mesh")


def explain_lines(index: CallerIndex | None, identity: str, tenant: str = "",
                  workload: str = "") -> list[str]:
    """Which bindings match ``identity`` (overlaps included) and what they allow."""
    if index is None:
        return ["The bundle has no Callers bindings: with --caller-auth enforce every call "
                "is refused; with open nothing is checked."]
    found = index.matching(identity)
    if not found:
        return [f"No binding matches identity {identity!r}: with --caller-auth enforce it is "
                "refused every RPC."]
    out = [f"Identity {identity!r}: {len(found)} binding{'s' if len(found) > 1 else ''} "
           "match; their grants add up (no binding takes anything away from another)."]
    for b, pattern in found:
        how = ("exact identity" if "*" not in pattern else
               f"wildcard {pattern} ({pattern.count('*')} wildcard segment"
               f"{'s' if pattern.count('*') > 1 else ''})")
        out.append(f"  binding {b.words()} matches as {how}.")
    if len(found) > 1:
        out.append(f"  Overlap: {', '.join(b.id for b, _ in found)} all apply to this identity; "
                   "the most specific match is listed first.")
    if tenant or workload:
        grants = index.grants(identity)
        out.append(f"For tenant {tenant!r} workload {workload!r}:")
        for rpc in RPC_NAMES:
            by = grants.granting(rpc, tenant, workload)
            if by:
                out.append(f"  {rpc}: allowed by {', '.join(by)}.")
            else:
                out.append(f"  {rpc}: refused ({grants.lacking(rpc, tenant, workload)}).")
    return out


def diff_lines(old: CallerIndex | None, new: CallerIndex | None) -> list[str]:
    """Caller bindings added, removed or changed between two bundles, in words."""
    if old is None and new is None:
        return []
    if new is None:
        return ["The Callers bindings were removed: with --caller-auth enforce every call will "
                "be refused."]
    before = {b.id: b for b in (old.bindings if old is not None else ())}
    after = {b.id: b for b in new.bindings}
    lines = [f"Caller binding {bid} removed (was {before[bid].words()})."
             for bid in sorted(before.keys() - after.keys())]
    lines += [f"Caller binding {bid} added: {after[bid].words()}."
              for bid in sorted(after.keys() - before.keys())]
    for bid in sorted(before.keys() & after.keys()):
        a, b = before[bid], after[bid]
        for name in ("patterns", "tenants", "workloads", "rpcs"):
            x, y = set(getattr(a, name)), set(getattr(b, name))
            if x != y:
                what = "identities" if name == "patterns" else name
                parts = ([f"now also {', '.join(sorted(y - x))}"] if y - x else []) + (
                    [f"no longer {', '.join(sorted(x - y))}"] if x - y else [])
                lines.append(f"Caller binding {bid}: {what} {'; '.join(parts)}.")
    return lines
