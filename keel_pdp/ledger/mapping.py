"""Internal allocation: which cost center and business unit pays for a tenant.

A YAML file maps tenants (and single tenant/workload pairs) to a cost center
and business unit; anything unmapped is reported as the default
(``unallocated``) so no spend silently disappears from a chargeback.

    default: {cost_center: unallocated, business_unit: unallocated}
    tenants:
      acme:
        cost_center: CC-100
        business_unit: Retail
        workloads:
          support-bot: {cost_center: CC-110, business_unit: Support}
      "team/eu": {cost_center: CC-200}
    workloads:                       # flat form: "tenant/workload"
      acme/batch: {cost_center: CC-120}

Tenant and workload names may contain ``/``, so a flat key is only a name
split in two when it has one ``/``. A flat key with several (``a/b/c``: tenant
``a/b`` workload ``c``, or tenant ``a`` workload ``b/c``) names whichever one
pair the ledger (or the file's nested entries) holds; when more than one is
held it is refused, naming the file and the key, and the nested form says
which is meant. Nothing is ever attributed by splitting a joined string.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel_pdp.errors import MappingError as MappingError

if TYPE_CHECKING:
    from keel_pdp.ledger.store import LedgerStore

Pair = tuple[str, str]


class Allocation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cost_center: str = Field(min_length=1, max_length=128)
    business_unit: str = Field(default="unallocated", min_length=1, max_length=128)


class TenantEntry(BaseModel):
    """A tenant's own allocation and, nested under it, its workloads' allocations."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cost_center: str | None = Field(default=None, min_length=1, max_length=128)
    business_unit: str | None = Field(default=None, min_length=1, max_length=128)
    workloads: dict[str, Allocation] = {}

    @model_validator(mode="after")
    def _says_something(self) -> TenantEntry:
        if self.cost_center is None and self.business_unit is not None:
            raise ValueError("business_unit without a cost_center")
        if self.cost_center is None and not self.workloads:
            raise ValueError("names neither a cost_center nor workloads")
        return self

    def own(self, default: Allocation) -> Allocation:
        """What the tenant's workloads without an entry of their own are charged to."""
        if self.cost_center is None:
            return default
        return Allocation(cost_center=self.cost_center,
                          business_unit=self.business_unit or "unallocated")


class MappingDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default: Allocation = Allocation(cost_center="unallocated")
    tenants: dict[str, TenantEntry] = {}
    workloads: dict[str, Allocation] = {}


def splits(key: str) -> list[Pair]:
    """Every tenant/workload pair a flat key ``tenant/workload`` can stand for."""
    return [(key[:i], key[i + 1:]) for i, ch in enumerate(key) if ch == "/"]


class CostMapping:
    def __init__(self, doc: MappingDoc | None = None, source: str = "mapping") -> None:
        self.doc = doc or MappingDoc()
        self.source = source
        self._exact: dict[Pair, Allocation] = {}
        self._nested: set[Pair] = set()
        for tenant, entry in self.doc.tenants.items():
            for workload, alloc in entry.workloads.items():
                self._exact[(tenant, workload)] = alloc
                self._nested.add((tenant, workload))
        # Flat keys with several "/" wait for ``resolve`` (the pairs the ledger holds).
        self._open: dict[str, Allocation] = {}
        for key, alloc in self.doc.workloads.items():
            pairs = splits(key)
            if not pairs:
                raise self._refuse(key, "a flat key is tenant/workload; this one names no "
                                   "workload (list the tenant under tenants)")
            if len(pairs) > 1:
                self._open[key] = alloc
                continue
            if pairs[0] in self._nested:
                raise self._refuse(key, f"tenant {pairs[0][0]!r} workload {pairs[0][1]!r} "
                                   "also has a nested entry under tenants")
            self._exact[pairs[0]] = alloc

    def _refuse(self, key: str, why: str) -> MappingError:
        return MappingError(f"{self.source}: workloads.{key}: {why}")

    def resolve(self, held: Iterable[Pair]) -> CostMapping:
        """This mapping with every flat key of several ``/`` bound to the one pair
        of ``held`` (and of the nested entries) it can stand for; a key that can
        stand for two of them is refused. A key that stands for none is dropped:
        it charges nothing in this ledger."""
        if not self._open:
            return self
        known = set(held) | self._nested
        out = CostMapping.__new__(CostMapping)
        out.doc, out.source = self.doc, self.source
        out._exact, out._nested, out._open = dict(self._exact), set(self._nested), {}
        for key, alloc in sorted(self._open.items()):
            hits = [p for p in splits(key) if p in known]
            if len(hits) > 1:
                which = " and ".join(f"tenant {t!r} workload {w!r}" for t, w in hits)
                raise self._refuse(key, f"ambiguous: it can mean {which}; give the "
                                   "allocation nested under its tenant (tenants.<tenant>."
                                   "workloads.<workload>) instead")
            if not hits:
                continue
            if hits[0] in self._nested:
                raise self._refuse(key, f"tenant {hits[0][0]!r} workload {hits[0][1]!r} "
                                   "also has a nested entry under tenants")
            if hits[0] in out._exact:
                raise self._refuse(key, f"tenant {hits[0][0]!r} workload {hits[0][1]!r} "
                                   "has another flat key")
            out._exact[hits[0]] = alloc
        return out

    def for_store(self, store: LedgerStore) -> CostMapping:
        """``resolve`` against every tenant/workload pair the ledger holds (all
        periods, so a key never means one pair in one month and another in the next)."""
        if not self._open:
            return self
        rows = store.query("SELECT DISTINCT tenant, workload FROM ledger_entries")
        return self.resolve((str(t or ""), str(w or "")) for t, w in rows)

    def allocate(self, tenant: str, workload: str = "") -> Allocation:
        hit = self._exact.get((tenant, workload))
        if hit is not None:
            return hit
        if self._open and f"{tenant}/{workload}" in self._open:
            raise self._refuse(f"{tenant}/{workload}", "not resolved against the ledger's "
                               "tenants and workloads")
        entry = self.doc.tenants.get(tenant)
        return entry.own(self.doc.default) if entry is not None else self.doc.default

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
            doc = MappingDoc.model_validate(raw or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise MappingError(f"{p}: {where}: {first['msg']}") from exc
        return cls(doc, str(p))
