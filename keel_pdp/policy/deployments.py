"""``kind: Deployments``: which priced model a provider deployment serves.

Azure OpenAI names a *deployment* in the request path, not a model; the
deployment was created by the platform team with one model behind it. The map
lives in the bundle so that it is validated with the prices it points at,
reviewed with ``keel-pdp policy diff`` and swapped atomically with the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel_pdp.policy.model import DeploymentsDoc
from keel_pdp.policy.problems import Problem

if TYPE_CHECKING:
    from pydantic import BaseModel

    from keel_pdp.policy.snapshot import ModelPrice


def compile_deployments(
    docs: list[tuple[str, BaseModel]],
    prices: dict[tuple[str, str], tuple[ModelPrice, ...]],
    problems: list[Problem],
) -> dict[tuple[str, str], str]:
    """(provider, deployment) -> model; appends a Problem for a deployment named
    twice (in any file) or mapped to a model the price tables do not list."""
    out: dict[tuple[str, str], str] = {}
    first: dict[tuple[str, str], str] = {}
    for name, doc in docs:
        if not isinstance(doc, DeploymentsDoc):
            continue
        for i, dep in enumerate(doc.deployments):
            where = f"deployments.{i}"
            key = (doc.provider, dep.name)
            if key in first:
                problems.append(Problem(name, f"{where}.name",
                                        f"deployment {dep.name!r} of provider {doc.provider!r} "
                                        f"is already mapped in {first[key]}"))
                continue
            first[key] = name
            if (doc.provider, dep.model) not in prices:
                priced = sorted(m for p, m in prices if p == doc.provider)
                hint = (f"; priced {doc.provider} models: {', '.join(priced[:8])}"
                        + (" ..." if len(priced) > 8 else "")) if priced else (
                    f"; no price table lists provider {doc.provider!r}")
                problems.append(Problem(name, f"{where}.model",
                                        f"unknown model {dep.model!r}: no price for "
                                        f"{doc.provider}/{dep.model}{hint}"))
                continue
            out[key] = dep.model
    return out


def diff_lines(old: dict[tuple[str, str], str], new: dict[tuple[str, str], str]) -> list[str]:
    """What changed in the deployment maps, in words (``keel-pdp policy diff``)."""
    lines = []
    for p, d in sorted(old.keys() - new.keys()):
        lines.append(f"Deployment {p}/{d} removed (served {old[(p, d)]}); calls to it are now "
                     "priced as a model named after the deployment.")
    for p, d in sorted(new.keys() - old.keys()):
        lines.append(f"Deployment {p}/{d} added: serves {new[(p, d)]}.")
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            lines.append(f"Deployment {key[0]}/{key[1]}: now serves {new[key]} "
                         f"(was {old[key]}).")
    return lines
