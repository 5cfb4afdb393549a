"""A bundle's documents, validated together and compiled into a ``PolicySnapshot``.

``compile_bundle`` runs named steps in a fixed order (documents, the Bundle,
exception paths, prices, budgets, routes, callers, deployments); each step appends what is
wrong to one problem list and compiles what it can, so a single run reports
every problem of every file. Only a bundle with no problem at all becomes a
snapshot: one bad file rejects the whole bundle.
"""

from __future__ import annotations

from pydantic import BaseModel

from keel_pdp.policy.compile_budgets import compile_budgets
from keel_pdp.policy.compile_callers import compile_callers
from keel_pdp.policy.compile_prices import Prices, compile_prices, model_price, usd_to_micros
from keel_pdp.policy.deployments import compile_deployments
from keel_pdp.policy.documents import parse_documents
from keel_pdp.policy.model import BundleDoc, BundleSettings, RouteRule, RoutesDoc
from keel_pdp.policy.problems import PolicyError, Problem
from keel_pdp.policy.snapshot import (
    CompiledRoute,
    ExceptionRule,
    PolicySnapshot,
    Settings,
)


def compile_bundle(
    files: list[tuple[str, bytes]], digest: str
) -> PolicySnapshot:
    """Validate and compile ``files`` (name, content) into a snapshot identified by
    ``digest``; raises PolicyError listing every problem found."""
    docs, problems = parse_documents(files)
    bundle_file, bundle = the_bundle(docs, problems)
    exception_paths = compile_exception_paths(bundle_file, bundle, problems)
    price_warnings: list[str] = []
    prices, price_revisions = compile_prices(docs, problems, price_warnings)
    budgets = compile_budgets(docs, exception_paths, problems)
    routes = compile_routes(docs, prices, problems)
    callers, warnings = compile_callers(docs, budgets, routes, problems)
    warnings = [*price_warnings, *warnings]
    deployments = compile_deployments(docs, prices, problems)
    if problems or bundle is None:
        raise PolicyError(problems)
    return PolicySnapshot(
        revision=bundle.revision,
        content_hash=digest,
        price_revision="+".join(sorted(price_revisions)) or "none",
        settings=compile_settings(bundle.settings),
        prices=prices,
        budgets=tuple(budgets),
        routes=tuple(routes),
        exception_paths=exception_paths,
        files=tuple(n for n, _ in files),
        callers=callers,
        warnings=tuple(warnings),
        deployments=deployments,
    )


def the_bundle(docs: list[tuple[str, BaseModel]], problems: list[Problem]
               ) -> tuple[str, BundleDoc | None]:
    """The one Bundle document and its file (a missing or second one is a problem)."""
    bundles = [(n, d) for n, d in docs if isinstance(d, BundleDoc)]
    if not bundles and not any(p.field == "kind" for p in problems):
        problems.append(Problem("<bundle>", "", "no file with kind: Bundle (revision, settings)"))
    for name, _ in bundles[1:]:
        first = bundles[0][0]
        problems.append(Problem(name, "kind", f"a second Bundle document (first in {first})"))
    if not bundles:
        return "", None
    name, bundle = bundles[0]
    assert isinstance(bundle, BundleDoc)
    return name, bundle


def compile_exception_paths(bundle_file: str, bundle: BundleDoc | None,
                            problems: list[Problem]) -> dict[str, ExceptionRule]:
    """The Bundle's exception paths by name (names must be unique)."""
    exception_paths: dict[str, ExceptionRule] = {}
    for i, e in enumerate(bundle.exception_paths if bundle else []):
        try:
            overage = usd_to_micros(e.max_overage_usd)
        except ValueError as exc:
            problems.append(Problem(bundle_file, f"exception_paths.{i}.max_overage_usd",
                                    str(exc)))
            continue
        if e.name in exception_paths:
            problems.append(Problem(bundle_file, f"exception_paths.{i}.name",
                                    f"exception path {e.name!r} declared twice"))
        exception_paths[e.name] = ExceptionRule(e.name, e.approver_role, overage,
                                                e.max_duration_hours * 3600, e.description)
    return exception_paths


def compile_routes(docs: list[tuple[str, BaseModel]], prices: Prices,
                   problems: list[Problem]) -> list[CompiledRoute]:
    """Every routing rule of every Routes document, in declaration order."""
    routes: list[CompiledRoute] = []
    route_ids: set[str] = set()
    for name, doc in docs:
        if not isinstance(doc, RoutesDoc):
            continue
        for i, rule in enumerate(doc.rules):
            if rule.id in route_ids:
                problems.append(Problem(name, f"rules.{i}.id", f"rule id {rule.id!r} repeated"))
                continue
            route_ids.add(rule.id)
            if rule.scope.model != "*" or rule.scope.provider != "*":
                problems.append(
                    Problem(name, f"rules.{i}.scope",
                            "route scopes name tenant and workload only")
                )
                continue
            allowed = _allowed_models(name, i, rule, problems)
            chain = _downgrade_chain(name, i, rule, prices, problems)
            if rule.mode == "prefer-cheap" and not chain:
                problems.append(Problem(name, f"rules.{i}.downgrade",
                                        "prefer-cheap needs a downgrade chain to choose from"))
            routes.append(
                CompiledRoute(rule.id, (rule.scope.tenant, rule.scope.workload),
                              frozenset(allowed), rule.mode, tuple(chain))
            )
    return routes


def _allowed_models(name: str, i: int, rule: RouteRule, problems: list[Problem]
                    ) -> set[tuple[str, str]]:
    allowed: set[tuple[str, str]] = set()
    for j, entry in enumerate(rule.allowed_models):
        provider, sep, model_name = entry.partition("/")
        if not sep or not provider or not model_name:
            problems.append(
                Problem(name, f"rules.{i}.allowed_models.{j}",
                        f"{entry!r} must be 'provider/model' or 'provider/*'")
            )
            continue
        allowed.add((provider, model_name))
    return allowed


def _downgrade_chain(name: str, i: int, rule: RouteRule, prices: Prices,
                     problems: list[Problem]) -> list[tuple[str, str]]:
    chain: list[tuple[str, str]] = []
    for j, entry in enumerate(rule.downgrade):
        provider, sep, model_name = entry.partition("/")
        if not sep or not provider or not model_name or model_name == "*":
            problems.append(Problem(name, f"rules.{i}.downgrade.{j}",
                                    f"{entry!r} must be 'provider/model'"))
            continue
        if (provider, model_name) not in prices:
            problems.append(Problem(name, f"rules.{i}.downgrade.{j}",
                                    f"{entry!r} has no price in the bundle"))
            continue
        chain.append((provider, model_name))
    return chain


def compile_settings(settings: BundleSettings) -> Settings:
    """The Bundle's settings, with its fallback price (if any) compiled."""
    fallback = (model_price("*", "*", settings.fallback_price)
                if settings.fallback_price else None)
    return Settings(
        hold_ttl_seconds=settings.hold_ttl_seconds,
        min_output_tokens=settings.min_output_tokens,
        allow_constrain=settings.allow_constrain,
        fallback_price=fallback,
        permit_retention_seconds=settings.permit_retention_seconds,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        auto_service_tier=settings.auto_service_tier,
        web_search_hold_calls=settings.web_search_hold_calls,
    )

