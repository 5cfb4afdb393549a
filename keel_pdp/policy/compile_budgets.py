"""Budgets documents compiled: one ``CompiledBudget`` per budget and window, with
the checks that need more than one document (unique ids, declared exception
paths, a parent whose scope contains the child's, no parent cycles).

A spec with several ``limits`` becomes one budget per window, ``<id>.<window>``;
they share ``spec_id`` so a parent named by its YAML id covers all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from keel_pdp.policy.compile_prices import usd_to_micros
from keel_pdp.policy.model import BudgetsDoc, BudgetSpec
from keel_pdp.policy.problems import Problem
from keel_pdp.policy.snapshot import DIMENSIONS, CompiledBudget, ExceptionRule
from keel_pdp.windows import valid_timezone

Scope = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class _SpecAt:
    """Where a budget spec was declared, for the parent checks."""

    file: str
    where: str
    scope: Scope
    parent: str


def compile_budgets(docs: list[tuple[str, BaseModel]],
                    exception_paths: dict[str, ExceptionRule],
                    problems: list[Problem]) -> list[CompiledBudget]:
    """Every budget of every Budgets document, in declaration order."""
    budgets: list[CompiledBudget] = []
    seen_ids: dict[str, str] = {}
    specs_by_id: dict[str, _SpecAt] = {}
    for name, doc in docs:
        if not isinstance(doc, BudgetsDoc):
            continue
        for i, bspec in enumerate(doc.budgets):
            where = f"budgets.{i}"
            if bspec.id in seen_ids:
                problems.append(
                    Problem(name, f"{where}.id", f"budget id {bspec.id!r} already defined in "
                            f"{seen_ids[bspec.id]}")
                )
                continue
            seen_ids[bspec.id] = name
            if not _check_spec(name, where, bspec, exception_paths, problems):
                continue
            sc = bspec.scope
            scope = (sc.tenant, sc.workload, sc.model, sc.provider)
            specs_by_id[bspec.id] = _SpecAt(name, where, scope, bspec.parent)
            budgets.extend(_windows(name, where, bspec, scope, seen_ids, problems))
    _check_parents(specs_by_id, problems)
    return budgets


def _check_spec(name: str, where: str, bspec: BudgetSpec,
                exception_paths: dict[str, ExceptionRule], problems: list[Problem]) -> bool:
    """Record what is wrong with the spec on its own; False when it cannot be
    compiled at all (an unusable timezone)."""
    if not valid_timezone(bspec.timezone):
        problems.append(
            Problem(name, f"{where}.timezone",
                    f"unknown or non-whole-hour timezone {bspec.timezone!r}")
        )
        return False
    if bspec.exception_path and bspec.exception_path not in exception_paths:
        problems.append(
            Problem(name, f"{where}.exception_path",
                    f"exception path {bspec.exception_path!r} is not declared in the "
                    "Bundle's exception_paths")
        )
    if len(set(bspec.per)) != len(bspec.per):
        problems.append(Problem(name, f"{where}.per", "a dimension is listed twice"))
    return True


def _windows(name: str, where: str, bspec: BudgetSpec, scope: Scope,
             seen_ids: dict[str, str], problems: list[Problem]) -> list[CompiledBudget]:
    """One budget per window of the spec (its single window, or each of its limits)."""
    limits = ([(lim.window, lim.cap_usd, f"{where}.limits.{j}.cap_usd")
               for j, lim in enumerate(bspec.limits)] if bspec.limits else
              [(bspec.window, bspec.cap_usd, f"{where}.cap_usd")])
    out: list[CompiledBudget] = []
    for window, cap, cap_where in limits:
        assert window is not None
        assert cap is not None
        try:
            limit = usd_to_micros(cap)
        except ValueError as exc:
            problems.append(Problem(name, cap_where, str(exc)))
            continue
        bid = bspec.id if not bspec.limits else f"{bspec.id}.{window}"
        if bid in seen_ids and bspec.limits:
            problems.append(Problem(name, cap_where,
                                    f"budget id {bid!r} collides with another budget"))
            continue
        seen_ids[bid] = name
        out.append(
            CompiledBudget(
                id=bid,
                scope=scope,
                per=tuple(DIMENSIONS.index(d) for d in bspec.per),
                window=window,
                timezone=bspec.timezone,
                limit_micros=limit,
                enforce=bspec.mode == "enforce",
                fail_open=bspec.fail_mode == "open",
                exception_path=bspec.exception_path,
                description=bspec.description,
                thresholds=tuple(sorted(set(bspec.thresholds))),
                parent=bspec.parent,
                spec_id=bspec.id,
            )
        )
    return out


def _check_parents(specs_by_id: dict[str, _SpecAt], problems: list[Problem]) -> None:
    """Each parent exists, contains its child's scope, and no chain loops."""
    for bid, spec in specs_by_id.items():
        name, where, scope, parent = spec.file, spec.where, spec.scope, spec.parent
        if not parent:
            continue
        if parent not in specs_by_id:
            problems.append(Problem(name, f"{where}.parent", f"parent budget {parent!r} is not "
                                    "defined"))
            continue
        pscope = specs_by_id[parent].scope
        if any(pv != "*" and pv != cv for pv, cv in zip(pscope, scope, strict=True)):
            problems.append(Problem(name, f"{where}.parent",
                                    f"scope is not inside the scope of parent {parent!r}"))
        seen = {bid}
        cur = parent
        while cur:
            if cur in seen:
                problems.append(Problem(name, f"{where}.parent", "parent chain has a cycle"))
                break
            seen.add(cur)
            cur = specs_by_id[cur].parent if cur in specs_by_id else ""
