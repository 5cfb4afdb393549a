"""OpenAI organization exports: the Usage API (completions buckets), the Costs
API, and the usage dashboard's CSV exports of both.

Usage buckets (``object: page`` / ``bucket`` / ``organization.usage.completions
.result``) carry ``input_tokens`` (cached tokens included), ``input_cached_tokens``,
``output_tokens``, ``num_model_requests`` and, when grouped, ``project_id``,
``api_key_id`` and ``model``. Cost buckets (``organization.costs.result``) carry
``amount.value`` (a JSON number, read as an exact decimal) and
``amount.currency`` (lowercase ISO code), grouped by ``project_id`` and
``line_item`` ("<model>, input" / "cached input" / "output", or a non-token
item such as web search). Buckets are daily and start at midnight UTC.

Service tiers: a usage result grouped by ``batch`` and ``service_tier`` says
which tier it is (``batch: true`` is the Batch API, whatever ``service_tier``
says; ``service_tier`` "default" is the standard tier); a cost line item names
a tier other than the standard one in front of the model (``"priority | gpt-4o
..., input"``), or as one of its comma-separated parts (``", batch"``).
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import replace
from typing import Any

from keel_pdp.reconcile.adapters.classify import classify
from keel_pdp.reconcile.adapters.common import (
    DuplicateGuard,
    as_count,
    check_currency,
    check_in_period,
    csv_header,
    day_place,
    iter_buckets,
    load_json,
    parse_day,
    read_csv,
    text_field,
)
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import (
    BATCH_TIER,
    CACHE_WRITE,
    CACHED_INPUT,
    DEFAULT_ACCOUNT,
    INPUT,
    LONG_CONTEXT,
    OUTPUT,
    STANDARD_TIER,
    USAGE,
    ProviderLine,
    normalise_model,
    service_tier_name,
    slug,
)
from keel_pdp.reconcile.money import parse_decimal, quantum_micros, to_micros
from keel_pdp.reconcile.period import Period

USAGE_OBJECT = "organization.usage.completions.result"
COSTS_OBJECT = "organization.costs.result"
USAGE_CSV_REQUIRED = ("start_time", "project_id", "model", "input_tokens", "output_tokens",
                      "input_cached_tokens")
COSTS_CSV_REQUIRED = ("start_time", "amount_value", "amount_currency", "line_item",
                      "project_id")
_LINE_TYPES = {
    "input": INPUT,
    "cached input": CACHED_INPUT,
    "cache write": CACHE_WRITE,
    "cached write": CACHE_WRITE,
    "output": OUTPUT,
}
# Long-context lines are separate line items ("gpt-5.4, input, long context",
# "gpt-5.4, output (long context > 272k)"): billed at the tier's rates, never
# merged with the normal lines.
_TIER = re.compile(r"long[- ]context|context\s*>|>\s*\d+\s*k\b")
_TIER_ABOVE = re.compile(r">\s*(\d+)\s*k\b")
_PAREN = re.compile(r"\([^)]*\)")
_LINE_ITEM = re.compile(r"^(?:(?P<tier>[^|]+)\|\s*)?(?P<model>[^,]+),\s*(?P<rest>.+)$")
# Tiers a line item may name as one of its comma-separated parts.
_TIER_WORDS = ("batch", "flex", "priority", "scale")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def detect(path: pathlib.Path, text: str) -> str | None:
    """'usage-json' | 'costs-json' | 'usage-csv' | 'costs-csv' | None."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        if USAGE_OBJECT in text or '"input_cached_tokens"' in text:
            return "usage-json"
        if COSTS_OBJECT in text or '"line_item"' in text:
            return "costs-json"
        return None
    header = set(csv_header(text))
    if {"amount_value", "line_item"} <= header:
        return "costs-csv"
    if {"input_tokens", "output_tokens", "num_model_requests"} <= header:
        return "usage-csv"
    return None


def _account(value: Any) -> str:
    return text_field(value) or DEFAULT_ACCOUNT


def _usage_tier(path: pathlib.Path, r: dict[str, Any], where: str, column_style: bool
                ) -> str:
    """The tier of a usage result: "batch" for the Batch API, else its
    ``service_tier`` ("" when the export is not grouped by either)."""
    batch = r.get("batch")
    if isinstance(batch, str):
        word = batch.strip().lower()
        if word not in _TRUE + _FALSE:
            raise InputError(str(path), f"batch {batch[:40]!r} is not true or false",
                             where=where if column_style else f"{where}.batch",
                             column="batch" if column_style else "")
        batch = word in _TRUE if word else None
    elif batch is not None and not isinstance(batch, bool):
        raise InputError(str(path), f"batch {batch!r} is not true or false",
                         where=where if column_style else f"{where}.batch",
                         column="batch" if column_style else "")
    try:
        tier = service_tier_name(r.get("service_tier"))
    except ValueError as exc:
        raise InputError(str(path), str(exc),
                         where=where if column_style else f"{where}.service_tier",
                         column="service_tier" if column_style else "") from None
    return BATCH_TIER if batch else tier


