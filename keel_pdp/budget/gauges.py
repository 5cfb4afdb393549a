"""Budget utilisation as Prometheus gauges, refreshed off the hot path.

The alert "a budget is projected to exceed its cap" and the dashboard's budget
panels need per-budget figures in Prometheus. Authorize never pays for them: a
background task of the sidecar reads the current window of every budget the
same way ``keel-pdp budgets status`` does (``keel_pdp.budget.status``) every
``--budget-metrics-interval`` seconds and sets, per budget id, the highest
counter's utilisation ((settled + held) / cap, active grants included in the
cap) and its projected end-of-window ratio.

Label values are budget ids from the policy bundle (names operators chose, a
closed set), never tenant names: a ``per: [tenant]`` budget is one series, its
busiest counter. Only the ``TOP`` budgets with the highest projection are
exported, so a bundle of 50,000 budgets does not become 50,000 series.
"""

from __future__ import annotations

import asyncio
import logging

from keel_pdp.budget.status import StatusReader, WindowStatus
from keel_pdp.budget.store import StoreUnavailable
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder

log = logging.getLogger("keel_pdp.budget.gauges")
TOP = 200


def ratios(rows: list[WindowStatus], top: int = TOP) -> dict[str, tuple[float, float]]:
    """budget id -> (utilisation, projected) of its highest counter, the ``top``
    budgets by projection. Ratios, not money: floats are fine here."""
    best: dict[str, tuple[float, float]] = {}
    for w in rows:
        cap = w.effective_cap_micros
        if cap <= 0:
            continue
        util, proj = w.used_micros / cap, w.projected_end_micros / cap
        old = best.get(w.budget.id)
        best[w.budget.id] = (util, proj) if old is None else (max(old[0], util),
                                                              max(old[1], proj))
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    return dict(ranked)


class BudgetGauges:
    """Sets the per-budget utilisation and projection gauges from the status reader;
    ``run`` refreshes them every interval as a background task of the sidecar."""

    def __init__(self, metrics: Metrics, holder: PolicyHolder, reader: StatusReader,
                 top: int = TOP) -> None:
        self.metrics, self.holder, self.reader, self.top = metrics, holder, reader, top

    async def refresh(self, now_ms: int | None = None) -> int:
        """Read every budget's current window and reset the gauges; returns the number
        of budgets exported."""
        snapshot = self.holder.current
        if snapshot is None:
            return 0
        rows = await self.reader.status(snapshot, now_ms=now_ms)
        found = ratios(rows, self.top)
        util, proj = self.metrics.budget_utilisation, self.metrics.budget_projected
        util.clear()
        proj.clear()
        for budget_id, (u, p) in found.items():
            util.labels(budget_id).set(u)
            proj.labels(budget_id).set(p)
        return len(found)

    async def run(self, interval_s: float) -> None:
        refreshes = self.metrics.budget_gauge_refreshes
        while True:
            try:
                await self.refresh()
                refreshes.labels("ok").inc()
            except (StoreUnavailable, OSError) as exc:
                refreshes.labels("error").inc()
                log.warning("budget gauges not refreshed: %s", exc)
            except Exception:
                refreshes.labels("error").inc()
                log.exception("budget gauges not refreshed")
            await asyncio.sleep(interval_s)
