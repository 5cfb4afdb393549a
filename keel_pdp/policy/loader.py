"""Load a policy bundle directory, validate all of it, compile a snapshot.

Every problem is reported with the file, the field path and the reason; one
bad file rejects the whole bundle (the caller keeps serving the last good one).
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from keel_pdp.money import MAX_MICROS, parse_usd
from keel_pdp.policy.callers import CallerIndex, CompiledBinding, pattern_problem
from keel_pdp.policy.model import (
    BudgetsDoc,
    BundleDoc,
    CallersDoc,
    PriceSpec,
    PriceTableDoc,
    PriceTier,
    RoutesDoc,
)
from keel_pdp.policy.snapshot import (
    DIMENSIONS,
    CompiledBudget,
    CompiledRoute,
    ExceptionRule,
    ModelPrice,
    PolicySnapshot,
    Settings,
)
from keel_pdp.pricing import Price, parse_price
from keel_pdp.windows import valid_timezone

_KINDS: dict[str, type[BaseModel]] = {
    "Bundle": BundleDoc,
    "PriceTable": PriceTableDoc,
    "Budgets": BudgetsDoc,
    "Routes": RoutesDoc,
    "Callers": CallersDoc,
}
# libyaml's safe loader when PyYAML was built with it (ten times faster on
# large bundles), the pure-Python one otherwise; both build plain data only.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.reason}"


class PolicyError(Exception):
    """A bundle that cannot be served; ``problems`` names every file and field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems[:20]))


def bundle_files(directory: pathlib.Path) -> list[pathlib.Path]:
    if not directory.is_dir():
        raise PolicyError([Problem(str(directory), "", "policy directory does not exist")])
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def content_hash(directory: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in bundle_files(directory):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def _usd_to_micros(text: str) -> int:
    return parse_usd(text, non_negative=True, max_micros=MAX_MICROS)


_UNION_TAG = re.compile(r"^(?:[A-Z]\w*|list\[.*\]|dict\[.*\])$")
_SHAPE_ONLY = ("Input should be a valid list", "Input should be a valid dictionary")


def _loc(err: Any) -> str:
    # Union members show up as path parts ("PriceSpec", "list[PriceSpec]"); a
    # reader wants the YAML path only.
    return ".".join(str(x) for x in err["loc"] if not _UNION_TAG.match(str(x)))


def _validation_problems(name: str, exc: ValidationError) -> list[Problem]:
    errors = exc.errors()
    out: list[Problem] = []
    for err in errors:
        loc = _loc(err)
        # For a union (one price or a list of prices) drop "wrong shape" noise
        # when the other member has a precise complaint at the same place.
        if err["msg"].startswith(_SHAPE_ONLY) and any(
                _loc(o) != loc and _loc(o).startswith(loc) for o in errors):
            continue
        out.append(Problem(name, loc, err["msg"]))
    return out


def _price(spec: PriceSpec | PriceTier) -> Price:
    inp = parse_price(spec.input)
    return Price(
        input=inp,
        output=parse_price(spec.output),
        cached_input=parse_price(spec.cached_input) if spec.cached_input is not None else inp,
        cache_write=parse_price(spec.cache_write) if spec.cache_write is not None else inp,
    )


def price_history(provider: str, model: str,
                  specs: PriceSpec | list[PriceSpec]) -> tuple[ModelPrice, ...]:
    """One model's prices, oldest first (raises ValueError on a bad history).

    Also used by reconciliation, which prices provider exports with the same
    table the sidecars used.
    """
    history = specs if isinstance(specs, list) else [specs]
    dates = [sp.effective_from for sp in history]
    known = [dt for dt in dates if dt is not None]
    if None in dates[1:] or known != sorted(set(known)):
        raise ValueError("a price history needs effective_from on every entry after the "
                         "first, in strictly ascending order")
    compiled = []
    for sp in history:
        eff = 0
        if sp.effective_from is not None:
            d = sp.effective_from
            eff = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)
        tiers = tuple((t.above_input_tokens, _price(t)) for t in sp.tiers)
        compiled.append(ModelPrice(provider, model, _price(sp), sp.max_output_tokens, eff,
                                   tiers))
    return tuple(sorted(compiled, key=lambda mp: mp.effective_from_ms))


