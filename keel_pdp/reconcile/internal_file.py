"""The internal side from an export file (CSV with a header, or JSON lines).

Every bad value is an ``InputError`` naming the file, the row and the column; a
permit id seen twice is refused (a request would be counted twice).
"""

from __future__ import annotations

import io
import json
import pathlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from keel_pdp.csv_cells import csv_text
from keel_pdp.reconcile.adapters.common import as_count, csv_header, read_csv, read_text
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.internal_line import InternalUsageLine, in_window
from keel_pdp.reconcile.model import service_tier_name
from keel_pdp.reconcile.money import parse_decimal, to_micros
from keel_pdp.reconcile.period import Period


class FileInternalSource:
    """An internal usage export: CSV with a header, or JSON lines (``.jsonl``).

    Timestamps: ``ts_ms`` (epoch milliseconds) or ``ts`` (ISO 8601; a timestamp
    without an offset is read in ``tz``, UTC by default). Cost: ``cost_micros``
    or ``cost_usd`` (a decimal string), optionally with the four per-type cost
    columns. ``service_tier`` (optional): the tier the provider billed the request
    at (``default`` or ``standard``, ``batch``, ``flex``, ``priority``, ...); empty,
    absent or ``auto``: not recorded.
    """

    def __init__(self, path: pathlib.Path, tz: str = "UTC") -> None:
        self.path = path
        try:
            self.tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise InputError("--internal-tz", f"unknown time zone {tz!r}") from None
        self._lines: list[InternalUsageLine] | None = None

    @property
    def description(self) -> str:
        return f"internal usage export {self.path.name}"

    def lines_for_month(self, period: Period, pad_ms: int = 0) -> list[InternalUsageLine]:
        return [ln for ln in self.all_lines() if in_window(ln, period, pad_ms)]

    def all_lines(self) -> list[InternalUsageLine]:
        if self._lines is None:
            self._lines = self._load()
        return self._lines

    def _load(self) -> list[InternalUsageLine]:
        text = read_text(self.path)
        records: list[tuple[str, dict[str, Any]]] = []
        if self.path.suffix.lower() in (".jsonl", ".ndjson"):
            for number, raw in enumerate(io.StringIO(text), start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw, parse_float=Decimal)
                except json.JSONDecodeError as exc:
                    raise InputError(str(self.path), f"not valid JSON: {exc.msg}",
                                     where=f"line {number}") from None
                if not isinstance(obj, dict):
                    raise InputError(str(self.path), "each line must be a JSON object",
                                     where=f"line {number}")
                records.append((f"line {number}", obj))
        else:
            required = ("tenant", "workload", "provider", "model", "input_tokens",
                        "output_tokens")
            _, rows = read_csv(self.path, text, required)
            header = set(csv_header(text))
            if not ({"ts", "ts_ms"} & header):
                raise InputError(str(self.path), "missing a timestamp column: 'ts_ms' (epoch "
                                 "milliseconds) or 'ts' (ISO 8601)", where="row 1")
            if not ({"cost_micros", "cost_usd"} & header):
                raise InputError(str(self.path), "missing a cost column: 'cost_micros' or "
                                 "'cost_usd'", where="row 1")
            # Cells kept as text against formula injection (this product's own
            # internal_usage.csv) read back to the exact names.
            records = [(r.where, {k: csv_text(v) for k, v in r.values.items()})
                       for r in rows]
        lines: list[InternalUsageLine] = []
        seen: dict[str, str] = {}
        for where, rec in records:
            line = self._line(where, rec)
            if line.permit_id:
                first = seen.get(line.permit_id)
                if first is not None:
                    raise InputError(str(self.path), f"duplicate permit_id {line.permit_id!r} "
                                     f"(first at {first}): a request would be counted twice",
                                     where=where, column="permit_id")
                seen[line.permit_id] = where
            lines.append(line)
        return lines

    def _ts(self, where: str, rec: dict[str, Any]) -> int:
        if rec.get("ts_ms") not in (None, ""):
            return as_count(self.path, rec.get("ts_ms"), where, "ts_ms", optional=False)
        text = str(rec.get("ts") or "").strip()
        if not text:
            raise InputError(str(self.path), "timestamp is missing", where=where, column="ts")
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(str(self.path), f"{text!r} is not an ISO 8601 timestamp",
                             where=where, column="ts") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=self.tz)
        return int(parsed.astimezone(UTC).timestamp() * 1000)

    def _tier(self, where: str, rec: dict[str, Any]) -> str:
        try:
            return service_tier_name(rec.get("service_tier"))
        except ValueError as exc:
            raise InputError(str(self.path), f"{exc} (a tier name such as default, batch, "
                             "flex or priority, or empty when not recorded)", where=where,
                             column="service_tier") from None

    def _line(self, where: str, rec: dict[str, Any]) -> InternalUsageLine:
        path = self.path

        def text(name: str, required: bool = False) -> str:
            value = rec.get(name)
            out = "" if value is None else str(value).strip()
            if required and not out:
                raise InputError(str(path), "value is missing", where=where, column=name)
            return out

        def count(name: str, required: bool = False) -> int:
            return as_count(path, rec.get(name), where, name, optional=not required)

        def opt_micros(name: str) -> int | None:
            value = rec.get(name)
            if value is None or str(value).strip() == "":
                return None
            return _micros_int(path, value, where, name)

        if rec.get("cost_micros") not in (None, ""):
            cost = _micros_int(path, rec.get("cost_micros"), where, "cost_micros")
        elif rec.get("cost_usd") not in (None, ""):
            try:
                cost = to_micros(parse_decimal(rec.get("cost_usd")))
            except ValueError as exc:
                raise InputError(str(path), str(exc), where=where, column="cost_usd") from None
        else:
            raise InputError(str(path), "cost is missing ('cost_micros' or 'cost_usd')",
                             where=where, column="cost_micros")
        line = InternalUsageLine(
            ts_ms=self._ts(where, rec), tenant=text("tenant", True),
            workload=text("workload", True), provider=text("provider", True),
            model=text("model", True), input_tokens=count("input_tokens", True),
            cached_input_tokens=count("cached_input_tokens"),
            cache_write_tokens=count("cache_write_tokens"),
            output_tokens=count("output_tokens", True),
            reasoning_tokens=count("reasoning_tokens"), cost_micros=cost,
            input_cost_micros=opt_micros("input_cost_micros"),
            cached_input_cost_micros=opt_micros("cached_input_cost_micros"),
            cache_write_cost_micros=opt_micros("cache_write_cost_micros"),
            output_cost_micros=opt_micros("output_cost_micros"),
            permit_id=text("permit_id"), status=text("status") or "ok",
            account=text("account"), api_key=text("api_key"),
            error_type=text("error_type"),
            cache_write_1h_tokens=count("cache_write_1h_tokens"),
            cache_write_1h_cost_micros=opt_micros("cache_write_1h_cost_micros"),
            service_tier=self._tier(where, rec),
        )
        problems = line.problems()
        if problems:
            raise InputError(str(path), "; ".join(problems), where=where)
        return line


def _micros_int(path: pathlib.Path, value: Any, where: str, column: str) -> int:
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    if isinstance(value, bool) or (not isinstance(value, int) and not str(value).strip()
                                   .lstrip("-").isdigit()):
        raise InputError(str(path), f"{value!r} is not an integer number of micro-USD",
                         where=where, column=column)
    return int(value)
