"""Permit ids: where they come from (randomness, the clock) and what they say.

A permit id is ``pmt_`` + 12 hex digits of issue time (epoch ms) + 16 random hex
digits; with a sharded key space the last 10 bits name the shard of its keys
(``keel_pdp.budget.keys.permit_shard``). The top bit of the random part is clear
on every id the store is asked to hold; it is set only on a *degraded* permit,
issued by the budgets' fail modes instead of an id whose hold script may still
run. Any sidecar can so tell that a
degraded permit exists before its record reaches the store.

The decision package never makes ids: the engine injects a ``PermitIds`` (and so
tests can inject a fixed clock and randomness).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from keel_pdp.budget.keys import with_shard

_PLAIN_NIBBLE = "0123456701234567"
_DEGRADED_NIBBLE = "89abcdef89abcdef"


class PermitIds:
    """Permit ids from ``random_bytes`` (os.urandom, read 4 KiB at a time: one system
    call per 512 permits) and ``clock_ms``.

    ``offset_ms`` is added to the clock: the engine sets it when this clock is off
    the store's (``keel_pdp.clock``), which it does only when ``follows_store``:
    by default only for the system clock (an injected clock is a test's own time)."""

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom,
                 clock_ms: Callable[[], int] | None = None,
                 follows_store: bool | None = None) -> None:
        self._random = random_bytes
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.follows_store = clock_ms is None if follows_store is None else follows_store
        self.offset_ms = 0
        self._buf, self._pos = b"", 0

    def forget(self) -> None:
        """Drop buffered randomness (a forked worker must not reuse its parent's)."""
        self._buf, self._pos = b"", 0

    def now_ms(self) -> int:
        return self._clock() + self.offset_ms

    def local_ms(self) -> int:
        """The clock as it is, without the store's correction."""
        return self._clock()

    def _hex(self) -> str:
        pos = self._pos
        if pos + 8 > len(self._buf):
            self._buf, pos = self._random(4096), 0
        self._pos = pos + 8
        return self._buf[pos:pos + 8].hex()

    def new(self, now_ms: int | None = None, shard: int = 0, shards: int = 1) -> str:
        """A new id; with ``shards`` > 1 its last 10 bits name ``shard`` (modulo
        ``shards``, the rest of them random), so the store finds the permit's keys
        from its id alone."""
        ms = self._clock() + self.offset_ms if now_ms is None else now_ms
        rnd = with_shard(self._hex(), shard, shards)
        return f"pmt_{ms:012x}{_PLAIN_NIBBLE[int(rnd[0], 16)]}{rnd[1:]}"


DEFAULT = PermitIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DEFAULT.forget)


def new_permit_id(now_ms: int | None = None) -> str:
    """A new permit id from the process's default source."""
    return DEFAULT.new(now_ms)


def degraded_permit_id(permit_id: str) -> str:
    """The degraded twin of ``permit_id``: the same id with the random part's top bit set."""
    return f"{permit_id[:16]}{_DEGRADED_NIBBLE[int(permit_id[16], 16)]}{permit_id[17:]}"


def is_degraded_permit_id(permit_id: str) -> bool:
    return len(permit_id) > 16 and permit_id[16] in "89abcdef"


def permit_issued_ms(permit_id: str) -> int:
    return int(permit_id[4:16], 16)
