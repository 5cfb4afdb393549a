"""The internal side: usage the gateway recorded, one line per settled request.

``InternalUsageLine`` is what reconciliation needs from the ledger's settlement
entries (or from any telemetry export): when, for whom, which model, tokens by
type and the cost the gateway booked. ``InternalSource`` returns the lines of a
UTC month (plus a margin either side, so calls stamped across the month
boundary can be recognised). Two sources exist: an export file (CSV or JSON
lines) and the ledger store (``from_ledger``).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import pathlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from keel_pdp.money import micros_half_even
from keel_pdp.reconcile.adapters.common import as_count, csv_header, read_csv, read_text
from keel_pdp.reconcile.errors import InputError, ReconcileError
from keel_pdp.reconcile.model import CACHE_WRITE, CACHE_WRITE_1H, CACHED_INPUT, INPUT, OUTPUT
from keel_pdp.reconcile.money import parse_decimal, split_exact, to_micros
from keel_pdp.reconcile.period import Period, iso_ms
from keel_pdp.reconcile.prices import PriceBook, split_cost

COST_COLUMNS = {
    INPUT: "input_cost_micros",
    CACHED_INPUT: "cached_input_cost_micros",
    CACHE_WRITE: "cache_write_cost_micros",
    OUTPUT: "output_cost_micros",
}
EXPORT_COLUMNS = (
    "ts", "ts_ms", "tenant", "workload", "provider", "account", "api_key", "model",
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
    "output_tokens", "reasoning_tokens", "cost_micros", *COST_COLUMNS.values(),
    "cache_write_1h_cost_micros", "status", "error_type",
    "permit_id",
)


@dataclass(frozen=True, slots=True)
class InternalUsageLine:
    """One settled request as the gateway recorded it.

    Tokens follow Keel's convention: ``input_tokens`` includes cached and
    cache-write tokens, ``output_tokens`` includes reasoning tokens. Cost is the
    booked total in micro-USD; the per-type costs are given when the source
    has them (all four or none).
    """

    ts_ms: int
    tenant: str
    workload: str
    provider: str
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    input_cost_micros: int | None = None
    cached_input_cost_micros: int | None = None
    cache_write_cost_micros: int | None = None
    output_cost_micros: int | None = None
    permit_id: str = ""
    status: str = "ok"
    account: str = ""  # provider project / workspace when the telemetry knows it
    api_key: str = ""
    error_type: str = ""  # free text: client_disconnected, overloaded_error, ...
    # Of cache_write_tokens (and their cost), the 1-hour cache writes.
    cache_write_1h_tokens: int = 0
    cache_write_1h_cost_micros: int | None = None

    @property
    def failed(self) -> bool:
        """An attempt that did not complete (failed, cancelled, partial), or one the
        telemetry gave an error class."""
        return bool(self.error_type.strip()) or self.status.strip().lower() not in (
            "", "ok", "success", "succeeded", "settled", "outcome_unspecified")

    @property
    def request_id(self) -> str:
        return self.permit_id or f"{self.tenant}/{self.workload}@{iso_ms(self.ts_ms)}"

    def tokens_by_type(self) -> dict[str, int]:
        return {
            INPUT: self.input_tokens - self.cached_input_tokens - self.cache_write_tokens,
            CACHED_INPUT: self.cached_input_tokens,
            CACHE_WRITE: self.cache_write_tokens - self.cache_write_1h_tokens,
            CACHE_WRITE_1H: self.cache_write_1h_tokens,
            OUTPUT: self.output_tokens,
        }

    def has_type_costs(self) -> bool:
        return self.input_cost_micros is not None

    def costs_by_type(self, prices: PriceBook | None, model_key: str) -> dict[str, int]:
        if self.input_cost_micros is not None:
            write = self.cache_write_cost_micros or 0
            if self.cache_write_1h_cost_micros is not None:
                write_1h = self.cache_write_1h_cost_micros
            else:  # without its own figure, the 1-hour part by token count
                write_1h = split_exact(write, [
                    self.cache_write_tokens - self.cache_write_1h_tokens,
                    self.cache_write_1h_tokens])[1] if self.cache_write_tokens else 0
            return {
                INPUT: self.input_cost_micros,
                CACHED_INPUT: self.cached_input_cost_micros or 0,
                CACHE_WRITE: write - write_1h,
                CACHE_WRITE_1H: write_1h,
                OUTPUT: self.output_cost_micros or 0,
            }
        price = (prices.price_for(self.provider, model_key, self.ts_ms, self.input_tokens)
                 if prices is not None else None)
        if price is None:
            raise ReconcileError(
                f"internal line {self.permit_id or iso_ms(self.ts_ms)} ({self.provider}/"
                f"{self.model}) carries only a total cost; pass --prices with a price table "
                "that lists this model (or export the per-token-type costs)")
        return split_cost(self.cost_micros, price, self.tokens_by_type())

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            out.append("cached_input_tokens + cache_write_tokens exceed input_tokens "
                       "(input_tokens includes them)")
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            out.append("cache_write_1h_tokens exceed cache_write_tokens (cache_write_tokens "
                       "includes them)")
        if (self.cache_write_1h_cost_micros is not None
                and not 0 <= self.cache_write_1h_cost_micros
                <= (self.cache_write_cost_micros or 0)):
            out.append("cache_write_1h_cost_micros must be part of cache_write_cost_micros")
        if self.reasoning_tokens > self.output_tokens:
            out.append("reasoning_tokens exceed output_tokens (output_tokens includes them)")
        parts = [self.input_cost_micros, self.cached_input_cost_micros,
                 self.cache_write_cost_micros, self.output_cost_micros]
        given = [p for p in parts if p is not None]
        if given and len(given) != 4:
            out.append("give all four per-type cost columns or none")
        elif given and sum(given) != self.cost_micros:
            out.append(f"per-type costs add up to {sum(given)}, not cost_micros "
                       f"{self.cost_micros}")
        return out

    def as_row(self) -> dict[str, str]:
        def opt(v: int | None) -> str:
            return "" if v is None else str(v)

        return {
            "ts": iso_ms(self.ts_ms), "ts_ms": str(self.ts_ms), "tenant": self.tenant,
            "workload": self.workload, "provider": self.provider, "account": self.account,
            "api_key": self.api_key, "model": self.model,
            "input_tokens": str(self.input_tokens),
            "cached_input_tokens": str(self.cached_input_tokens),
            "cache_write_tokens": str(self.cache_write_tokens),
            "cache_write_1h_tokens": str(self.cache_write_1h_tokens),
            "cache_write_1h_cost_micros": opt(self.cache_write_1h_cost_micros),
            "output_tokens": str(self.output_tokens),
            "reasoning_tokens": str(self.reasoning_tokens),
            "cost_micros": str(self.cost_micros),
            "input_cost_micros": opt(self.input_cost_micros),
            "cached_input_cost_micros": opt(self.cached_input_cost_micros),
            "cache_write_cost_micros": opt(self.cache_write_cost_micros),
            "output_cost_micros": opt(self.output_cost_micros),
            "status": self.status, "error_type": self.error_type,
            "permit_id": self.permit_id,
        }


class InternalSource(Protocol):
    """Where the internal usage of a period comes from."""

    @property
    def description(self) -> str: ...

    def lines_for_month(self, period: Period, pad_ms: int = 0) -> list[InternalUsageLine]:
        """Lines with ``period.start - pad <= ts < period.end + pad`` (UTC)."""
        ...


def in_window(line: InternalUsageLine, period: Period, pad_ms: int) -> bool:
    return period.start_ms - pad_ms <= line.ts_ms < period.end_ms + pad_ms


class FileInternalSource:
    """An internal usage export: CSV with a header, or JSON lines (``.jsonl``).

    Timestamps: ``ts_ms`` (epoch milliseconds) or ``ts`` (ISO 8601; a timestamp
    without an offset is read in ``tz``, UTC by default). Cost: ``cost_micros``
    or ``cost_usd`` (a decimal string), optionally with the four per-type cost
    columns.
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
            records = [(r.where, dict(r.values)) for r in rows]
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


