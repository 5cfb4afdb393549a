"""Bundle files -> typed documents: YAML parsing, ``apiVersion``/``kind`` dispatch
and pydantic validation, every failure a ``Problem`` naming file and field.

Kept apart from compilation because it is the only part that touches YAML and
pydantic's error format; what the documents mean together is
``keel_pdp.policy.compile``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from keel_pdp.policy.model import (
    BudgetsDoc,
    BundleDoc,
    CallersDoc,
    DeploymentsDoc,
    PriceTableDoc,
    RoutesDoc,
)
from keel_pdp.policy.problems import Problem

_KINDS: dict[str, type[BaseModel]] = {
    "Bundle": BundleDoc,
    "PriceTable": PriceTableDoc,
    "Budgets": BudgetsDoc,
    "Routes": RoutesDoc,
    "Callers": CallersDoc,
    "Deployments": DeploymentsDoc,
}
# libyaml's safe loader when PyYAML was built with it (ten times faster on
# large bundles), the pure-Python one otherwise; both build plain data only.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_FILE_BYTES = 16 * 1024 * 1024

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


def parse_documents(
    files: Iterable[tuple[str, bytes]],
) -> tuple[list[tuple[str, BaseModel]], list[Problem]]:
    """The valid documents of ``files`` (with their file names) and the problems
    of the others."""
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
