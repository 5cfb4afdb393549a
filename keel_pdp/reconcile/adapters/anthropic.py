"""Anthropic exports: the Admin API messages usage report and cost report, and
the console's usage and cost CSV downloads.

Usage report results carry ``uncached_input_tokens``, ``cache_read_input_tokens``,
``cache_creation.ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens``,
``output_tokens`` and, when grouped, ``workspace_id``, ``api_key_id`` and
``model`` (a null workspace is the default workspace). Cost report results carry
``amount`` as a decimal string in the lowest currency unit (cents: "123.45" is
$1.2345), ``currency``, ``cost_type`` (tokens, web_search, code_execution) and,
when grouped by description, ``model`` and ``token_type``. Buckets are daily,
``starting_at`` inclusive, RFC 3339 in UTC.

The console CSVs use names rather than ids (workspace and API key names, model
display names such as "Claude Sonnet 4.5"); the mapping file resolves workspace
names, and model names are normalised. Console costs are in US dollars.

Service tiers: API rows carry ``service_tier`` (``standard``, ``batch``,
``priority``); console CSVs carry ``usage_type`` (``standard`` or ``batch`` in
the usage download; ``message`` is the standard tier in the cost download). A
cost row without either names the tier in its description ("Claude Sonnet 4.5
Batch Usage - ...") or is left for reconciliation to resolve ("").
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
    pages,
    parse_day,
    read_csv,
    text_field,
)
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import (
    CACHE_WRITE,
    CACHE_WRITE_1H,
    CACHED_INPUT,
    DEFAULT_ACCOUNT,
    INPUT,
    LONG_CONTEXT,
    OUTPUT,
    STANDARD_TIER,
    USAGE,
    WEB_SEARCH,
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

USAGE_CSV_REQUIRED = ("usage_date_utc", "model_version", "workspace",
                      "usage_input_tokens_no_cache", "usage_input_tokens_cache_read",
                      "usage_output_tokens")
COST_CSV_REQUIRED = ("usage_date_utc", "model", "workspace", "token_type", "cost_usd")
_API_TOKEN_TYPES = {
    "uncached_input_tokens": INPUT,
    "cache_read_input_tokens": CACHED_INPUT,
    "cache_creation.ephemeral_5m_input_tokens": CACHE_WRITE,
    "cache_creation.ephemeral_1h_input_tokens": CACHE_WRITE_1H,
    "output_tokens": OUTPUT,
}
_CONSOLE_TOKEN_TYPES = {
    "input_no_cache": INPUT,
    "input_cache_read": CACHED_INPUT,
    "input_cache_write_5m": CACHE_WRITE,
    "input_cache_write_1h": CACHE_WRITE_1H,
    "output": OUTPUT,
}


def detect(path: pathlib.Path, text: str) -> str | None:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) and '"list_amount"' in text:
        return "analytics-json"
    if stripped.startswith(("{", "[")):
        if '"uncached_input_tokens"' in text and '"amount"' not in text:
            return "usage-json"
        if '"amount"' in text and '"starting_at"' in text:
            return "cost-json"
        return None
    header = set(csv_header(text))
    if "usage_input_tokens_no_cache" in header:
        return "usage-csv"
    if {"cost_usd", "token_type", "usage_date_utc"} <= header:
        return "cost-csv"
    return None


# Tiers a cost description names ("Claude Sonnet 4.5 Batch Usage - Input Tokens").
_DESCRIBED_TIER = re.compile(r"\b(batch|priority|flex)\b", re.IGNORECASE)
# The console cost download's usage_type for the standard Messages API.
_CONSOLE_STANDARD = ("message", "messages")


def _service_tier(path: pathlib.Path, value: Any, where: str, column: str = "",
                  description: str = "") -> str:
    """A row's tier: its ``service_tier`` (or console ``usage_type``), else the tier
    its description names; "" when neither says."""
    if isinstance(value, str) and value.strip().lower() in _CONSOLE_STANDARD:
        return STANDARD_TIER
    try:
        tier = service_tier_name(value)
    except ValueError as exc:
        raise InputError(str(path), str(exc), where=where, column=column) from None
    if not tier and description:
        found = _DESCRIBED_TIER.search(description)
        if found is not None:
            tier = found.group(1).lower()
    return tier


def _workspace(value: Any) -> str:
    text = text_field(value)
    if not text or text.lower() == "default":
        return DEFAULT_ACCOUNT
    return text


def _usage(path: pathlib.Path, period: Period, aliases: dict[str, str], where: str,
           day_value: Any, day_column: str, model_raw: str, workspace: Any, api_key: Any,
           counts: dict[str, int], searches: int, json_day: str | None = None,
           service_tier: str = "") -> list[ProviderLine]:
    day_where, day_col = day_place(where, day_column, json_day)
    day = parse_day(path, day_value, day_where, day_col)
    check_in_period(path, day, period, day_where, day_col)
    if not model_raw and any(counts.values()):
        raise InputError(str(path), "usage without a model: export grouped by model",
                         where=where)
    base = ProviderLine(day=day, account=_workspace(workspace),
                        model=normalise_model(model_raw, aliases), token_type=INPUT,
                        tokens=counts[INPUT], cost_micros=None, api_key=text_field(api_key),
                        source=str(path), where=where, service_tier=service_tier)
    out = [base]
    for token_type in (CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H, OUTPUT):
        out.append(replace(base, token_type=token_type, tokens=counts[token_type]))
    if searches:
        # The cost report prices web search per workspace, without a model.
        out.append(replace(base, model="", token_type=WEB_SEARCH, tokens=searches))
    return out


def _cost(path: pathlib.Path, period: Period, aliases: dict[str, str], where: str,
          day_value: Any, day_column: str, amount: Any, amount_where: tuple[str, str],
          unit_micros: int, model_raw: str, token_type_raw: str, cost_type: str,
          workspace: Any, description: str, api_key: str,
          mapping: dict[str, str], json_day: str | None = None, context_window: Any = None,
          service_tier: str = "") -> ProviderLine:
    day_where, day_col = day_place(where, day_column, json_day)
    day = parse_day(path, day_value, day_where, day_col)
    check_in_period(path, day, period, day_where, day_col)
    try:
        value = parse_decimal(amount)
    except ValueError as exc:
        raise InputError(str(path), str(exc), where=amount_where[0],
                         column=amount_where[1]) from None
    micros = to_micros(value, unit_micros)
    text = description or " ".join(dict.fromkeys(
        x for x in (model_raw, token_type_raw, cost_type) if x))
    kind, belongs = classify(text, micros, bool(model_raw), period)
    if kind != USAGE:
        token_type = kind
    elif cost_type and cost_type not in ("tokens", "token"):
        token_type = slug(cost_type)
    elif token_type_raw:
        token_type = mapping.get(token_type_raw, slug(token_type_raw))
    else:
        raise InputError(str(path), "a token cost without model and token_type: export the "
                         "cost report grouped by description (group_by[]=description)",
                         where=where)
    if kind == USAGE and token_type in mapping.values() and not model_raw:
        raise InputError(str(path), "a token cost without a model: export the cost report "
                         "grouped by description", where=where)
    return ProviderLine(
        day=day, account=_workspace(workspace),
        model=normalise_model(model_raw, aliases) if kind == USAGE and model_raw else "",
        token_type=token_type, tokens=None, cost_micros=micros, kind=kind, belongs_to=belongs,
        description=text, api_key=api_key, source=str(path), where=where,
        precision_micros=quantum_micros(value, unit_micros),
        service_tier=service_tier if kind == USAGE else "",
        **_tier(context_window if kind == USAGE else None),
    )


def _tier(context_window: Any) -> dict[str, Any]:
    """``context_window`` "0-200k" is the normal tier; "200k-1M" the long-context one."""
    text = text_field(context_window).lower().replace(" ", "")
    low = text.split("-", 1)[0] if "-" in text else ""
    scale = {"k": 1_000, "m": 1_000_000}
    if not low or low == "0":
        return {}
    try:
        number = int(low[:-1]) * scale[low[-1]] if low[-1] in scale else int(low)
    except ValueError:
        return {}
    return {"tier": LONG_CONTEXT, "tier_from": number} if number > 0 else {}


def _analytics_rows(path: pathlib.Path, doc: Any
                    ) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(where, day path, day value, flat row) of a cost analytics export: items
    ``{starting_at, ending_at, group: {...}, cost: {amount, list_amount, ...}}``,
    or bucketed pages ``data[].results[]`` with the same fields flat."""
    out: list[tuple[str, str, Any, dict[str, Any]]] = []
    many = isinstance(doc, list)
    for p_index, page in enumerate(pages(path, doc)):
        prefix = f"[{p_index}]." if many else ""
        data = page.get("data")
        if not isinstance(data, list):
            raise InputError(str(path), "missing the 'data' list", where=f"{prefix}data")
        for i, item in enumerate(data):
            where = f"{prefix}data[{i}]"
            if not isinstance(item, dict):
                raise InputError(str(path), "an item must be an object", where=where)
            if isinstance(item.get("results"), list):
                for j, r in enumerate(item["results"]):
                    if not isinstance(r, dict):
                        raise InputError(str(path), "a result must be an object",
                                         where=f"{where}.results[{j}]")
                    out.append((f"{where}.results[{j}]", f"{where}.starting_at",
                                item.get("starting_at"), r))
                continue
            group, cost = item.get("group") or {}, item.get("cost")
            if not isinstance(cost, dict) or not isinstance(group, dict):
                raise InputError(str(path), "an item needs a 'cost' object (and a 'group' "
                                 "object when grouped)", where=f"{where}.cost")
            out.append((where, f"{where}.starting_at", item.get("starting_at"),
                        {**group, **cost, "_cost_path": f"{where}.cost"}))
    return out


