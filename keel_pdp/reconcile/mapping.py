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
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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


class TenantClock(_Strict):
    """The time zone a tenant's telemetry (and so its ledger month) runs on."""

    tenant: Name
    timezone: str = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _known_zone(self) -> TenantClock:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"tenant {self.tenant}: unknown IANA time zone "
                             f"{self.timezone!r}") from None
        return self


class TierRule(_Strict):
    """Input size above which a provider bills a model at its long-context rates."""

    provider: str = Field(min_length=1, max_length=64)
    model: str = ""  # empty: every model of the provider
    above_input_tokens: int = Field(gt=0)


class FailedBilling(_Strict):
    """Which error classes of failed attempts a provider bills (tokens as recorded)."""

    provider: str = Field(min_length=1, max_length=64)
    billed: list[str] = []
    not_billed: list[str] = []


# Documented defaults. A stream the client dropped (or the gateway stopped
# waiting for) was still generated and billed; overloaded, rate-limited and
# rejected attempts produced nothing billable. A failure without an error class
# is taken as not billed.
DEFAULT_BILLED = ("client_disconnected", "client_closed_request", "client_cancelled",
                  "cancelled", "partial", "gateway_timeout", "deadline_exceeded",
                  "stream_interrupted")
DEFAULT_NOT_BILLED = ("overloaded_error", "overloaded", "rate_limit_error", "rate_limited",
                      "api_error", "internal_server_error", "invalid_request_error",
                      "authentication_error", "permission_error", "not_found_error",
                      "request_too_large", "connection_error", "failed")
DEFAULT_TIERS = {"openai": 272_000, "anthropic": 200_000}


class MappingDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"] = "keel.pdp/v1"
    kind: Literal["ReconcileMapping"] = "ReconcileMapping"
    finance_owner: str = ""
    ai_program_lead: str = ""
    accounts: list[AccountMap] = Field(min_length=1)
    workloads: list[WorkloadOwner] = Field(min_length=1)
    models: dict[str, dict[str, str]] = {}
    tenants: list[TenantClock] = []
    tiers: list[TierRule] = []
    failed_billing: list[FailedBilling] = []

    @model_validator(mode="after")
    def _consistent(self) -> MappingDoc:
        clocks = [t.tenant for t in self.tenants]
        for name in clocks:
            if clocks.count(name) > 1:
                raise ValueError(f"tenant {name} is listed twice under tenants")
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

    def tenant_zone(self, tenant: str) -> ZoneInfo | None:
        for t in self.doc.tenants:
            if t.tenant == tenant:
                return ZoneInfo(t.timezone)
        return None

    def tier_threshold(self, provider: str, model: str) -> int:
        best: int | None = None
        for rule in self.doc.tiers:
            if rule.provider == provider and rule.model == model:
                return rule.above_input_tokens
            if rule.provider == provider and not rule.model:
                best = rule.above_input_tokens
        return best if best is not None else DEFAULT_TIERS.get(provider, 200_000)

    def failed_attempt_billed(self, provider: str, error_type: str, status: str) -> bool:
        """Whether the provider bills a failed attempt of this error class."""
        key = (error_type or status).strip().lower()
        for rule in self.doc.failed_billing:
            if rule.provider == provider:
                if key in (b.lower() for b in rule.billed):
                    return True
                if key in (b.lower() for b in rule.not_billed):
                    return False
        return key in DEFAULT_BILLED

    def cost_center(self, workload: Workload) -> str:
        for w in self.doc.workloads:
            if (w.tenant, w.workload) == workload:
                return w.cost_center
        return ""


def load_mapping(path: pathlib.Path) -> Mapping:
    return Mapping(load_yaml_model(path, MappingDoc, "with accounts and workloads"), str(path))
