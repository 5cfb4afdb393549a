"""Pydantic models of the YAML documents that make up a policy bundle.

A bundle is a directory of YAML files. Each file holds one document with
``apiVersion: keel.pdp/v1`` and a ``kind``: exactly one ``Bundle`` (revision and
settings), any number of ``PriceTable``, ``Budgets`` and ``Routes``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from keel_pdp.pricing import parse_price

API_VERSION = "keel.pdp/v1"

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
ScopeValue = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Dimension = Literal["tenant", "workload", "model", "provider"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSpec(_Strict):
    """USD per million tokens, as decimal strings."""

    input: str
    output: str
    cached_input: str | None = None
    cache_write: str | None = None
    max_output_tokens: int = Field(default=4096, ge=1, le=2_000_000)

    @field_validator("input", "output", "cached_input", "cache_write", mode="before")
    @classmethod
    def _decimal_string(cls, value: object) -> object:
        if value is None:
            return value
        if not isinstance(value, str):
            raise ValueError(
                f"prices are decimal strings (write \"{value}\" in quotes); "
                "floats never hold money"
            )
        parse_price(value)
        return value


class ExceptionPath(_Strict):
    name: Ident
    approver_role: str = "finance-owner"
    description: str = ""


class BundleSettings(_Strict):
    hold_ttl_seconds: int = Field(default=600, ge=5, le=7 * 86400)
    min_output_tokens: int = Field(default=256, ge=1, le=2_000_000)
    allow_constrain: bool = True
    fallback_price: PriceSpec | None = None
    # How long a permit record is kept after its hold expired, so late
    # closeouts still find it.
    permit_retention_seconds: int = Field(default=7 * 86400, ge=60, le=90 * 86400)
    idempotency_ttl_seconds: int = Field(default=86400, ge=60, le=30 * 86400)


class BundleDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Bundle"]
    revision: Ident
    description: str = ""
    settings: BundleSettings = BundleSettings()
    exception_paths: list[ExceptionPath] = []


class PriceTableDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["PriceTable"]
    revision: Ident
    # provider -> model -> price
    providers: dict[Ident, dict[ScopeValue, PriceSpec]]


class Scope(_Strict):
    tenant: ScopeValue = "*"
    workload: ScopeValue = "*"
    model: ScopeValue = "*"
    provider: ScopeValue = "*"


class BudgetSpec(_Strict):
    id: Ident
    description: str = ""
    scope: Scope = Scope()
    # Dimensions that get their own counter inside this budget: with
    # per: [tenant], every tenant matching the scope has its own cap.
    per: list[Dimension] = []
    window: Literal["hourly", "daily", "monthly"]
    cap_usd: str
    mode: Literal["enforce", "observe"] = "enforce"
    fail_mode: Literal["open", "closed"] = "closed"
    exception_path: str = ""
    timezone: str = "UTC"

    @field_validator("cap_usd", mode="before")
    @classmethod
    def _cap_string(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"cap_usd is a decimal string (write \"{value}\" in quotes)")
        return value


class BudgetsDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Budgets"]
    budgets: list[BudgetSpec]


class RouteRule(_Strict):
    id: Ident
    scope: Scope = Scope()
    # Entries are "provider/model" or "provider/*".
    allowed_models: list[str]
    description: str = ""


class RoutesDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Routes"]
    rules: list[RouteRule]
