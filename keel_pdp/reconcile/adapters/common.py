"""Shared parsing for export files: CSV rows with line numbers, JSON pages
with exact decimals, integer token counts, the period check, duplicates."""

from __future__ import annotations

import csv
import io
import json
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.period import Period

MAX_EXPORT_BYTES = 512 * 1024 * 1024
_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class CsvRow:
    number: int  # line number in the file, the header being line 1
    values: dict[str, str]

    @property
    def where(self) -> str:
        return f"row {self.number}"


def read_text(path: pathlib.Path) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(str(path), f"cannot read the file ({exc.strerror})") from exc
    if size > MAX_EXPORT_BYTES:
        raise InputError(str(path), f"file is larger than {MAX_EXPORT_BYTES} bytes")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text (byte {exc.start})") from exc


def load_yaml_model(path: pathlib.Path, model: type[_M], expected: str) -> _M:
    """A YAML file validated as ``model``; every failure is an InputError naming
    the file and, for a bad field, its path. ``expected`` says what the top
    level must hold."""
    text = read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(str(path), f"expected a YAML mapping {expected}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise InputError(str(path), err["msg"], where=field or "(top level)") from None


def csv_header(text: str) -> list[str]:
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        if any(cell.strip() for cell in row):
            return [cell.strip() for cell in row]
    return []


def read_csv(path: pathlib.Path, text: str, required: Sequence[str],
             delimiter: str = ",") -> tuple[list[str], list[CsvRow]]:
    """Rows as dicts keyed by stripped header names; checks required columns."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[CsvRow] = []
    for cells in reader:
        if header is None:
            if not any(c.strip() for c in cells):
                continue
            header = [c.strip() for c in cells]
            dupes = sorted({h for h in header if header.count(h) > 1 and h})
            if dupes:
                raise InputError(str(path), f"header repeats column(s) {', '.join(dupes)}",
                                 where="row 1")
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(
                    str(path),
                    f"missing required column(s) {', '.join(repr(m) for m in missing)}; "
                    f"the header has {', '.join(header)}",
                    where=f"row {reader.line_num}",
                )
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            raise InputError(str(path), f"has {len(cells)} fields but the header has "
                             f"{len(header)}", where=f"row {reader.line_num}")
        values = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}
        rows.append(CsvRow(reader.line_num, values))
    if header is None:
        raise InputError(str(path), "empty file: no header row")
    return header, rows


def load_json(path: pathlib.Path, text: str) -> Any:
    """JSON with every non-integer number parsed as ``Decimal`` (never float)."""
    try:
        return json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"not valid JSON: {exc.msg}",
                         where=f"line {exc.lineno} column {exc.colno}") from exc


def pages(path: pathlib.Path, doc: Any) -> list[dict[str, Any]]:
    """A report page, a list of pages, or JSON lines of pages -> list of pages."""
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list) and all(isinstance(p, dict) for p in doc):
        return list(doc)
    raise InputError(str(path), "expected a report page (an object with 'data') or a list "
                     "of pages")


def iter_buckets(path: pathlib.Path, doc: Any) -> Iterator[tuple[str, dict[str, Any],
                                                               list[tuple[str, dict[str, Any]]]]]:
    """(where, bucket, [(where, result)]) over every bucket of every page."""
    many = isinstance(doc, list)
    for p_index, page in enumerate(pages(path, doc)):
        prefix = f"[{p_index}]." if many else ""
        data = page.get("data")
        if not isinstance(data, list):
            raise InputError(str(path), "missing the 'data' list of time buckets",
                             where=f"{prefix}data")
        for b_index, bucket in enumerate(data):
            where = f"{prefix}data[{b_index}]"
            if not isinstance(bucket, dict):
                raise InputError(str(path), "a time bucket must be an object", where=where)
            results = bucket.get("results")
            if not isinstance(results, list):
                raise InputError(str(path), "missing the 'results' list", where=f"{where}.results")
            items: list[tuple[str, dict[str, Any]]] = []
            for r_index, result in enumerate(results):
                if not isinstance(result, dict):
                    raise InputError(str(path), "a result must be an object",
                                     where=f"{where}.results[{r_index}]")
                items.append((f"{where}.results[{r_index}]", result))
            yield where, bucket, items


def as_count(path: pathlib.Path, value: Any, where: str, column: str = "",
             *, optional: bool = True) -> int:
    """A token or request count: an integer, or an integral decimal ("59200.0")."""
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)  # the common case, without a Decimal
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return 0
        raise InputError(str(path), "value is missing", where=where, column=column)
    if isinstance(value, bool):
        raise InputError(str(path), f"{value!r} is not a count", where=where, column=column)
    if isinstance(value, int):
        number = Decimal(value)
    else:
        try:
            number = Decimal(str(value).strip().replace(",", ""))
        except InvalidOperation:
            raise InputError(str(path), f"{value!r} is not a count", where=where,
                             column=column) from None
    if not number.is_finite() or number != number.to_integral_value():
        raise InputError(str(path), f"{value!r} is not a whole number", where=where,
                         column=column)
    if number < 0:
        raise InputError(str(path), f"{value!r} must not be negative", where=where,
                         column=column)
    return int(number)


def text_field(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def day_place(where: str, column: str, json_path: str | None) -> tuple[str, str]:
    """Where to point a date error: the CSV row and column, or the JSON path."""
    return (json_path, "") if json_path else (where, column)


def parse_day(path: pathlib.Path, value: Any, where: str, column: str) -> date:
    """A UTC day from unix seconds, an ISO date or an ISO timestamp."""
    text = text_field(value)
    if not text:
        raise InputError(str(path), "date is missing", where=where, column=column)
    try:
        if text.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(text), tz=UTC).date()
        if len(text) == 10:
            return date.fromisoformat(text)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC).date()
    except (ValueError, OverflowError, OSError):
        raise InputError(str(path), f"{text!r} is not a date or timestamp", where=where,
                         column=column) from None


def check_in_period(path: pathlib.Path, day: date, period: Period, where: str,
                    column: str) -> None:
    if not period.contains(day):
        raise InputError(
            str(path),
            f"{day.isoformat()} is outside the period {period} (wrong month: export the "
            f"{period} window, {period.first_day.isoformat()} to {period.last_day.isoformat()} "
            "UTC)",
            where=where, column=column,
        )


def check_currency(path: pathlib.Path, value: Any, where: str, column: str,
                   expected: str = "USD") -> None:
    text = text_field(value)
    if text.upper() != expected.upper():
        raise InputError(
            str(path),
            f"currency {text or '(empty)'!r} is not {expected}: amounts in another currency "
            "cannot be reconciled against USD telemetry",
            where=where, column=column,
        )


class DuplicateGuard:
    """Rejects a second row with the same identifying key, naming both places."""

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], str] = {}

    def check(self, path: pathlib.Path, key: tuple[object, ...], where: str) -> None:
        # One spelling per value, so a JSON page and its dashboard CSV collide.
        key = tuple("" if k is None else str(k).strip().lower() for k in key)
        place = f"{path}: {where}"
        first = self._seen.get(key)
        if first is not None:
            raise InputError(str(path), f"duplicate row: same key as {first} "
                             f"({', '.join(str(k) for k in key if k not in ('', None))})",
                             where=where)
        self._seen[key] = place
