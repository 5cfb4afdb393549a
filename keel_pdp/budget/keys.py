"""Redis key layout.

Every name that comes from a caller (tenant, workload, request id, split
values) is percent-encoded so it can contain no separator, no hash-tag brace
and no glob character: two different names can never map to the same key, and
no name can reach another key. All keys share one hash tag so a script's keys
sit in one Redis Cluster slot.
"""

from __future__ import annotations

import re
from functools import lru_cache

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
PERMIT_ID_RE = re.compile(r"^pmt_[0-9a-f]{12}[0-9a-f]{16}$")


_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.\-]+")


def enc(value: str) -> str:
    if _SAFE_TEXT.fullmatch(value):
        return value
    return _enc_escaped(value)


@lru_cache(maxsize=65536)
def _enc_escaped(value: str) -> str:
    raw = value.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw) or "%"


class KeySpace:
    """The names of every Redis key of one deployment (``prefix``), all under one
    hash tag so a Redis Cluster keeps them on one node."""

    def __init__(self, prefix: str = "keel") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", prefix):
            raise ValueError(f"key prefix {prefix!r} must match [A-Za-z0-9_.-]{{1,32}}")
        self.base = f"{prefix}:{{pdp}}:"
        self.stream = self.base + "events"
        self.expiries = self.base + "expiries"

    def idempotency(self, tenant: str, request_id: str) -> str:
        return f"{self.base}req:{enc(tenant)}:{enc(request_id)}"

    def permit(self, permit_id: str) -> str:
        return f"{self.base}permit:{permit_id}"

    def grants(self, budget_id: str, split: tuple[str, ...]) -> str:
        parts = ":".join(enc(v) for v in split)
        return f"{self.base}grant:{budget_id}:{len(split)}:{parts}"

    def window(self, budget_id: str, split: tuple[str, ...], start_ms: int) -> str:
        parts = ":".join(enc(v) for v in split)
        return f"{self.base}b:{budget_id}:{len(split)}:{parts}:{start_ms}"