def write_export(lines: list[InternalUsageLine], path: pathlib.Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for line in sorted(lines, key=lambda ln: (ln.ts_ms, ln.permit_id)):
            writer.writerow(line.as_row())


# --------------------------------------------------------------------------- ledger adapter

# Settlement entries carry the dimensions of their permit, the provider-reported
# usage by token type, the actual cost (booked, rounded up to the micro-dollar,
# and exact, in pico-USD) and the closeout outcome; the permit entry carries the
# price (pico-USD per token) the gateway used, which splits the exact cost across
# token types.
_SETTLEMENTS_SQL = (
    "SELECT s.permit_id, s.ts_ms, s.tenant, s.workload, s.provider, s.model, "
    "s.input_tokens, s.cached_input_tokens, s.cache_write_tokens, s.output_tokens, "
    "s.reasoning_tokens, s.actual_micros, s.reason, s.detail, s.actual_pico, "
    "p.price_input_pico, p.price_cached_input_pico, p.price_cache_write_pico, "
    "p.price_output_pico "
    "FROM ledger_entries s LEFT JOIN ledger_entries p "
    "ON p.permit_id = s.permit_id AND p.kind = 'permit' "
    "WHERE s.kind = 'settlement' AND s.ts_ms >= ? AND s.ts_ms < ? "
    "ORDER BY s.ts_ms, s.permit_id"
)
_OK_OUTCOMES = ("", "ok", "succeeded", "outcome_unspecified")


class _RoundedOnce:
    """Exact amounts (pico-USD) summed per series and rounded once.

    A series is one tenant, workload, account, provider, model, UTC day and token
    type. Each request of a series is given the change of the series' running
    total, rounded half to even: the requests of any stretch of a series add up
    to its exact total rounded once, so the gateway rounding each request up to
    the micro-dollar does not pile up as a bias on the internal side (8.5 micro-USD
    embeddings are 8 and 9 in turn, not 9 each).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[Any, ...], int] = {}

    def take(self, key: tuple[Any, ...], pico: int) -> int:
        before = self.sums.get(key, 0)
        self.sums[key] = after = before + pico
        return micros_half_even(after) - micros_half_even(before)


def _ledger_line(row: tuple[Any, ...], once: _RoundedOnce | None = None) -> InternalUsageLine:
    (pid, ts, tenant, workload, provider, model, tin, tcached, twrite, tout, trsn, actual,
     outcome, raw_detail, actual_pico, *price) = row
    once = once or _RoundedOnce()
    tokens = {INPUT: int(tin) - int(tcached) - int(twrite), CACHED_INPUT: int(tcached),
              CACHE_WRITE: int(twrite), OUTPUT: int(tout)}
    # The exact cost; entries written before exact amounts: the booked one.
    exact = int(actual) * 1_000_000 if actual_pico is None else int(actual_pico)
    per_type_pico: dict[str, int] | None = None
    detail = _detail(raw_detail)
    costs = detail.get("costs")
    if isinstance(costs, dict) and all(isinstance(costs.get(t), int) for t in tokens):
        # An imported row carries the per-type costs its export had.
        per_type_pico = {t: int(costs[t]) * 1_000_000 for t in tokens}
    elif all(p is not None for p in price):
        rates = dict(zip((INPUT, CACHED_INPUT, CACHE_WRITE, OUTPUT),
                         (int(p) for p in price), strict=True))
        types = list(tokens)
        weights = [max(tokens[t], 0) * rates[t] for t in types]
        if sum(weights) > 0 or exact == 0:
            per_type_pico = dict(zip(types, split_exact(exact, weights), strict=True))
    series = (str(tenant), str(workload), str(detail.get("account") or ""), str(provider),
              str(model), int(ts) // 86_400_000)
    per_type: dict[str, int] | None = None
    if per_type_pico is not None:
        per_type = {t: once.take((*series, t), v) for t, v in per_type_pico.items()}
        actual = sum(per_type.values())
    else:
        actual = once.take((*series, ""), exact)
    status = str(outcome or "").strip().lower()
    return InternalUsageLine(
        ts_ms=int(ts), tenant=str(tenant), workload=str(workload), provider=str(provider),
        model=str(model), input_tokens=int(tin), cached_input_tokens=int(tcached),
        cache_write_tokens=int(twrite), output_tokens=int(tout), reasoning_tokens=int(trsn),
        cost_micros=int(actual),
        input_cost_micros=per_type[INPUT] if per_type else None,
        cached_input_cost_micros=per_type[CACHED_INPUT] if per_type else None,
        cache_write_cost_micros=per_type[CACHE_WRITE] if per_type else None,
        output_cost_micros=per_type[OUTPUT] if per_type else None,
        permit_id=str(pid), status="ok" if status in _OK_OUTCOMES else status,
        account=str(detail.get("account") or ""), api_key=str(detail.get("api_key") or ""),
        error_type=str(detail.get("error_type") or ""),
        cache_write_1h_tokens=_int_or(detail.get("cache_write_1h_tokens"), 0) or 0,
        cache_write_1h_cost_micros=_int_or(costs.get("cache_write_1h"), None)
        if isinstance(costs, dict) else None,
    )


def _int_or(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _detail(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def from_ledger(store_url: str, period: Period, pad_ms: int = 0) -> list[InternalUsageLine]:
    """Settlement entries of the ledger store for a UTC month, as internal lines.

    The time of a line is the settlement (closeout) time, the moment the
    provider reported the usage. Costs are the exact amounts the entries carry,
    rounded once per series (``_RoundedOnce``), not the booked, rounded-up ones.
    The ledger package is imported lazily so the reconcile command works from an
    export file without a ledger store.
    """
    try:
        store_mod = importlib.import_module("keel_pdp.ledger.store")
    except ModuleNotFoundError:
        raise ReconcileError(
            "the ledger store is not available in this installation (keel_pdp.ledger is "
            "missing); export the internal usage and pass --internal FILE") from None
    if store_url.startswith("sqlite:///") and not pathlib.Path(
            store_url[len("sqlite:///"):]).is_file():
        raise ReconcileError(f"--store {store_url}: no ledger database at that path")
    try:
        store = store_mod.LedgerStore(store_url)
    except Exception as exc:
        raise ReconcileError(f"--store {store_url}: {exc}") from None
    try:
        rows = store.query(_SETTLEMENTS_SQL, (period.start_ms - pad_ms, period.end_ms + pad_ms))
    except Exception as exc:
        raise ReconcileError(f"--store {store_url}: cannot read settlements "
                             f"({type(exc).__name__}: {exc})") from None
    finally:
        store.close()
    once = _RoundedOnce()
    return [_ledger_line(r, once) for r in rows]


class LedgerInternalSource:
    """The ledger store as the internal side (``--store URL``)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url

    @property
    def description(self) -> str:
        return "ledger store settlements"

    def lines_for_month(self, period: Period, pad_ms: int = 0) -> list[InternalUsageLine]:
        return from_ledger(self.store_url, period, pad_ms)
