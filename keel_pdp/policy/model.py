"""Pydantic models of the YAML documents that make up a policy bundle.

A bundle is a directory of YAML files. Each file holds one document with
``apiVersion: keel.pdp/v1`` and a ``kind``: exactly one ``Bundle`` (revision and
settings), any number of ``PriceTable``, ``Budgets``, ``Routes``, ``Callers``
(which identities may name which tenants and workloads: ``keel_pdp.policy.callers``)
and ``Deployments`` (which priced model a provider deployment serves:
``keel_pdp.policy.deployments``).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from keel_pdp.pricing import (
    AUTO_TIER,
    DEFAULT_TIER,
    HIGHEST_TIER,
    MAX_WEB_SEARCH_CALLS,
    parse_call_fee,
    parse_price,
)

API_VERSION = "keel.pdp/v1"

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
ScopeValue = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Dimension = Literal["tenant", "workload", "model", "provider"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _decimal_string(value: object) -> object:
    if value is None:
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"prices are decimal strings (write \"{value}\" in quotes); floats never hold money"
        )
    parse_price(value)
    return value


def _fee_string(value: object) -> object:
    if value is None:
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"fees are decimal strings in USD per 1,000 calls (write \"{value}\" in quotes); "
            "floats never hold money")
    parse_call_fee(value)
    return value


class PriceTier(_Strict):
    """A context-length tier: requests with more input tokens than
    ``above_input_tokens`` are priced entirely at these rates."""

    above_input_tokens: int = Field(ge=1, le=2_000_000)
    input: str
    output: str
    cached_input: str | None = None
    cache_write: str | None = None
    cache_write_1h: str | None = None

    _check = field_validator("input", "output", "cached_input", "cache_write", "cache_write_1h",
                             mode="before")(_decimal_string)


def _ascending_tiers(tiers: list[PriceTier]) -> list[PriceTier]:
    marks = [t.above_input_tokens for t in tiers]
    if marks != sorted(set(marks)):
        raise ValueError("tiers must have strictly ascending above_input_tokens")
    return tiers


# Names a price table cannot give a service tier: "default" is the model's own rates,
# "auto" is the provider's choice among tiers (never a tier a call is billed at), and
# "highest" is what Keel holds at when the tier is not known in advance.
RESERVED_TIERS = (DEFAULT_TIER, AUTO_TIER, HIGHEST_TIER)
TierName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class ServiceTierPrice(_Strict):
    """The rates of one service tier of a model (OpenAI's ``flex``, ``priority``,
    ``scale``): the same fields as the model's own price, checked by the same rules.
    Cached input and cache writes default to this tier's input rate, one-hour cache
    writes to its cache-write rate; ``tiers`` are this tier's own context-length
    tiers (none: its rates apply at every input size)."""

    input: str
    output: str
    cached_input: str | None = None
    cache_write: str | None = None
    cache_write_1h: str | None = None
    tiers: list[PriceTier] = []

    _check = field_validator("input", "output", "cached_input", "cache_write", "cache_write_1h",
                             mode="before")(_decimal_string)
    _ascending = field_validator("tiers")(_ascending_tiers)


class PriceSpec(_Strict):
    """USD per million tokens, as decimal strings."""

    input: str
    output: str
    cached_input: str | None = None
    cache_write: str | None = None
    cache_write_1h: str | None = None
    max_output_tokens: int = Field(default=4096, ge=1, le=2_000_000)
    # From this UTC date on (inclusive); a model may list several prices.
    effective_from: date | None = None
    tiers: list[PriceTier] = []
    # Rates of the provider's other processing tiers, by the name the provider gives
    # the tier (OpenAI's service_tier); the fields above are the "default" tier.
    service_tiers: dict[TierName, ServiceTierPrice] = {}
    # The provider's fee per web search call, in USD per 1,000 calls (Anthropic's web
    # search tool, OpenAI's web_search tool and search models); the same at every
    # context length and service tier. None: no fee known (searches are flagged).
    web_search_per_1k: str | None = None

    _check = field_validator("input", "output", "cached_input", "cache_write", "cache_write_1h",
                             mode="before")(_decimal_string)
    _fee = field_validator("web_search_per_1k", mode="before")(_fee_string)
    _ascending = field_validator("tiers")(_ascending_tiers)

    @field_validator("service_tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, ServiceTierPrice]) -> dict[str, ServiceTierPrice]:
        for name in tiers:
            if name in RESERVED_TIERS:
                why = {DEFAULT_TIER: "the model's own rates are the default tier",
                       AUTO_TIER: "auto is the provider's choice among the tiers, not a "
                                  "tier a call is billed at",
                       HIGHEST_TIER: "highest is what Keel holds at when the tier is not "
                                     "known"}[name]
                raise ValueError(f"service tier {name!r} cannot be priced: {why}")
        return tiers


class ExceptionPath(_Strict):
    name: Ident
    approver_role: str = "finance-owner"
    description: str = ""
    # The most a single grant may raise a cap by, and for how long.
    max_overage_usd: str = "0"
    max_duration_hours: int = Field(default=72, ge=1, le=24 * 92)


class BundleSettings(_Strict):
    hold_ttl_seconds: int = Field(default=600, ge=5, le=7 * 86400)
    min_output_tokens: int = Field(default=256, ge=1, le=2_000_000)
    allow_constrain: bool = True
    fallback_price: PriceSpec | None = None
    # How long a permit record is kept after its hold expired, so late
    # closeouts still find it.
    permit_retention_seconds: int = Field(default=7 * 86400, ge=60, le=90 * 86400)
    idempotency_ttl_seconds: int = Field(default=86400, ge=60, le=30 * 86400)
    # The service tier a call that names none (or "auto": the provider chooses) is
    # held at: "highest" (each rate at the highest of the model's tiers), or a tier
    # name ("default" when the projects' configured tier is the standard one).
    auto_service_tier: TierName = HIGHEST_TIER
    # How many web searches a call is held for when it offers a web search tool with
    # no bound (Anthropic's max_uses absent, OpenAI's max_tool_calls absent, OpenAI's
    # search models). A bound the call names is held as named.
    web_search_hold_calls: int = Field(default=10, ge=0, le=MAX_WEB_SEARCH_CALLS)

    @field_validator("auto_service_tier")
    @classmethod
    def _auto_tier(cls, value: str) -> str:
        if value == AUTO_TIER:
            raise ValueError("auto_service_tier names what \"auto\" is held at: \"highest\" "
                             "or a tier such as \"default\" or \"priority\", not \"auto\"")
        return value


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
    # provider -> model -> price, or a list of prices with effective_from dates
    providers: dict[Ident, dict[ScopeValue, PriceSpec | list[PriceSpec]]]


class Scope(_Strict):
    tenant: ScopeValue = "*"
    workload: ScopeValue = "*"
    model: ScopeValue = "*"
    provider: ScopeValue = "*"


Window = Literal["hourly", "daily", "monthly"]


def _cap_string(value: object) -> object:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"cap_usd is a decimal string (write \"{value}\" in quotes)")
    return value


class LimitSpec(_Strict):
    window: Window
    cap_usd: str

    _check = field_validator("cap_usd", mode="before")(_cap_string)


class BudgetSpec(_Strict):
    id: Ident
    description: str = ""
    scope: Scope = Scope()
    # Dimensions that get their own counter inside this budget: with
    # per: [tenant], every tenant matching the scope has its own cap.
    per: list[Dimension] = []
    # Either one window and cap, or several limits on the same scope
    # ($10 per hour AND $200 per day AND $3,000 per month).
    window: Window | None = None
    cap_usd: str | None = None
    limits: list[LimitSpec] = []
    mode: Literal["enforce", "observe"] = "enforce"
    fail_mode: Literal["open", "closed"] = "closed"
    exception_path: str = ""
    timezone: str = "UTC"
    # Soft thresholds in percent of the cap: crossing one emits an alert event
    # and a metric, once per window.
    thresholds: list[Annotated[int, Field(ge=1, le=1000)]] = [80, 100]
    # The budget this one sits under (org -> tenant -> workload -> model).
    parent: str = ""

    _check = field_validator("cap_usd", mode="before")(_cap_string)

    @model_validator(mode="after")
    def _one_form(self) -> BudgetSpec:
        single = self.window is not None or self.cap_usd is not None
        if single and self.limits:
            raise ValueError("give either window + cap_usd or limits, not both")
        if not self.limits and (self.window is None or self.cap_usd is None):
            raise ValueError("window and cap_usd are required (or a list of limits)")
        windows = [lim.window for lim in self.limits]
        if len(set(windows)) != len(windows):
            raise ValueError("limits lists the same window twice")
        return self


class BudgetsDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Budgets"]
    budgets: list[BudgetSpec]


class RouteRule(_Strict):
    id: Ident
    scope: Scope = Scope()
    # Entries are "provider/model" or "provider/*"; empty allows every priced model.
    allowed_models: list[str] = []
    # Downgrade chain, most capable first: ["openai/gpt-4.1", "openai/gpt-4.1-mini"].
    downgrade: list[str] = []
    # enforce: deny, or reroute down the chain, when a budget would be exceeded.
    # prefer-cheap: use the cheapest model of the chain the workload allows.
    # observe: never block; record what would have happened (SHADOW reasons).
    mode: Literal["enforce", "prefer-cheap", "observe"] = "enforce"
    description: str = ""


class RoutesDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Routes"]
    rules: list[RouteRule]


# RPCs a caller binding may grant. ``mesh``: Envoy's ext_authz / ext_proc
# (a proxy trusted to speak for the principal it verified). ``request_exception``:
# ask for an exception and list one's own requests; ``grant_exception``: grant,
# approve, reject and list, and ask (both on the binding's tenants only).
CallerRpc = Literal["authorize", "closeout", "void", "admin", "grant_exception",
                    "request_exception", "mesh"]
CALLER_RPCS: tuple[str, ...] = ("authorize", "closeout", "void", "admin", "grant_exception",
                                "request_exception", "mesh")
IdentityPattern = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class CallerBinding(_Strict):
    """Identities (exact, or with ``*`` standing for one whole ``/`` segment)
    and the tenants, workloads and RPCs they may name and call."""

    id: Ident
    identities: list[IdentityPattern] = Field(min_length=1)
    tenants: list[ScopeValue] = []
    workloads: list[ScopeValue] = ["*"]
    rpcs: list[CallerRpc] = ["authorize", "closeout", "void"]
    description: str = ""


class CallersDoc(_Strict):
    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Callers"]
    bindings: list[CallerBinding]


_DEPLOYMENT_NAME = re.compile(r"^[^/?#\s]{1,256}$")


class Deployment(_Strict):
    # As it appears in the request path: one path segment.
    name: str
    # The price table's model name under the document's provider.
    model: ScopeValue
    description: str = ""

    @field_validator("name")
    @classmethod
    def _one_segment(cls, name: str) -> str:
        if not _DEPLOYMENT_NAME.match(name):
            raise ValueError(f"deployment name {name[:80]!r} must be one path segment: 1 to "
                             "256 characters, no '/', '?', '#' or whitespace")
        return name


class DeploymentsDoc(_Strict):
    """Deployment -> model for a provider whose request paths name a deployment
    instead of a model (Azure OpenAI: ``/openai/deployments/{name}/...``).

    A list rather than a mapping so that a name given twice is an error, not
    silently the last one (YAML mappings keep the last duplicate key).
    """

    apiVersion: Literal["keel.pdp/v1"]
    kind: Literal["Deployments"]
    provider: Ident = "azure"
    deployments: list[Deployment]