def _item_tier(path: pathlib.Path, prefix: str | None, parts: list[str], where: str,
               column: str) -> str:
    """The tier a cost line item names: its prefix (``"priority | ..."``) or one of
    its parts (``", batch"``); a line item naming none is the standard tier."""
    if prefix is not None and prefix.strip():
        try:
            return service_tier_name(slug(prefix)) or STANDARD_TIER
        except ValueError as exc:
            raise InputError(str(path), f"line item: {exc}", where=where,
                             column=column) from None
    for part in parts:
        word = _PAREN.sub("", part).strip()
        if word in _TIER_WORDS:
            return word
    return STANDARD_TIER


def _usage_lines(path: pathlib.Path, period: Period, aliases: dict[str, str], where: str,
                 day_value: Any, day_column: str, r: dict[str, Any], column_style: bool
                 ) -> list[ProviderLine]:
    def col(name: str) -> str:
        return name if column_style else ""

    def at(name: str) -> str:
        return where if column_style else f"{where}.{name}"

    day_where, day_col = day_place(where, day_column, None if column_style else day_column)
    day = parse_day(path, day_value, day_where, day_col)
    check_in_period(path, day, period, day_where, day_col)
    total_in = as_count(path, r.get("input_tokens"), at("input_tokens"), col("input_tokens"),
                        optional=False)
    cached = as_count(path, r.get("input_cached_tokens"), at("input_cached_tokens"),
                      col("input_cached_tokens"))
    write = as_count(path, r.get("input_cache_write_tokens"), at("input_cache_write_tokens"),
                     col("input_cache_write_tokens"))
    output = as_count(path, r.get("output_tokens"), at("output_tokens"), col("output_tokens"),
                      optional=False)
    requests = as_count(path, r.get("num_model_requests"), at("num_model_requests"),
                        col("num_model_requests"))
    if cached + write > total_in:
        raise InputError(str(path), f"input_cached_tokens ({cached}) + cache writes ({write}) "
                         f"exceed input_tokens ({total_in})", where=where)
    model_raw = text_field(r.get("model"))
    if not model_raw and (total_in or output):
        raise InputError(str(path), "usage without a model: export with group_by=model",
                         where=at("model"), column=col("model"))
    model = normalise_model(model_raw, aliases)
    account = _account(r.get("project_id"))
    key = text_field(r.get("api_key_id"))
    base = ProviderLine(day=day, account=account, model=model, token_type=INPUT,
                        tokens=total_in - cached - write, cost_micros=None, api_key=key,
                        source=str(path), where=where, requests=requests,
                        service_tier=_usage_tier(path, r, where, column_style))
    out = [base,
           replace(base, token_type=CACHED_INPUT, tokens=cached, requests=None),
           replace(base, token_type=OUTPUT, tokens=output, requests=None)]
    if write:
        out.append(replace(base, token_type=CACHE_WRITE, tokens=write, requests=None))
    return out


