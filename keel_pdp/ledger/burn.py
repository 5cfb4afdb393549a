"""The burn-rate forecast per budget: where each budget's spend is heading by the
end of the period, and whether its latest window is on course to pass its cap.

It reads the budget lines recorded with each permit (``ledger_permit_budgets``),
so it sees every budget a permit was checked against, at the limit in force
then. Projections are integer arithmetic, rounded up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from keel_pdp.ledger.connection import LedgerConnection
from keel_pdp.ledger.periods import bounds_ms, permit_issued_ms, pid_bound


@dataclass(frozen=True)
class BudgetBurn:
    """One budget (and split) over the period: spend so far, the projection to the
    period's end, and the latest window's use; ``status`` is ok, at_risk or over."""

    budget_id: str
    split: tuple[str, ...]
    window: str
    mode: str
    limit_micros: int
    windows_in_period: int
    period_cap_micros: int
    spend_micros: int
    projected_micros: int
    denials: int
    last_window_start_ms: int
    last_window_used_micros: int
    last_window_projected_micros: int

    @property
    def status(self) -> str:
        if self.projected_micros > self.period_cap_micros or \
                self.last_window_projected_micros > self.limit_micros:
            return "over"
        if self.projected_micros * 10 > self.period_cap_micros * 9:
            return "at_risk"
        return "ok"


def _windows(kind: str, start: int, end: int) -> int:
    if kind == "hourly":
        return max(1, (end - start) // 3_600_000)
    if kind == "daily":
        return max(1, (end - start) // 86_400_000)
    return 1


def _project(used: int, elapsed: int, total: int) -> int:
    """used scaled from elapsed to total, rounded up (integers only)."""
    if elapsed <= 0:
        return used
    return -(-used * total // elapsed)


def budget_burn(store: LedgerConnection, period: str, as_of_ms: int) -> list[BudgetBurn]:
    start, end = bounds_ms(period)
    lo, hi = pid_bound(start), pid_bound(end)
    spend = store.query(
        "SELECT b.budget_id, b.split, b.window_kind, b.mode, MAX(b.limit_micros), "
        "CAST(SUM(e.amount_micros) AS BIGINT) FROM ledger_permit_budgets b "
        "JOIN ledger_entries e ON e.permit_id = b.permit_id "
        "WHERE b.permit_id >= ? AND b.permit_id < ? AND b.applied = 1 GROUP BY 1, 2, 3, 4",
        (lo, hi))
    denied = {(str(r[0]), str(r[1])): int(r[2]) for r in store.query(
        "SELECT budget_id, split, COUNT(*) FROM ledger_permit_budgets "
        "WHERE permit_id >= ? AND permit_id < ? AND failed = 1 GROUP BY 1, 2", (lo, hi))}
    latest = {(str(r[0]), str(r[1])): r[2:] for r in store.query(
        "SELECT budget_id, split, window_start_ms, window_end_ms, limit_micros, "
        "settled_micros, held_micros, permit_id FROM ("
        " SELECT b.*, ROW_NUMBER() OVER (PARTITION BY budget_id, split "
        " ORDER BY permit_id DESC) AS rn FROM ledger_permit_budgets b "
        " WHERE permit_id >= ? AND permit_id < ? AND settled_micros IS NOT NULL"
        " AND applied = 1) x "
        "WHERE rn = 1", (lo, hi))}
    as_of = min(max(as_of_ms, start), end)
    out: list[BudgetBurn] = []
    for bid, split_json, kind, mode, limit, used in spend:
        key = (str(bid), str(split_json))
        limit_i, used_i = int(limit), int(used or 0)
        windows = _windows(str(kind), start, end)
        last = latest.get(key)
        lw_start = lw_used = lw_proj = 0
        if last is not None:
            ws, we, _lim, settled, held, pid = last
            lw_start, lw_used = int(ws), int(settled or 0) + int(held or 0)
            seen = permit_issued_ms(str(pid)) or int(ws)
            lw_proj = _project(lw_used, seen - int(ws), int(we) - int(ws))
        out.append(BudgetBurn(
            budget_id=key[0], split=tuple(json.loads(key[1])), window=str(kind), mode=str(mode),
            limit_micros=limit_i, windows_in_period=windows, period_cap_micros=limit_i * windows,
            spend_micros=used_i, projected_micros=_project(used_i, as_of - start, end - start),
            denials=denied.get(key, 0), last_window_start_ms=lw_start,
            last_window_used_micros=lw_used, last_window_projected_micros=lw_proj))
    out.sort(key=lambda b: (b.budget_id, b.split))
    return out
