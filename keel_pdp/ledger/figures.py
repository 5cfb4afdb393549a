"""The period's money by group: forecast, actual, accrued, cost, variance, booked.

This is the arithmetic at the heart of ``ledger report`` (and of the chargeback
export, which groups the same figures by other dimensions): one query sums the
entries of the period by (tenant, workload, model, provider) and kind, and
``group_figures`` folds those sums into the dimensions the reader asked for,
cost center and business unit included (``keel_pdp.ledger.mapping``). The
definitions are in ``keel_pdp.ledger.report``. Money is summed exactly (the
booked micro-USD less what rounding each settlement up added, in pico-USD) and
each line's figure is rounded once (``*_line_micros``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from keel_pdp.ledger.connection import LedgerConnection
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.money import PICOS_PER_MICRO, micros_half_even

DIMENSIONS = ("tenant", "workload", "model", "provider", "cost_center", "business_unit")
RawKey = tuple[str, str, str, str]  # tenant, workload, model, provider


@dataclass
class Figures:
    """The figures of one group of permits belonging to a period (integer micro-USD
    and token counts); ``add`` folds another group in."""

    permits: int = 0
    denials: int = 0
    settlements: int = 0
    open_permits: int = 0
    forecast_micros: int = 0
    actual_micros: int = 0
    cost_micros: int = 0
    booked_micros: int = 0
    adjustments_in_micros: int = 0
    late_out_micros: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    # What rounding each settlement up to the micro-dollar added to the booked
    # figure of the same name, in pico-USD: exact = booked x 10^6 - this.
    actual_round_pico: int = 0
    cost_round_pico: int = 0
    booked_round_pico: int = 0
    adjustments_in_round_pico: int = 0
    late_out_round_pico: int = 0

    @property
    def accrued_micros(self) -> int:
        return self.cost_micros - self.actual_micros

    @property
    def variance_micros(self) -> int:
        return self.cost_micros - self.forecast_micros

    # The figures a report line shows: the exact sums, each rounded once (half even).
    def _line(self, micros: int, round_pico: int) -> int:
        return micros_half_even(micros * PICOS_PER_MICRO - round_pico)

    @property
    def actual_line_micros(self) -> int:
        return self._line(self.actual_micros, self.actual_round_pico)

    @property
    def cost_line_micros(self) -> int:
        return self._line(self.cost_micros, self.cost_round_pico)

    @property
    def accrued_line_micros(self) -> int:
        return self._line(self.accrued_micros, self.cost_round_pico - self.actual_round_pico)

    @property
    def variance_line_micros(self) -> int:
        return self._line(self.variance_micros, self.cost_round_pico)

    @property
    def booked_line_micros(self) -> int:
        return self._line(self.booked_micros, self.booked_round_pico)

    @property
    def adjustments_in_line_micros(self) -> int:
        return self._line(self.adjustments_in_micros, self.adjustments_in_round_pico)

    @property
    def late_out_line_micros(self) -> int:
        return self._line(self.late_out_micros, self.late_out_round_pico)

    def add(self, other: Figures) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


_RAW_SQL = """
SELECT COALESCE(p.tenant, e.tenant), COALESCE(p.workload, e.workload),
       COALESCE(p.model, e.model), COALESCE(p.provider, e.provider),
       e.kind, e.belongs_to, e.period, COUNT(*),
       CAST(SUM(e.held_micros) AS BIGINT), CAST(SUM(e.actual_micros) AS BIGINT),
       CAST(SUM(e.amount_micros) AS BIGINT), CAST(SUM(e.input_tokens) AS BIGINT),
       CAST(SUM(e.cached_input_tokens) AS BIGINT), CAST(SUM(e.cache_write_tokens) AS BIGINT),
       CAST(SUM(e.output_tokens) AS BIGINT), CAST(SUM(e.reasoning_tokens) AS BIGINT),
       CAST(SUM(CASE WHEN e.actual_pico IS NULL THEN 0
                     ELSE e.actual_micros * 1000000 - e.actual_pico END) AS BIGINT)
FROM ledger_entries e
LEFT JOIN ledger_entries p
  ON p.permit_id = e.permit_id AND e.permit_id <> '' AND p.kind IN ('permit', 'denial')
WHERE (e.belongs_to = ? OR e.period = ?) AND e.kind <> 'exception_grant'
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""

_OPEN_SQL = """
SELECT p.tenant, p.workload, p.model, p.provider, COUNT(*)
FROM ledger_entries p
WHERE p.kind = 'permit' AND p.belongs_to = ?
  AND NOT EXISTS (SELECT 1 FROM ledger_entries t WHERE t.permit_id = p.permit_id
                  AND t.kind IN ('settlement', 'void', 'expiry'))
GROUP BY 1, 2, 3, 4
"""


def raw_figures(store: LedgerConnection, period: str) -> dict[RawKey, Figures]:
    out: dict[RawKey, Figures] = {}
    for row in store.query(_RAW_SQL, (period, period)):
        key: RawKey = (str(row[0]), str(row[1]), str(row[2]), str(row[3]))
        kind, belongs, booked_in = str(row[4]), str(row[5]), str(row[6])
        cnt, held, actual, amount = (int(x or 0) for x in row[7:11])
        f = out.setdefault(key, Figures())
        # Rounding added to the actual (settlement) and so to the amount (correction).
        over = int(row[16] or 0)
        amount_over = over if kind == "correction" else 0
        if belongs == period:
            f.cost_micros += amount
            f.cost_round_pico += amount_over
            if booked_in != period:
                f.late_out_micros += amount
                f.late_out_round_pico += amount_over
            if kind == "permit":
                f.permits += cnt
                f.forecast_micros += held
            elif kind == "denial":
                f.denials += cnt
            elif kind == "settlement":
                f.settlements += cnt
                f.actual_micros += actual
                f.actual_round_pico += over
                f.input_tokens += int(row[11] or 0)
                f.cached_input_tokens += int(row[12] or 0)
                f.cache_write_tokens += int(row[13] or 0)
                f.output_tokens += int(row[14] or 0)
                f.reasoning_tokens += int(row[15] or 0)
            elif kind == "manual_adjustment":
                f.actual_micros += actual
        if booked_in == period:
            f.booked_micros += amount
            f.booked_round_pico += amount_over
            if belongs != period:
                f.adjustments_in_micros += amount
                f.adjustments_in_round_pico += amount_over
    for t, w, m, p, cnt in store.query(_OPEN_SQL, (period,)):
        out.setdefault((str(t), str(w), str(m), str(p)), Figures()).open_permits += int(cnt)
    return out


def dims_of(key: RawKey, mapping: CostMapping) -> dict[str, str]:
    alloc = mapping.allocate(key[0], key[1])
    return {"tenant": key[0], "workload": key[1], "model": key[2], "provider": key[3],
            "cost_center": alloc.cost_center, "business_unit": alloc.business_unit}


def group_figures(raw: dict[RawKey, Figures], by: Sequence[str],
                  mapping: CostMapping) -> dict[tuple[str, ...], Figures]:
    out: dict[tuple[str, ...], Figures] = {}
    for key, figures in raw.items():
        dims = dims_of(key, mapping)
        gkey = tuple(dims[d] for d in by)
        out.setdefault(gkey, Figures()).add(figures)
    return dict(sorted(out.items()))
