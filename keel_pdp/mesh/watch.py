"""Permits that ext_authz issued but no ext_proc stream ever saw: void them.

A client that goes away in the instant between Envoy receiving Keel's OK and
the request reaching the ext_proc filters leaves a hold that no closeout will
end. This process remembers the permits its Check issued until its closeout
stream sees them (microseconds later, in the same process: Envoy reaches the
sidecar over one local connection), and voids those not seen within a grace
period, instead of leaving them to expire after ``hold_ttl_seconds``.

It arms itself only once this process has served a closeout stream (a sidecar
whose Envoy runs no closeout filter must not void anything), and stays off in
pre-forked workers, where a Check and its ext_proc stream may reach different
processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from keel_pdp.engine import Engine
from keel_pdp.mesh.metrics import MeshMetrics

log = logging.getLogger("keel_pdp.mesh.watch")

MAX_TRACKED = 100_000


def _in_worker_group() -> bool:
    try:
        from keel_pdp.workers import worker_index
    except ImportError:
        return False
    return worker_index() is not None


class PermitWatch:
    def __init__(self, engine: Engine, metrics: MeshMetrics, grace_s: float) -> None:
        self.engine = engine
        self.m = metrics
        self.grace_s = grace_s
        self.enabled = grace_s > 0 and not _in_worker_group()
        self.armed = False
        self._issued: OrderedDict[str, float] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    def issued(self, permit_id: str) -> None:
        if not (self.enabled and self.armed):
            return
        self._issued[permit_id] = time.monotonic()
        if len(self._issued) > MAX_TRACKED:
            self._issued.popitem(last=False)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def seen(self, permit_id: str) -> None:
        """A closeout stream saw the call (and so will end the permit)."""
        self.armed = True
        self._issued.pop(permit_id, None)

    def forget(self, permit_id: str) -> None:
        """The permit was ended another way."""
        self._issued.pop(permit_id, None)

    def due(self, now: float | None = None) -> list[str]:
        """Permits issued more than ``grace_s`` ago and never seen (removed from the watch)."""
        t = time.monotonic() if now is None else now
        out = []
        while self._issued:
            pid, at = next(iter(self._issued.items()))
            if t - at < self.grace_s:
                break
            self._issued.popitem(last=False)
            out.append(pid)
        return out

    async def _run(self) -> None:
        while self._issued:
            await asyncio.sleep(min(self.grace_s, 1.0))
            for pid in self.due():
                self.m.abandoned.inc()
                with contextlib.suppress(Exception):
                    await self.engine.void(
                        pid, f"no provider call followed the Check within {self.grace_s:g} s "
                        "(client gone between ext_authz and ext_proc)", 1.0)
