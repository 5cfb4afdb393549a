"""This process's memory of the permits it issued, so Closeout and Void of them take
one round trip (no read of the permit record first).

Entries are compact (strings and a bool only): the garbage collector stops tracking
them, so a full cache does not lengthen collection pauses. An OrderedDict evicts its
oldest entry in O(1). A miss is never an error: the permit record in Redis says the
same, one read later.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from keel_pdp.budget.material import load_meta


@dataclass(slots=True)
class CachedPermit:
    keys: tuple[str, ...]
    meta: dict[str, Any]
    degraded: bool = False
    idempotency_key: str = ""


class PermitCache:
    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[str, str, bool, str]] = OrderedDict()

    def remember(self, pid: str, keys: tuple[str, ...], meta_json: str, degraded: bool = False,
                 ik: str = "") -> None:
        self._entries[pid] = ("\n".join(keys), meta_json, degraded, ik)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)  # the oldest

    def get(self, pid: str) -> CachedPermit | None:
        entry = self._entries.get(pid)
        if entry is None:
            return None
        keys, meta, degraded, ik = entry
        return CachedPermit(tuple(keys.split("\n")) if keys else (), load_meta(meta), degraded, ik)

    def forget(self, pid: str) -> None:
        self._entries.pop(pid, None)

    def __len__(self) -> int:
        return len(self._entries)
