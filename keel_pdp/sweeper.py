"""Expiry: holds whose time passed are released, by any sidecar, once.

The sweep reads due permit ids from the expiry set and releases each through
release.lua, which applies an expiry only once the permit's own ``expires_at`` has
passed ``now_ms`` and only to a permit still held (so many sidecars sweeping at
once release each hold once). The engine's sweep passes the earlier of its own
clock and the store's, so a sidecar whose clock runs ahead cannot cut another
sidecar's live hold short.
A sharded key space has one expiry set per shard; the sweep reads them all.
A sweep releases one page per shard (concurrently); while a page comes back full
the engine sweeps again at once, within the sweep interval, so a backlog (a
sidecar fleet restarted, thousands of holds expiring together) is not released
one page per interval.
"""

from __future__ import annotations

import asyncio

from keel_pdp import events
from keel_pdp.budget.keys import PERMIT_ID_RE
from keel_pdp.budget.store import BudgetStore

# Releases one sweep runs at once: each is two round trips (the permit's record,
# then release.lua), so a backlog drains in parallel, not one hold at a time.
CONCURRENCY = 16


async def sweep(store: BudgetStore, now_ms: int, limit: int = 200) -> tuple[list[str], bool]:
    """Release up to ``limit`` due holds per shard; returns the permit ids this call
    released, and whether a shard had ``limit`` due (more may be waiting)."""
    shards = range(store.keys.shards)
    due = await asyncio.gather(*(store.due_expiries(now_ms, limit, s) for s in shards))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def release(pid: str) -> bool:
        async with gate:
            rec = await store.permit(pid, 1.0)
            out = await store.release(pid, rec.keys if rec is not None else (), now_ms,
                                      "expired", events.release_data(now_ms), 1.0,
                                      idempotency_key=rec.idempotency_key if rec else "")
            return out.status == "RELEASED"

    pids = [pid for found in due for pid in found if PERMIT_ID_RE.match(pid)]
    done = await asyncio.gather(*(release(pid) for pid in pids))
    released = [pid for pid, ok in zip(pids, done, strict=True) if ok]
    return released, any(len(found) >= limit for found in due)
