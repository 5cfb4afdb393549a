"""Read every export file of one provider, detect each file's format, and
return the normalised line items."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, replace

from keel_pdp.reconcile.adapters import anthropic, generic, openai
from keel_pdp.reconcile.adapters.common import DuplicateGuard, csv_header, load_json, read_text
from keel_pdp.reconcile.adapters.pagination import PageChain
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import ProviderLine
from keel_pdp.reconcile.period import Period

PROVIDERS = ("openai", "anthropic", "csv")
_EXPECTED = {
    "openai": "an Usage API completions page, a Costs API page, or the usage dashboard's "
              "usage or cost CSV",
    "anthropic": "an Admin API messages usage report, a cost report, a cost analytics export, "
                 "or the console's usage or cost CSV",
}


def _empty_pages(text: str) -> bool:
    """A report page (or a list of pages) whose time buckets hold no results:
    the days of a paginated pull without usage. Neither usage nor cost fields
    appear in it, and it carries no line item."""
    if not text.lstrip().startswith(("{", "[")):
        return False
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    pages = doc if isinstance(doc, list) else [doc]
    return bool(pages) and all(
        isinstance(page, dict) and isinstance(page.get("data"), list)
        and all(isinstance(b, dict) and b.get("results") == [] for b in page["data"])
        for page in pages)


@dataclass(frozen=True, slots=True)
class ImportedFile:
    path: pathlib.Path
    fmt: str
    lines: int


@dataclass(frozen=True, slots=True)
class ImportResult:
    provider: str  # the provider name internal lines are matched on
    lines: list[ProviderLine]
    files: list[ImportedFile]


def import_exports(provider: str, paths: list[pathlib.Path], period: Period,
                   aliases: dict[str, str], column_map: generic.ColumnMap | None
                   ) -> ImportResult:
    if provider not in PROVIDERS:
        raise InputError("--provider", f"must be one of {', '.join(PROVIDERS)}")
    if provider == "csv" and column_map is None:
        raise InputError("--column-map", "--provider csv needs a column-mapping file")
    guard = DuplicateGuard()
    chain = PageChain()
    lines: list[ProviderLine] = []
    files: list[ImportedFile] = []
    for path in paths:
        text = read_text(path)
        if not text.strip():
            raise InputError(str(path), "empty file")
        parsed: list[ProviderLine]
        fmt: str | None = None
        if provider == "openai":
            fmt = openai.detect(path, text)
        elif provider == "anthropic":
            fmt = anthropic.detect(path, text)
        if fmt is not None and provider == "openai":
            parsed = openai.parse(path, text, fmt, period, aliases, guard)
        elif fmt is not None:
            parsed = anthropic.parse(path, text, fmt, period, aliases, guard)
        elif column_map is not None and (provider == "csv" or generic.matches(column_map, text)):
            fmt = "csv"
            parsed = generic.parse(path, text, column_map, period, aliases, guard)
        elif provider != "csv" and _empty_pages(text):
            fmt, parsed = "empty-pages", []
        else:
            if text.lstrip().startswith(("{", "[")):
                load_json(path, text)  # a broken JSON file: say where it breaks
            header = csv_header(text) if not text.lstrip().startswith(("{", "[")) else []
            shown = f" (header: {', '.join(header[:12])})" if header else ""
            raise InputError(str(path), f"not a recognised {provider} export{shown}; expected "
                             f"{_EXPECTED[provider]}, or pass --column-map for other CSV files")
        costs = [ln.precision_micros for ln in parsed if ln.cost_micros is not None]
        if costs:
            finest = min(costs)
            parsed = [replace(ln, precision_micros=finest) for ln in parsed]
        chain.add(path, fmt, text)
        lines += parsed
        files.append(ImportedFile(path, fmt, len(parsed)))
    chain.check(period)
    if not lines:
        raise InputError(", ".join(str(p) for p in paths),
                         f"the exports hold no line items for {period}: an empty month "
                         "cannot be reconciled; check that the pull covers the month")
    if not any(ln.cost_micros is not None for ln in lines):
        raise InputError(", ".join(str(p) for p in paths),
                         "no amounts in the exports: usage reports carry tokens, not money; "
                         "add the cost export (OpenAI Costs API / cost CSV, Anthropic cost "
                         "report / cost CSV)")
    name = column_map.provider if provider == "csv" and column_map is not None else provider
    return ImportResult(name, lines, files)