def _analytics(path: pathlib.Path, text: str, period: Period, aliases: dict[str, str],
               guard: DuplicateGuard) -> list[ProviderLine]:
    lines: list[ProviderLine] = []
    for where, day_where, start, r in _analytics_rows(path, load_json(path, text)):
        at = str(r.get("_cost_path") or where)
        guard.check(path, ("anthropic-analytics", start, r.get("workspace_id"),
                           r.get("api_key_id"), r.get("model"), r.get("token_type"),
                           r.get("cost_type"), r.get("service_tier"),
                           r.get("context_window"), r.get("inference_geo"), r.get("speed"),
                           r.get("product"), r.get("description")), where)
        if "amount" not in r:
            raise InputError(str(path), "missing 'amount'", where=f"{at}.amount")
        check_currency(path, r.get("currency"), f"{at}.currency", "")
        model = text_field(r.get("model"))
        token_type = text_field(r.get("token_type"))
        description = text_field(r.get("description"))
        listed = text_field(r.get("list_amount"))
        if not description:
            description = " ".join(x for x in (model, token_type) if x)
            if listed and listed != text_field(r.get("amount")):
                description += f" (list {listed} cents)"
        tier_at = (f"{where}.group.service_tier" if "_cost_path" in r
                   else f"{where}.service_tier")
        lines.append(_cost(path, period, aliases, where, start, "", r.get("amount"),
                           (f"{at}.amount", ""), MICROS_PER_CENT, model, token_type,
                           text_field(r.get("cost_type")), r.get("workspace_id"),
                           description, text_field(r.get("api_key_id")), _API_TOKEN_TYPES,
                           day_where, r.get("context_window"),
                           _service_tier(path, r.get("service_tier"), tier_at,
                                         description=description)))
    return lines


