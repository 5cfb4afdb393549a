"""The translation file: provider workspace / project / API key to internal
tenant and workload, and each workload's engineering owner and cost center.

The provider bills projects (OpenAI) or workspaces (Anthropic); the gateway
records tenants and workloads. This file is the agreed vocabulary between the
two, versioned next to the memos it produced.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from keel_pdp.reconcile.adapters.common import load_yaml_model
from keel_pdp.reconcile.errors import InputError

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccountMap(_Strict):
    provider: str = Field(min_length=1, max_length=64)
    account: str = Field(min_length=1, max_length=128)  # project id / workspace id
    names: list[str] = []  # display names used by console exports
    api_keys: list[str] = []  # narrows the entry to these keys (ids or names)
    tenant: Name
    workload: Name


class WorkloadOwner(_Strict):
    tenant: Name
    workload: Name
    engineering_owner: Name
    cost_center: str = ""


class MappingDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"] = "keel.pdp/v1"
    kind: Literal["ReconcileMapping"] = "ReconcileMapping"
    finance_owner: str = ""
    ai_program_lead: str = ""
    accounts: list[AccountMap] = Field(min_length=1)
    workloads: list[WorkloadOwner] = Field(min_length=1)
    models: dict[str, dict[str, str]] = {}

    @model_validator(mode="after")
    def _consistent(self) -> MappingDoc:
        owned = {(w.tenant, w.workload) for w in self.workloads}
        seen: set[tuple[str, str]] = set()
        for w in self.workloads:
            if (w.tenant, w.workload) in seen:
                raise ValueError(f"workload {w.tenant}/{w.workload} is listed twice")
            seen.add((w.tenant, w.workload))
        for a in self.accounts:
            if (a.tenant, a.workload) not in owned:
                raise ValueError(f"account {a.provider}/{a.account} maps to "
                                 f"{a.tenant}/{a.workload}, which has no entry under "
                                 "workloads (every workload needs an engineering owner)")
        return self


Workload = tuple[str, str]


@dataclass(frozen=True)
class Mapping:
    doc: MappingDoc
    source: str = ""

    def aliases(self, provider: str) -> dict[str, str]:
        return dict(self.doc.models.get(provider, {}))

    def _entries(self, provider: str) -> list[AccountMap]:
        return [a for a in self.doc.accounts if a.provider == provider]

    def canonical_account(self, provider: str, raw: str) -> str:
        """The account id for an id or a console display name."""
        entries = self._entries(provider)
        for a in entries:
            if a.account == raw:
                return a.account
        folded = raw.casefold()
        for a in entries:
            if any(n.casefold() == folded for n in a.names):
                return a.account
        return raw

    def is_mapped(self, provider: str, account: str) -> bool:
        return any(a.account == account for a in self._entries(provider))

    def workloads_for(self, provider: str, account: str) -> list[Workload]:
        out: list[Workload] = []
        for a in self._entries(provider):
            if a.account == account and (a.tenant, a.workload) not in out:
                out.append((a.tenant, a.workload))
        return out

    def account_for(self, provider: str, tenant: str, workload: str) -> str | None:
        accounts = sorted({a.account for a in self._entries(provider)
                           if a.tenant == tenant and a.workload == workload})
        if len(accounts) > 1:
            raise InputError(self.source, f"{tenant}/{workload} maps to several {provider} "
                             f"accounts ({', '.join(accounts)}); the internal export must "
                             "carry the provider account for each line")
        return accounts[0] if accounts else None

    def owner(self, workload: Workload) -> str:
        for w in self.doc.workloads:
            if (w.tenant, w.workload) == workload:
                return w.engineering_owner
        return ""

    def cost_center(self, workload: Workload) -> str:
        for w in self.doc.workloads:
            if (w.tenant, w.workload) == workload:
                return w.cost_center
        return ""


def load_mapping(path: pathlib.Path) -> Mapping:
    return Mapping(load_yaml_model(path, MappingDoc, "with accounts and workloads"), str(path))
