"""The internal side from the ledger store (``--store URL``): settlement entries.

Kept apart from the file source because it reads the ledger's own schema and
exact amounts, and imports the ledger package lazily.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from typing import Any

from keel_pdp.money import micros_half_even
from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.internal_line import InternalUsageLine
from keel_pdp.reconcile.model import (
    CACHE_WRITE,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    service_tier_name,
)
from keel_pdp.reconcile.money import split_exact
from keel_pdp.reconcile.period import Period

# Settlement entries carry the provider-reported usage by token type, the actual
# cost (booked, rounded up to the micro-dollar, and exact, in pico-USD) and the
# closeout outcome; the permit entry carries the dimensions and the price
# (pico-USD per token) the gateway used, which splits the exact cost across token
# types (a settlement priced at another service tier than its hold carries the
# rates it was priced at, which win). The dimensions are the permit's: a
# settlement booked before its decision (a writer failover) was booked without
# them. An imported row has no permit and its own dimensions. The service tier is
# the settlement's (``_tier``).
_SETTLEMENTS_SQL = (
    "SELECT s.permit_id, s.ts_ms, COALESCE(p.tenant, s.tenant), "
    "COALESCE(p.workload, s.workload), COALESCE(p.provider, s.provider), "
    "COALESCE(p.model, s.model), "
    "s.input_tokens, s.cached_input_tokens, s.cache_write_tokens, s.output_tokens, "
    "s.reasoning_tokens, s.actual_micros, s.reason, s.detail, s.actual_pico, "
    "COALESCE(s.price_input_pico, p.price_input_pico), "
    "COALESCE(s.price_cached_input_pico, p.price_cached_input_pico), "
    "COALESCE(s.price_cache_write_pico, p.price_cache_write_pico), "
    "COALESCE(s.price_output_pico, p.price_output_pico) "
    "FROM ledger_entries s LEFT JOIN ledger_entries p "
    "ON p.permit_id = s.permit_id AND s.permit_id <> '' AND p.kind = 'permit' "
    "WHERE s.kind = 'settlement' AND s.ts_ms >= ? AND s.ts_ms < ? "
    "ORDER BY s.ts_ms, s.permit_id"
)
_OK_OUTCOMES = ("", "ok", "succeeded", "outcome_unspecified")


class _RoundedOnce:
    """Exact amounts (pico-USD) summed per series and rounded once.

    A series is one tenant, workload, account, provider, model, service tier, UTC
    day and token type. Each request of a series is given the change of the
    series' running total, rounded half to even: the requests of any stretch of a
    series add up to its exact total rounded once, so the gateway rounding each
    request up to the micro-dollar does not pile up as a bias on the internal side
    (8.5 micro-USD embeddings are 8 and 9 in turn, not 9 each).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[Any, ...], int] = {}

    def take(self, key: tuple[Any, ...], pico: int) -> int:
        before = self.sums.get(key, 0)
        self.sums[key] = after = before + pico
        return micros_half_even(after) - micros_half_even(before)


def _tier(detail: dict[str, Any]) -> str:
    """The tier a settlement was billed at: the one the provider reported
    (``detail.service_tier``), else the one it was priced at when that names a tier
    (``priced_tier``: the tier the call asked for when the provider did not say;
    ``highest`` names none). "" when neither does, or when a value is no tier name
    (the ledger's own writer never stores one)."""
    for key in ("service_tier", "priced_tier"):
        try:
            tier = service_tier_name(detail.get(key))
        except ValueError:
            tier = ""
        if tier:
            return tier
    return ""


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
    # Web search fees the gateway booked are no token's cost: the provider bills them
    # on lines of their own, so they stay out of the token costs compared here.
    searches = _int_or(detail.get("web_search_calls"), 0) or 0
    fee = _int_or(detail.get("web_search_fee_pico"), 0) or 0
    exact = max(exact - searches * fee, 0)
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
    tier = _tier(detail)
    series = (str(tenant), str(workload), str(detail.get("account") or ""), str(provider),
              str(model), tier, int(ts) // 86_400_000)
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
        service_tier=tier,
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
