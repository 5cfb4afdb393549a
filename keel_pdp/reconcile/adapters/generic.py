"""Any CSV export, described by a column-mapping YAML file.

Long format (one row per token type: ``columns.token_type`` + ``columns.cost``)
and wide format (``cost_columns`` / ``token_columns`` per token type) are both
supported. See docs/reconcile.md for the file format.
"""

from __future__ import annotations

import pathlib
from dataclasses import replace
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel_pdp.reconcile.adapters.classify import classify
from keel_pdp.reconcile.adapters.common import (
    DuplicateGuard,
    as_count,
    check_currency,
    check_in_period,
    csv_header,
    load_yaml_model,
    parse_day,
    read_csv,
)
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import (
    CORRECTION,
    DEFAULT_ACCOUNT,
    LINE_KINDS,
    TOKEN_TYPES,
    USAGE,
    ProviderLine,
    normalise_model,
    service_tier_name,
    slug,
)
from keel_pdp.reconcile.money import (
    MICROS_PER_CENT,
    MICROS_PER_USD,
    parse_decimal,
    quantum_micros,
    to_micros,
)
from keel_pdp.reconcile.period import Period

_UNITS = {"usd": MICROS_PER_USD, "cents": MICROS_PER_CENT, "micros": 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Columns(_Strict):
    date: str
    account: str = ""
    model: str = ""
    token_type: str = ""
    tokens: str = ""
    cost: str = ""
    currency: str = ""
    api_key: str = ""
    kind: str = ""
    belongs_to: str = ""
    description: str = ""
    service_tier: str = ""


class ColumnMap(_Strict):
    """The column-mapping file for ``--provider csv`` (or extra invoice lines)."""

    apiVersion: Literal["keel.pdp/v1"] = "keel.pdp/v1"
    kind: Literal["ColumnMap"] = "ColumnMap"
    provider: str = Field(min_length=1, max_length=64)
    currency: str = "USD"
    amount_unit: Literal["usd", "cents", "micros"] = "usd"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    default_account: str = DEFAULT_ACCOUNT
    columns: Columns
    token_types: dict[str, str] = {}
    kinds: dict[str, str] = {}
    # The export's words for service tiers -> tier names (``standard``, ``batch``, ...).
    service_tiers: dict[str, str] = {}
    cost_columns: dict[str, str] = {}
    token_columns: dict[str, str] = {}

    @model_validator(mode="after")
    def _shape(self) -> ColumnMap:
        if bool(self.columns.cost) == bool(self.cost_columns):
            raise ValueError("give either columns.cost (one row per token type) or "
                             "cost_columns (one column per token type), not both")
        if self.cost_columns and self.columns.token_type:
            raise ValueError("columns.token_type is for the long format; drop it when "
                             "using cost_columns")
        for value in self.kinds.values():
            if value not in LINE_KINDS:
                raise ValueError(f"kinds maps to {value!r}; use one of {list(LINE_KINDS)}")
        for value in self.service_tiers.values():
            if not service_tier_name(value):
                raise ValueError(f"service_tiers maps to {value!r}, which names no tier")
        return self

    def required_columns(self) -> list[str]:
        c = self.columns
        names = [c.date, c.account, c.model, c.token_type, c.tokens, c.cost, c.currency,
                 c.api_key, c.kind, c.belongs_to, c.description, c.service_tier]
        names += list(self.cost_columns.values()) + list(self.token_columns.values())
        return [n for n in names if n]


def load_column_map(path: pathlib.Path) -> ColumnMap:
    return load_yaml_model(path, ColumnMap, "(provider, columns, ...)")


def matches(cmap: ColumnMap, text: str) -> bool:
    header = set(csv_header(text))
    return set(cmap.required_columns()) <= header


def parse(path: pathlib.Path, text: str, cmap: ColumnMap, period: Period,
          aliases: dict[str, str], guard: DuplicateGuard) -> list[ProviderLine]:
    _, rows = read_csv(path, text, cmap.required_columns(), delimiter=cmap.delimiter)
    c = cmap.columns
    unit = _UNITS[cmap.amount_unit]
    token_types = {k: v for k, v in cmap.token_types.items()}
    lines: list[ProviderLine] = []
    for row in rows:
        v = row.values
        where = row.where
        guard.check(path, ("csv", *[v.get(n, "") for n in cmap.required_columns()]), where)
        day = parse_day(path, v.get(c.date), where, c.date)
        check_in_period(path, day, period, where, c.date)
        if c.currency:
            check_currency(path, v.get(c.currency), where, c.currency, cmap.currency)
        account = (v.get(c.account, "") if c.account else "") or cmap.default_account
        model_raw = v.get(c.model, "") if c.model else ""
        description = v.get(c.description, "") if c.description else ""
        base = ProviderLine(day=day, account=account,
                            model=normalise_model(model_raw, aliases) if model_raw else "",
                            token_type="", tokens=None, cost_micros=None,
                            api_key=v.get(c.api_key, "") if c.api_key else "",
                            description=description, source=str(path), where=where,
                            service_tier=_service_tier(path, cmap, v, where))
        if cmap.cost_columns:
            for token_type, column in cmap.cost_columns.items():
                amount = _amount(path, v.get(column, ""), where, column)
                tokens = (as_count(path, v.get(cmap.token_columns[token_type]), where,
                                   cmap.token_columns[token_type])
                          if token_type in cmap.token_columns else None)
                lines.append(replace(base, token_type=token_type, tokens=tokens,
                                     cost_micros=to_micros(amount, unit),
                                     precision_micros=quantum_micros(amount, unit)))
            continue
        amount = _amount(path, v.get(c.cost, ""), where, c.cost)
        micros = to_micros(amount, unit)
        raw_type = v.get(c.token_type, "") if c.token_type else ""
        kind_raw = v.get(c.kind, "") if c.kind else ""
        if kind_raw:
            if kind_raw not in cmap.kinds and kind_raw.lower() not in LINE_KINDS:
                raise InputError(str(path), f"kind {kind_raw!r} is not in the column map's "
                                 f"kinds ({', '.join(cmap.kinds) or 'none'})", where=where,
                                 column=c.kind)
            kind = cmap.kinds.get(kind_raw, kind_raw.lower())
            belongs = v.get(c.belongs_to, "").strip() if c.belongs_to else ""
            if kind == CORRECTION:
                belongs = _prior_period(path, belongs, period, where, c.belongs_to)
        else:
            kind, belongs = classify(description or raw_type, micros, bool(model_raw), period)
        if kind == USAGE:
            if not raw_type:
                raise InputError(str(path), "token type is missing", where=where,
                                 column=c.token_type or "(token_type)")
            token_type = token_types.get(raw_type, raw_type if raw_type in TOKEN_TYPES
                                         else slug(raw_type))
        else:
            token_type = kind
        tokens = as_count(path, v.get(c.tokens), where, c.tokens) if c.tokens else None
        lines.append(replace(base, token_type=token_type, kind=kind, belongs_to=belongs,
                             tokens=tokens if kind == USAGE else None,
                             model=base.model if kind == USAGE else "",
                             cost_micros=micros, precision_micros=quantum_micros(amount, unit)))
    return lines


def _service_tier(path: pathlib.Path, cmap: ColumnMap, v: dict[str, str], where: str
                  ) -> str:
    """The row's tier through ``service_tiers``, else its slug; "" without the column."""
    column = cmap.columns.service_tier
    raw = v.get(column, "") if column else ""
    if not raw:
        return ""
    try:
        return service_tier_name(cmap.service_tiers.get(raw, slug(raw)))
    except ValueError as exc:
        raise InputError(str(path), str(exc), where=where, column=column) from None


def _amount(path: pathlib.Path, text: str, where: str, column: str) -> Decimal:
    try:
        return parse_decimal(text)
    except ValueError as exc:
        raise InputError(str(path), str(exc), where=where, column=column) from None


def _prior_period(path: pathlib.Path, text: str, period: Period, where: str, column: str
                  ) -> str:
    try:
        named = Period.parse(text)
    except ValueError:
        raise InputError(str(path), f"a correction must name the period it belongs to "
                         f"(YYYY-MM), got {text!r}", where=where,
                         column=column or "(belongs_to)") from None
    if not named < period:
        raise InputError(str(path), f"a correction for {named} is not for a prior period of "
                         f"{period}", where=where, column=column)
    return str(named)
