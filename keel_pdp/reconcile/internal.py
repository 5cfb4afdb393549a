"""The internal side: usage the gateway recorded, one line per settled request.

``InternalUsageLine`` is what reconciliation needs from the ledger's settlement
entries (or from any telemetry export): when, for whom, which model, tokens by
type and the cost the gateway booked. ``InternalSource`` returns the lines of a
UTC month (plus a margin either side, so calls stamped across the month
boundary can be recognised). Two sources exist: an export file (CSV or JSON
lines) and the ledger store (``from_ledger``).

The line and the source protocol are ``keel_pdp.reconcile.internal_line``; the
file source is ``keel_pdp.reconcile.internal_file``; the ledger source is
``keel_pdp.reconcile.internal_ledger``. The names are re-exported here.
"""

from __future__ import annotations

from keel_pdp.reconcile.internal_file import FileInternalSource
from keel_pdp.reconcile.internal_ledger import LedgerInternalSource, from_ledger
from keel_pdp.reconcile.internal_line import (
    COST_COLUMNS,
    EXPORT_COLUMNS,
    InternalSource,
    InternalUsageLine,
    in_window,
    write_export,
)

__all__ = [
    "COST_COLUMNS",
    "EXPORT_COLUMNS",
    "FileInternalSource",
    "InternalSource",
    "InternalUsageLine",
    "LedgerInternalSource",
    "from_ledger",
    "in_window",
    "write_export",
]
