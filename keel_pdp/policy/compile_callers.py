"""Callers documents compiled into a ``CallerIndex``: bad identity patterns and
bindings that grant tenant-scoped RPCs without naming a tenant are problems;
patterns that match every trust domain, names no budget or route uses, and
exception RPCs that the binding's tenants leave with nothing to act on are
warnings (served, but shown by ``policy check`` and logged on load).

A binding without tenants that grants an exception RPC is a warning rather
than a problem: bundles written before those RPCs were scoped by tenant still
load (a bundle refused at start would stop every Authorize too); the binding
simply decides nothing until it names its tenants.
"""

from __future__ import annotations

from pydantic import BaseModel

from keel_pdp.policy.callers import EXCEPTION_RPCS, CallerIndex, CompiledBinding, pattern_problem
from keel_pdp.policy.model import CallerBinding, CallersDoc
from keel_pdp.policy.problems import Problem
from keel_pdp.policy.snapshot import CompiledBudget, CompiledRoute


def compile_callers(docs: list[tuple[str, BaseModel]], budgets: list[CompiledBudget],
                     routes: list[CompiledRoute], problems: list[Problem]
                     ) -> tuple[CallerIndex | None, list[str]]:
    """The Callers documents' bindings (None when there is none), and warnings
    (patterns matching every trust domain, tenants and workloads no budget or
    route names)."""
    known_tenants = {b.scope[0] for b in budgets} | {r.scope[0] for r in routes}
    known_workloads = {b.scope[1] for b in budgets} | {r.scope[1] for r in routes}
    compiled: list[CompiledBinding] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    found = False
    for name, doc in docs:
        if not isinstance(doc, CallersDoc):
            continue
        found = True
        for i, spec in enumerate(doc.bindings):
            where = f"bindings.{i}"
            if spec.id in seen:
                problems.append(Problem(name, f"{where}.id", f"binding id {spec.id!r} already "
                                        f"defined in {seen[spec.id]}"))
                continue
            seen[spec.id] = name
            bad = False
            for j, pattern in enumerate(spec.identities):
                why = pattern_problem(pattern)
                if why:
                    problems.append(Problem(name, f"{where}.identities.{j}", why))
                    bad = True
                elif pattern == "*" or pattern.split("/")[:3] == ["spiffe:", "", "*"]:
                    warnings.append(f"{name}: {where}.identities.{j}: {pattern!r} matches "
                                    "identities of every trust domain")
            scoped = {"authorize", "closeout", "void"} & set(spec.rpcs)
            if scoped and not spec.tenants:
                problems.append(Problem(name, f"{where}.tenants", "a binding granting "
                                        f"{', '.join(sorted(scoped))} names at least one "
                                        "tenant ('*' for any)"))
                bad = True
            if bad:
                continue
            warnings.extend(_exception_warnings(name, where, spec))
            for j, t in enumerate(spec.tenants):
                if t != "*" and t not in known_tenants:
                    warnings.append(f"{name}: {where}.tenants.{j}: tenant {t!r} is not named "
                                    "by any budget or routing rule")
            for j, w in enumerate(spec.workloads):
                if w != "*" and w not in known_workloads:
                    warnings.append(f"{name}: {where}.workloads.{j}: workload {w!r} is not "
                                    "named by any budget or routing rule")
            compiled.append(CompiledBinding(
                spec.id, tuple(spec.identities), frozenset(spec.tenants),
                frozenset(spec.workloads), frozenset(spec.rpcs), spec.description))
    return (CallerIndex(tuple(compiled)) if found else None), warnings


def _exception_warnings(name: str, where: str, spec: CallerBinding) -> list[str]:
    """Exception RPCs act on the binding's tenants only; ``admin`` on every tenant."""
    out: list[str] = []
    exc = [r for r in EXCEPTION_RPCS if r in spec.rpcs]
    if exc and not spec.tenants:
        out.append(f"{name}: {where}.tenants: binding {spec.id!r} grants {', '.join(exc)} "
                   "but names no tenant: it may ask for or decide no exception (exception "
                   "methods act on the binding's tenants only; tenants: ['*'] for an "
                   "approver of every tenant)")
    if "admin" in spec.rpcs and spec.tenants and "*" not in spec.tenants:
        out.append(f"{name}: {where}.rpcs: binding {spec.id!r} grants admin, every Admin "
                   "method on every tenant's budgets: its tenants do not limit it (grant "
                   "grant_exception or request_exception to act on exceptions of its tenants "
                   "only)")
    return out
