"""``keel-pdp ledger import``: an internal usage export into the ledger store.

Months that predate the sidecar (or telemetry from another gateway) become
ledger entries, so they reconcile through the same ``--store`` path as live
traffic. Each request becomes what a closeout of an unheld permit books: a
``settlement`` entry (usage, actual cost) and a ``correction`` entry carrying
the amount, both marked imported (caller ``import``, ``detail.imported`` names
the file) and keyed by the permit id, so importing the same file twice books
nothing the second time and a request the sidecar already settled is skipped.
The whole file is checked before anything is written: a bad row stops the
import (exit 2) naming the file, row and column, with nothing booked.
"""

from __future__ import annotations

import hashlib
import pathlib
from datetime import UTC, datetime
from typing import Any

from keel_pdp.reconcile.internal import FileInternalSource, InternalUsageLine

IMPORT_CALLER = "import"


def _event_id(line: InternalUsageLine, file_digest: str, index: int) -> tuple[str, str]:
    """(event id, permit id): the permit id when the export has one, else one
    derived from the file and the row, stable across re-imports."""
    if line.permit_id:
        return f"import:{line.permit_id}", line.permit_id
    pid = f"import-{file_digest[:16]}-{index}"
    return f"import:{pid}", pid


def entry_rows(lines: list[InternalUsageLine], source: pathlib.Path,
               file_digest: str) -> list[Any]:
    """Ledger entry rows for the lines of one export (two per request)."""
    from keel_pdp.ledger.events import Dims, EntryRow

    out: list[Any] = []
    for index, line in enumerate(lines):
        event_id, pid = _event_id(line, file_digest, index)
        at = datetime.fromtimestamp(line.ts_ms / 1000, tz=UTC)
        detail: dict[str, Any] = {"imported": source.name, "prior": "unheld"}
        if line.has_type_costs():
            detail["costs"] = {"input": line.input_cost_micros,
                               "cached_input": line.cached_input_cost_micros,
                               "cache_write": line.cache_write_cost_micros,
                               "output": line.output_cost_micros}
            if line.cache_write_1h_cost_micros is not None:
                detail["costs"]["cache_write_1h"] = line.cache_write_1h_cost_micros
        if line.cache_write_1h_tokens:
            detail["cache_write_1h_tokens"] = line.cache_write_1h_tokens
        for key in ("account", "api_key", "error_type", "service_tier"):
            if getattr(line, key):
                detail[key] = getattr(line, key)
        status = line.status.strip()
        common: dict[str, Any] = {
            "event_id": event_id, "permit_id": pid, "ts_ms": line.ts_ms,
            "belongs_to": f"{at.year:04d}-{at.month:02d}",
            "dims": Dims(line.tenant, line.workload, line.model, line.provider),
            "status": "SETTLED", "actual_micros": line.cost_micros,
            "priced_micros": line.cost_micros, "input_tokens": line.input_tokens,
            "cached_input_tokens": line.cached_input_tokens,
            "cache_write_tokens": line.cache_write_tokens,
            "output_tokens": line.output_tokens, "reasoning_tokens": line.reasoning_tokens,
            "reason": "SUCCEEDED" if status.lower() in ("", "ok") else status,
            "caller": IMPORT_CALLER, "detail": detail,
        }
        out.append(EntryRow(seq=0, kind="settlement", amount_micros=0, **common))
        out.append(EntryRow(seq=1, kind="correction", amount_micros=line.cost_micros,
                            **common))
    return out


def import_file(store_url: str, path: pathlib.Path, tz: str = "UTC") -> tuple[int, int]:
    """Load ``path`` into the store; returns (requests in the file, requests new)."""
    from keel_pdp.ledger.cli_support import open_for_cli

    source = FileInternalSource(path, tz)
    lines = source.all_lines()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = entry_rows(lines, path, digest)
    store = open_for_cli(store_url)  # a command-line tool: never upgrades a ledger in use
    try:
        new = store.import_entries(rows)
    finally:
        store.close()
    return len(lines), new // 2
