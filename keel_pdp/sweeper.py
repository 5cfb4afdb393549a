"""Expiry: holds whose time passed are released, by any sidecar, once.

The sweep reads due permit ids from the expiry set and releases each through
release.lua, which applies an expiry only once the permit's own ``expires_at`` has
passed ``now_ms`` and only to a permit still held (so many sidecars sweeping at
once release each hold once). The engine's sweep passes the earlier of its own
clock and the store's, so a sidecar whose clock runs ahead cannot cut another
sidecar's live hold short.
A sharded key space has one expiry set per shard; the sweep reads them all.
"""

from __future__ import annotations

import asyncio

from keel_pdp import events
from keel_pdp.budget.keys import PERMIT_ID_RE
from keel_pdp.budget.store import BudgetStore


async def sweep(store: BudgetStore, now_ms: int, limit: int = 200) -> list[str]:
    """Release up to ``limit`` due holds; returns the permit ids this call released."""
    released: list[str] = []
    shards = range(store.keys.shards)
    due = await asyncio.gather(*(store.due_expiries(now_ms, limit, s) for s in shards))
    for pid in (pid for found in due for pid in found):
        if not PERMIT_ID_RE.match(pid):
            continue
        rec = await store.permit(pid, 1.0)
        out = await store.release(pid, rec.keys if rec is not None else (), now_ms, "expired",
                                  events.release_data(now_ms), 1.0,
                                  idempotency_key=rec.idempotency_key if rec else "")
        if out.status == "RELEASED":
            released.append(pid)
    return released