def _cost_line(path: pathlib.Path, period: Period, aliases: dict[str, str], where: str,
               day: Any, day_column: str, value: Any, currency: Any, line_item: Any,
               project: Any, value_where: tuple[str, str], currency_where: tuple[str, str],
               json_day: str | None = None) -> ProviderLine | None:
    if (value is None or text_field(value) == "") and not text_field(line_item):
        return None  # an empty bucket row of a dashboard export
    day_where, day_col = day_place(where, day_column, json_day)
    parsed_day = parse_day(path, day, day_where, day_col)
    check_in_period(path, parsed_day, period, day_where, day_col)
    try:
        amount = parse_decimal(value)
    except ValueError as exc:
        raise InputError(str(path), str(exc), where=value_where[0], column=value_where[1]) from None
    check_currency(path, currency, currency_where[0], currency_where[1])
    micros = to_micros(amount)
    item = text_field(line_item)
    if not item and micros:
        raise InputError(str(path), "a cost without a line item: export the costs grouped by "
                         "line_item (and project_id)", where=value_where[0],
                         column="line_item" if value_where[1] else "")
    m = _LINE_ITEM.match(item)
    token_type = ""
    model = ""
    tier = ""
    tier_from = 0
    service_tier = ""
    if m is not None:
        model_part = m.group("model").strip()
        rest = m.group("rest").strip().lower()
        first, _, modality = model_part.partition(" ")
        model = normalise_model(first, aliases)
        tier_match = _TIER.search(rest)
        if tier_match is not None:
            tier = LONG_CONTEXT
            above = _TIER_ABOVE.search(rest)
            tier_from = int(above.group(1)) * 1000 if above else 0
        parts = rest.split(",")
        service_tier = _item_tier(path, m.group("tier"), parts[1:],
                                  where if value_where[1] else f"{where}.line_item",
                                  "line_item" if value_where[1] else "")
        kind_part = _PAREN.sub("", parts[0]).strip()
        token_type = _LINE_TYPES.get(kind_part, slug(kind_part))
        if modality:
            token_type = f"{slug(modality)}_{token_type}"
    else:
        token_type = slug(item) or "unspecified"
    kind, belongs = classify(item, micros, bool(model), period)
    return ProviderLine(
        day=parsed_day, account=_account(project), model=model if kind == USAGE else "",
        token_type=token_type if kind == USAGE else kind, tokens=None, cost_micros=micros,
        kind=kind, belongs_to=belongs, description=item, source=str(path), where=where,
        precision_micros=quantum_micros(amount), tier=tier if kind == USAGE else "",
        tier_from=tier_from, service_tier=service_tier if kind == USAGE else "",
    )


def parse(path: pathlib.Path, text: str, fmt: str, period: Period, aliases: dict[str, str],
          guard: DuplicateGuard) -> list[ProviderLine]:
    lines: list[ProviderLine] = []
    if fmt in ("usage-json", "costs-json"):
        doc = load_json(path, text)
        expected = USAGE_OBJECT if fmt == "usage-json" else COSTS_OBJECT
        for b_where, bucket, results in iter_buckets(path, doc):
            if not results:
                continue
            start = bucket.get("start_time")
            for r_where, r in results:
                obj = r.get("object")
                if obj is not None and obj != expected:
                    raise InputError(str(path), f"object {obj!r} where {expected!r} was "
                                     "expected (usage and costs pages are separate files)",
                                     where=f"{r_where}.object")
                if fmt == "usage-json":
                    guard.check(path, ("openai-usage", start, r.get("project_id"),
                                       r.get("api_key_id"), r.get("user_id"), r.get("model"),
                                       r.get("batch"), r.get("service_tier")), r_where)
                    lines += _usage_lines(path, period, aliases, r_where, start,
                                          f"{b_where}.start_time", r, False)
                else:
                    amount = r.get("amount")
                    if not isinstance(amount, dict):
                        raise InputError(str(path), "missing 'amount' object",
                                         where=f"{r_where}.amount")
                    guard.check(path, ("openai-costs", start, r.get("project_id"),
                                       r.get("line_item")), r_where)
                    line = _cost_line(path, period, aliases, r_where, start, "",
                                      amount.get("value"), amount.get("currency"),
                                      r.get("line_item"), r.get("project_id"),
                                      (f"{r_where}.amount.value", ""),
                                      (f"{r_where}.amount.currency", ""),
                                      f"{b_where}.start_time")
                    if line is not None:
                        lines.append(line)
        return lines
    required = USAGE_CSV_REQUIRED if fmt == "usage-csv" else COSTS_CSV_REQUIRED
    _, rows = read_csv(path, text, required)
    for row in rows:
        v = row.values
        if fmt == "usage-csv":
            if not v.get("model") and not any(v.get(c) for c in ("input_tokens", "output_tokens")):
                continue  # an empty bucket row
            guard.check(path, ("openai-usage", v.get("start_time"), v.get("project_id"),
                               v.get("api_key_id"), v.get("user_id"), v.get("model"),
                               v.get("batch"), v.get("service_tier")), row.where)
            lines += _usage_lines(path, period, aliases, row.where, v.get("start_time"),
                                  "start_time", v, True)
        else:
            guard.check(path, ("openai-costs", v.get("start_time"), v.get("project_id"),
                               v.get("line_item")), row.where)
            line = _cost_line(path, period, aliases, row.where, v.get("start_time"),
                              "start_time", v.get("amount_value"), v.get("amount_currency"),
                              v.get("line_item"), v.get("project_id"),
                              (row.where, "amount_value"), (row.where, "amount_currency"))
            if line is not None:
                lines.append(line)
    return lines
