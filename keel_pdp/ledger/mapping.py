"""Internal allocation: which cost center and business unit pays for a tenant.

A YAML file maps tenants (and optionally single tenant/workload pairs) to a
cost center and business unit; anything unmapped is reported as the default
(``unallocated``) so no spend silently disappears from a chargeback.

    default: {cost_center: unallocated, business_unit: unallocated}
    tenants:
      acme: {cost_center: CC-100, business_unit: Retail}
    workloads:
      acme/support-bot: {cost_center: CC-110, business_unit: Support}
"""

from __future__ import annotations

import pathlib

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel_pdp.errors import MappingError as MappingError


class Allocation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cost_center: str = Field(min_length=1, max_length=128)
    business_unit: str = Field(default="unallocated", min_length=1, max_length=128)


class MappingDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default: Allocation = Allocation(cost_center="unallocated")
    tenants: dict[str, Allocation] = {}
    workloads: dict[str, Allocation] = {}




class CostMapping:
    def __init__(self, doc: MappingDoc | None = None) -> None:
        self.doc = doc or MappingDoc()

    def allocate(self, tenant: str, workload: str = "") -> Allocation:
        hit = self.doc.workloads.get(f"{tenant}/{workload}")
        if hit is not None:
            return hit
        return self.doc.tenants.get(tenant, self.doc.default)

    @classmethod
    def load(cls, path: str | pathlib.Path | None) -> CostMapping:
        if not path:
            return cls()
        p = pathlib.Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise MappingError(f"{p}: {exc}") from exc
        try:
            return cls(MappingDoc.model_validate(raw or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise MappingError(f"{p}: {where}: {first['msg']}") from exc
