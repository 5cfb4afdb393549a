"""How a ledger entry and a permit's budget line become table rows.

The column order here is the one contract between the typed rows of
``keel_pdp.ledger.events`` and the tables of ``keel_pdp.ledger.migrations``;
keeping it in one place means a new column is added once, for both dialects.
"""

from __future__ import annotations

import json
from typing import Any

from keel_pdp.ledger.events import BudgetRow, Dims, EntryRow

ENTRY_COLUMNS = (
    "event_id", "seq", "kind", "permit_id", "ts_ms", "booked_at_ms", "period", "belongs_to",
    "decision", "status", "tenant", "workload", "model", "provider", "request_id",
    "policy_revision", "price_revision", "estimate_micros", "held_micros", "actual_micros",
    "priced_micros", "provider_cost_micros", "amount_micros", "input_tokens",
    "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "max_output_tokens", "price_input_pico", "price_cached_input_pico",
    "price_cache_write_pico", "price_output_pico", "reason", "degraded", "actor", "detail",
    "caller", "actual_pico",
)
BUDGET_COLUMNS = (
    "permit_id", "ordinal", "event_id", "budget_id", "scope", "window_kind", "window_start_ms",
    "window_end_ms", "limit_micros", "mode", "split", "settled_micros", "held_micros", "failed",
    "applied", "granted_micros",
)


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL; the raw event keeps the original.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def entry_values(r: EntryRow, dims: Dims, period: str, at: int) -> tuple[Any, ...]:
    """The ``ledger_entries`` row for ``r``, booked in ``period`` at ``at`` (ms)."""
    price = r.price_pico or (None, None, None, None)
    return (
        r.event_id, r.seq, r.kind, _text(r.permit_id), r.ts_ms, at, period, r.belongs_to,
        r.decision, _text(r.status), _text(dims.tenant), _text(dims.workload),
        _text(dims.model), _text(dims.provider), _text(r.request_id),
        _text(r.policy_revision), _text(r.price_revision), r.estimate_micros, r.held_micros,
        r.actual_micros, r.priced_micros, r.provider_cost_micros, r.amount_micros,
        r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
        r.reasoning_tokens, r.max_output_tokens, price[0], price[1], price[2], price[3],
        _text(r.reason), 1 if r.degraded else 0, "",
        json.dumps(r.detail, separators=(",", ":"), sort_keys=True, default=str),
        _text(r.caller), r.actual_pico,
    )


def budget_values(b: BudgetRow) -> tuple[Any, ...]:
    """The ``ledger_permit_budgets`` row for ``b``."""
    return (b.permit_id, b.ordinal, b.event_id, b.budget_id, b.scope, b.window_kind,
            b.window_start_ms, b.window_end_ms, b.limit_micros, b.mode, b.split,
            b.settled_micros, b.held_micros, 1 if b.failed else 0, 1 if b.applied else 0,
            b.granted_micros)