def parse_documents(
    files: Iterable[tuple[str, bytes]],
) -> tuple[list[tuple[str, BaseModel]], list[Problem]]:
    docs: list[tuple[str, BaseModel]] = []
    problems: list[Problem] = []
    for name, data in files:
        if len(data) > MAX_FILE_BYTES:
            problems.append(Problem(name, "", f"file is larger than {MAX_FILE_BYTES} bytes"))
            continue
        try:
            raw = yaml.load(data, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            problems.append(Problem(name, "", f"not valid YAML: {exc}"))
            continue
        if not isinstance(raw, dict):
            problems.append(Problem(name, "", "expected a YAML mapping with apiVersion and kind"))
            continue
        kind = raw.get("kind")
        if raw.get("apiVersion") != "keel.pdp/v1":
            problems.append(
                Problem(name, "apiVersion", f"must be 'keel.pdp/v1', got {raw.get('apiVersion')!r}")
            )
            continue
        model = _KINDS.get(kind) if isinstance(kind, str) else None
        if model is None:
            problems.append(
                Problem(name, "kind", f"must be one of {sorted(_KINDS)}, got {kind!r}")
            )
            continue
        try:
            docs.append((name, model.model_validate(raw)))
        except ValidationError as exc:
            problems.extend(_validation_problems(name, exc))
    return docs, problems


def compile_bundle(
    files: list[tuple[str, bytes]], digest: str
) -> PolicySnapshot:
    docs, problems = parse_documents(files)
    bundles = [(n, d) for n, d in docs if isinstance(d, BundleDoc)]
    if not bundles and not any(p.field == "kind" for p in problems):
        problems.append(Problem("<bundle>", "", "no file with kind: Bundle (revision, settings)"))
    for name, _ in bundles[1:]:
        first = bundles[0][0]
        problems.append(Problem(name, "kind", f"a second Bundle document (first in {first})"))
    bundle = bundles[0][1] if bundles else None
    assert bundle is None or isinstance(bundle, BundleDoc)

    exception_paths: dict[str, ExceptionRule] = {}
    for i, e in enumerate(bundle.exception_paths if bundle else []):
        try:
            overage = _usd_to_micros(e.max_overage_usd)
        except ValueError as exc:
            problems.append(Problem(bundles[0][0], f"exception_paths.{i}.max_overage_usd",
                                    str(exc)))
            continue
        if e.name in exception_paths:
            problems.append(Problem(bundles[0][0], f"exception_paths.{i}.name",
                                    f"exception path {e.name!r} declared twice"))
        exception_paths[e.name] = ExceptionRule(e.name, e.approver_role, overage,
                                                e.max_duration_hours * 3600, e.description)

    prices: dict[tuple[str, str], tuple[ModelPrice, ...]] = {}
    price_revisions: list[str] = []
    for name, doc in docs:
        if not isinstance(doc, PriceTableDoc):
            continue
        price_revisions.append(doc.revision)
        for provider, models in doc.providers.items():
            for model_name, specs in models.items():
                key = (provider, model_name)
                where = f"providers.{provider}.{model_name}"
                if key in prices:
                    problems.append(Problem(name, where, "price defined twice"))
                    continue
                try:
                    prices[key] = price_history(provider, model_name, specs)
                except ValueError as exc:
                    problems.append(Problem(name, where, str(exc)))

    budgets: list[CompiledBudget] = []
    seen_ids: dict[str, str] = {}
    specs_by_id: dict[str, tuple[str, str, tuple[str, str, str, str], str]] = {}
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
            limits = ([(lim.window, lim.cap_usd, f"{where}.limits.{j}.cap_usd")
                       for j, lim in enumerate(bspec.limits)] if bspec.limits else
                      [(bspec.window, bspec.cap_usd, f"{where}.cap_usd")])
            if not valid_timezone(bspec.timezone):
                problems.append(
                    Problem(name, f"{where}.timezone",
                            f"unknown or non-whole-hour timezone {bspec.timezone!r}")
                )
                continue
            if bspec.exception_path and bspec.exception_path not in exception_paths:
                problems.append(
                    Problem(name, f"{where}.exception_path",
                            f"exception path {bspec.exception_path!r} is not declared in the "
                            "Bundle's exception_paths")
                )
            if len(set(bspec.per)) != len(bspec.per):
                problems.append(Problem(name, f"{where}.per", "a dimension is listed twice"))
            sc = bspec.scope
            scope = (sc.tenant, sc.workload, sc.model, sc.provider)
            specs_by_id[bspec.id] = (name, where, scope, bspec.parent)
            for window, cap, cap_where in limits:
                assert window is not None
                assert cap is not None
                try:
                    limit = _usd_to_micros(cap)
                except ValueError as exc:
                    problems.append(Problem(name, cap_where, str(exc)))
                    continue
                bid = bspec.id if not bspec.limits else f"{bspec.id}.{window}"
                if bid in seen_ids and bspec.limits:
                    problems.append(Problem(name, cap_where,
                                            f"budget id {bid!r} collides with another budget"))
                    continue
                seen_ids[bid] = name
                budgets.append(
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
    for bid, (name, where, scope, parent) in specs_by_id.items():
        if not parent:
            continue
        if parent not in specs_by_id:
            problems.append(Problem(name, f"{where}.parent", f"parent budget {parent!r} is not "
                                    "defined"))
            continue
        pscope = specs_by_id[parent][2]
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
            cur = specs_by_id[cur][3] if cur in specs_by_id else ""

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
            if rule.mode == "prefer-cheap" and not chain:
                problems.append(Problem(name, f"rules.{i}.downgrade",
                                        "prefer-cheap needs a downgrade chain to choose from"))
            routes.append(
                CompiledRoute(rule.id, (rule.scope.tenant, rule.scope.workload),
                              frozenset(allowed), rule.mode, tuple(chain))
            )

    callers, warnings = _compile_callers(docs, budgets, routes, problems)
    if problems or bundle is None:
        raise PolicyError(problems)

    settings = bundle.settings
    fallback = (
        ModelPrice("*", "*", _price(settings.fallback_price),
                   settings.fallback_price.max_output_tokens,
                   tiers=tuple((t.above_input_tokens, _price(t))
                               for t in settings.fallback_price.tiers))
        if settings.fallback_price
        else None
    )
    return PolicySnapshot(
        revision=bundle.revision,
        content_hash=digest,
        price_revision="+".join(sorted(price_revisions)) or "none",
        settings=Settings(
            hold_ttl_seconds=settings.hold_ttl_seconds,
            min_output_tokens=settings.min_output_tokens,
            allow_constrain=settings.allow_constrain,
            fallback_price=fallback,
            permit_retention_seconds=settings.permit_retention_seconds,
            idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        ),
        prices=prices,
        budgets=tuple(budgets),
        routes=tuple(routes),
        exception_paths=exception_paths,
        files=tuple(n for n, _ in files),
        callers=callers,
        warnings=tuple(warnings),
    )


def _compile_callers(docs: list[tuple[str, BaseModel]], budgets: list[CompiledBudget],
                     routes: list[CompiledRoute], problems: list[Problem]
                     ) -> tuple[CallerIndex | None, list[str]]:
    """The Callers documents' bindings (None when there is none), and warnings."""
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


def load_bundle(directory: pathlib.Path | str) -> PolicySnapshot:
    """Read, validate and compile the bundle in ``directory`` (raises PolicyError)."""
    path = pathlib.Path(directory)
    files: list[tuple[str, bytes]] = []
    for p in bundle_files(path):
        try:
            files.append((p.name, p.read_bytes()))
        except OSError as exc:
            raise PolicyError([Problem(p.name, "", f"cannot read: {exc}")]) from exc
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return compile_bundle(files, digest.hexdigest())
