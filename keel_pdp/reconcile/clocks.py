"""Which month a request belongs to on each side of the reconciliation.

The provider closes its month in UTC; the ledger books a request in the
tenant's own calendar month when the mapping gives the tenant a time zone
(``LEDGER_CLOCK_TENANT``), or in UTC (``LEDGER_CLOCK_UTC``). A request that falls
on different sides of the boundary on the two clocks is clock skew.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from keel_pdp.reconcile.internal_line import InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping
from keel_pdp.reconcile.period import Period

LEDGER_CLOCK_TENANT = "tenant"
LEDGER_CLOCK_UTC = "utc"


def ledger_month(line: InternalUsageLine, mapping: Mapping, clock: str) -> Period:
    """The month the ledger books a request in: the tenant's local month."""
    zone = mapping.tenant_zone(line.tenant) if clock == LEDGER_CLOCK_TENANT else None
    return month_at(line.ts_ms, zone)


def month_at(ts_ms: int, zone: tzinfo | None) -> Period:
    """The calendar month of ``ts_ms`` in ``zone`` (UTC when None)."""
    at = datetime.fromtimestamp(ts_ms / 1000, tz=zone or UTC)
    return Period(at.year, at.month)


def ledger_window_ms(period: Period, mapping: Mapping, clock: str) -> tuple[int, int]:
    """Widest UTC window any tenant's ledger month of ``period`` can cover."""
    pad = 0
    if clock == LEDGER_CLOCK_TENANT:
        for t in mapping.doc.tenants:
            zone = mapping.tenant_zone(t.tenant)
            if zone is None:
                continue
            for edge in (period.start, period.end):
                offset = zone.utcoffset(edge.replace(tzinfo=None))
                if offset is not None:
                    pad = max(pad, abs(int(offset.total_seconds() * 1000)))
    return period.start_ms - pad - 3_600_000, period.end_ms + pad + 3_600_000