def parse(path: pathlib.Path, text: str, fmt: str, period: Period, aliases: dict[str, str],
          guard: DuplicateGuard) -> list[ProviderLine]:
    if fmt == "analytics-json":
        return _analytics(path, text, period, aliases, guard)
    lines: list[ProviderLine] = []
    if fmt in ("usage-json", "cost-json"):
        doc = load_json(path, text)
        for b_where, bucket, results in iter_buckets(path, doc):
            if not results:
                continue
            start = bucket.get("starting_at")
            for r_where, r in results:
                if fmt == "usage-json":
                    guard.check(path, ("anthropic-usage", start, r.get("workspace_id"),
                                       r.get("api_key_id"), r.get("model"),
                                       r.get("service_tier"), r.get("context_window"),
                                       r.get("inference_geo"), r.get("speed"),
                                       r.get("account_id"), r.get("service_account_id")),
                                r_where)
                    creation = r.get("cache_creation")
                    creation = creation if isinstance(creation, dict) else {}
                    write = as_count(path, creation.get("ephemeral_5m_input_tokens",
                                                        r.get("cache_creation_5m_input_tokens")),
                                     f"{r_where}.cache_creation.ephemeral_5m_input_tokens")
                    write_1h = as_count(path, creation.get(
                        "ephemeral_1h_input_tokens", r.get("cache_creation_1h_input_tokens")),
                        f"{r_where}.cache_creation.ephemeral_1h_input_tokens")
                    tools = r.get("server_tool_use")
                    tools = tools if isinstance(tools, dict) else {}
                    counts = {
                        INPUT: as_count(path, r.get("uncached_input_tokens"),
                                        f"{r_where}.uncached_input_tokens", optional=False),
                        CACHED_INPUT: as_count(path, r.get("cache_read_input_tokens"),
                                               f"{r_where}.cache_read_input_tokens"),
                        CACHE_WRITE: write,
                        CACHE_WRITE_1H: write_1h,
                        OUTPUT: as_count(path, r.get("output_tokens"),
                                         f"{r_where}.output_tokens", optional=False),
                    }
                    lines += _usage(path, period, aliases, r_where, start,
                                    "", text_field(r.get("model")), r.get("workspace_id"),
                                    r.get("api_key_id"), counts,
                                    as_count(path, tools.get("web_search_requests"),
                                             f"{r_where}.server_tool_use.web_search_requests"),
                                    f"{b_where}.starting_at",
                                    _service_tier(path, r.get("service_tier"),
                                                  f"{r_where}.service_tier"))
                else:
                    guard.check(path, ("anthropic-cost", start, r.get("workspace_id"),
                                       r.get("description"), r.get("model"),
                                       r.get("token_type"), r.get("cost_type"),
                                       r.get("service_tier"), r.get("context_window"),
                                       r.get("inference_geo"), r.get("speed")), r_where)
                    if "amount" not in r:
                        raise InputError(str(path), "missing 'amount'", where=f"{r_where}.amount")
                    check_currency(path, r.get("currency"), f"{r_where}.currency", "")
                    lines.append(_cost(
                        path, period, aliases, r_where, start, "", r.get("amount"),
                        (f"{r_where}.amount", ""), MICROS_PER_CENT,
                        text_field(r.get("model")), text_field(r.get("token_type")),
                        text_field(r.get("cost_type")), r.get("workspace_id"),
                        text_field(r.get("description")), "", _API_TOKEN_TYPES,
                        f"{b_where}.starting_at", r.get("context_window"),
                        _service_tier(path, r.get("service_tier"), f"{r_where}.service_tier",
                                      description=text_field(r.get("description")))))
        return lines
    if fmt == "usage-csv":
        _, rows = read_csv(path, text, USAGE_CSV_REQUIRED)
        for row in rows:
            v = row.values
            guard.check(path, ("anthropic-usage-csv", v.get("usage_date_utc"),
                               v.get("model_version"), v.get("api_key"), v.get("workspace"),
                               v.get("usage_type"), v.get("context_window"),
                               v.get("inference_geo"), v.get("speed")), row.where)

            def count(column: str, row_values: dict[str, str] = v, where: str = row.where
                      ) -> int:
                return as_count(path, row_values.get(column), where, column)

            counts = {
                INPUT: count("usage_input_tokens_no_cache"),
                CACHED_INPUT: count("usage_input_tokens_cache_read"),
                CACHE_WRITE: count("usage_input_tokens_cache_write_5m"),
                CACHE_WRITE_1H: count("usage_input_tokens_cache_write_1h"),
                OUTPUT: count("usage_output_tokens"),
            }
            lines += _usage(path, period, aliases, row.where, v.get("usage_date_utc"),
                            "usage_date_utc", v.get("model_version", ""), v.get("workspace"),
                            v.get("api_key"), counts, count("web_search_count"),
                            service_tier=_console_tier(path, v, row.where))
        return lines
    _, rows = read_csv(path, text, COST_CSV_REQUIRED)
    for row in rows:
        v = row.values
        if "currency" in v:
            check_currency(path, v.get("currency"), row.where, "currency")
        guard.check(path, ("anthropic-cost-csv", v.get("usage_date_utc"), v.get("model"),
                           v.get("workspace"), v.get("api_key"), v.get("usage_type"),
                           v.get("context_window"), v.get("token_type"), v.get("cost_type"),
                           v.get("inference_geo"), v.get("speed")), row.where)
        lines.append(_cost(
            path, period, aliases, row.where, v.get("usage_date_utc"), "usage_date_utc",
            v.get("cost_usd"), (row.where, "cost_usd"), MICROS_PER_USD, v.get("model", ""),
            v.get("token_type", ""), v.get("cost_type", ""), v.get("workspace"),
            v.get("description", ""), v.get("api_key_id") or v.get("api_key", ""),
            _CONSOLE_TOKEN_TYPES, None, v.get("context_window"),
            _console_tier(path, v, row.where, v.get("description", ""))))
    return lines


def _console_tier(path: pathlib.Path, v: dict[str, str], where: str,
                  description: str = "") -> str:
    """A console row's tier. Console columns hold display words, so they are read
    as a slug ("Message Batch" is ``message_batch``, the batch tier)."""
    column = "service_tier" if v.get("service_tier") else "usage_type"
    word = slug(v.get(column) or "")
    if "batch" in word.split("_"):
        word = "batch"
    return _service_tier(path, word, where, column, description)
