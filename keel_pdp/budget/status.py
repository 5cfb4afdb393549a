"""Live budget status: the current window of each matching budget, read from Redis.

Read-only and off the hot path (an operator's question, behind admin auth): for
every counter of every budget that matches, the policy's cap, the active
exception grants, settled and held amounts, what remains, the burn rate so far
in the window and where the window ends if it keeps burning at that rate.

Counters of budgets with ``per`` dimensions are found by scanning their window
keys (all keys share one hash tag, so one node holds them even in a cluster);
a per-tenant budget asked about one tenant is read directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from redis.exceptions import RedisError

from keel_pdp.budget.resp import RespError
from keel_pdp.budget.store import BudgetStore, StoreUnavailable
from keel_pdp.decision import DIMENSION_NAMES, InvalidRequest
from keel_pdp.policy.snapshot import WILDCARD, CompiledBudget, PolicySnapshot
from keel_pdp.windows import window_bounds

HOUR_MS = 3_600_000
MAX_COUNTERS = 10_000  # per call: a status is a look, not an export
_FAILURES = (TimeoutError, RedisError, RespError, OSError)


@dataclass(frozen=True, slots=True)
class Grant:
    """An active exception grant on one budget counter."""

    grant_id: str
    amount_micros: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """One budget counter's current window: cap, grants, settled and held amounts,
    and the figures derived from them (remaining, burn rate, projected end)."""

    budget: CompiledBudget
    split: tuple[str, ...]
    window_start_ms: int
    window_end_ms: int
    settled_micros: int
    held_micros: int
    grants: tuple[Grant, ...]
    as_of_ms: int

    @property
    def split_map(self) -> dict[str, str]:
        return dict(zip([DIMENSION_NAMES[i] for i in self.budget.per], self.split, strict=True))

    @property
    def granted_micros(self) -> int:
        return sum(g.amount_micros for g in self.grants)

    @property
    def effective_cap_micros(self) -> int:
        return self.budget.limit_micros + self.granted_micros

    @property
    def used_micros(self) -> int:
        return self.settled_micros + self.held_micros

    @property
    def remaining_micros(self) -> int:
        return self.effective_cap_micros - self.used_micros

    @property
    def elapsed_ms(self) -> int:
        return max(self.as_of_ms - self.window_start_ms, 1)

    @property
    def burn_rate_micros_per_hour(self) -> int:
        """Committed spend (settled + held) per hour of the window so far, rounded up."""
        return -(-self.used_micros * HOUR_MS // self.elapsed_ms)

    @property
    def projected_end_micros(self) -> int:
        """Committed spend at the window's end at the current rate, rounded up."""
        total = self.window_end_ms - self.window_start_ms
        return -(-self.used_micros * total // self.elapsed_ms)

    @property
    def projected_over_cap(self) -> bool:
        return self.projected_end_micros > self.effective_cap_micros


def matching(snapshot: PolicySnapshot, tenant: str = "", budget_id: str = "") -> list[
        CompiledBudget]:
    out = [b for b in snapshot.budgets
           if (not budget_id or budget_id in (b.id, b.spec_id))
           and (not tenant or b.scope[0] in (WILDCARD, tenant))]
    if budget_id and not out:
        known = [b for b in snapshot.budgets if budget_id in (b.id, b.spec_id)]
        if not known:
            raise InvalidRequest(f"budget_id {budget_id!r} is not a budget of policy "
                                 f"{snapshot.policy_revision}")
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class StatusReader:
    """Reads the live status of the budgets matching a query from the budget
    store's Redis, off the hot path, each read bounded by ``timeout_s``."""

    def __init__(self, store: BudgetStore, timeout_s: float = 5.0) -> None:
        self.store = store
        self.timeout_s = timeout_s

    async def _read(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.timeout_s)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _splits(self, b: CompiledBudget, start_ms: int,
                      tenant: str) -> list[tuple[str, ...]]:
        if not b.per:
            return [()]
        dims = [DIMENSION_NAMES[i] for i in b.per]
        if tenant and dims == ["tenant"]:
            return [(tenant,)]
        keys = self.store.keys
        # Every shard's windows (and leases) of the budget: the hash tag is a wildcard.
        lead = f"{keys.prefix}:{{"
        mid = f"}}:b:{b.id}:{len(b.per)}:"
        tail = f":{start_ms}"
        pattern = (_glob_escape(lead) + "*" + _glob_escape(mid) + "*" + _glob_escape(tail))
        found: set[tuple[str, ...]] = set()
        # scan_iter, not one SCAN cursor: redis-py's RedisCluster answers SCAN with a
        # cursor per node, and scan_iter walks them all (one node: one cursor).
        keys_found: Any = self.store.client.scan_iter(match=pattern, count=1000)
        try:
            while len(found) < MAX_COUNTERS:
                try:
                    raw = await self._read(anext(keys_found))
                except StopAsyncIteration:
                    break
                key = _text(raw)
                at = key.find(mid)
                if at < 0 or not key.endswith(tail):
                    continue
                middle = key[at + len(mid):len(key) - len(tail)]
                parts = tuple(unquote(p) for p in middle.split(":"))
                if len(parts) != len(b.per):
                    continue
                if tenant and "tenant" in dims and parts[dims.index("tenant")] != tenant:
                    continue
                found.add(parts)
        finally:
            await keys_found.aclose()
        return sorted(found)

    async def _leases(self, b: CompiledBudget, split: tuple[str, ...],
                      start_ms: int) -> tuple[int, int]:
        """(settled, held) summed over every shard's lease of a shared window."""
        keys = self.store.keys
        name = keys.lease(b.id, split, start_ms, 0)[len(keys.bases[0]):]
        pattern = _glob_escape(f"{keys.prefix}:{{") + "*" + _glob_escape("}:" + name)
        settled = held = 0
        found: Any = self.store.client.scan_iter(match=pattern, count=1000)
        try:
            while True:
                try:
                    key = _text(await self._read(anext(found)))
                except StopAsyncIteration:
                    break
                figures = await self._read(self.store.client.hmget(key, "s", "h"))
                settled += int(figures[0] or 0)
                held += int(figures[1] or 0)
        finally:
            await found.aclose()
        return settled, held

    async def status(self, snapshot: PolicySnapshot, tenant: str = "", budget_id: str = "",
                     now_ms: int | None = None) -> list[WindowStatus]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        out: list[WindowStatus] = []
        for b in matching(snapshot, tenant, budget_id):
            start, end = window_bounds(b.window, now, b.timezone)
            splits = await self._splits(b, start, tenant)
            if not splits:
                continue
            keys = self.store.keys
            pipe = self.store.client.pipeline(transaction=False)
            for s in splits:
                pipe.hmget(keys.budget_window(b, s, start), "s", "h")
                pipe.hgetall(keys.budget_grants(b, s))
            rows: Sequence[Any] = await self._read(pipe.execute())
            rows = [*rows]
            for n, s in enumerate(splits):
                if keys.is_shared(b, s):
                    # Escrow: the spending is in the shards' leases of the window.
                    rows[2 * n] = await self._leases(b, s, start)
            for n, s in enumerate(splits):
                figures, raw_grants = rows[2 * n], rows[2 * n + 1]
                grants = []
                for gid, value in sorted((raw_grants or {}).items()):
                    amount, _, until = _text(value).partition(":")
                    if amount.isdigit() and until.isdigit() and int(until) > now:
                        grants.append(Grant(_text(gid), int(amount), int(until)))
                out.append(WindowStatus(b, s, start, end, int(figures[0] or 0),
                                        int(figures[1] or 0), tuple(grants), now))
                if len(out) >= MAX_COUNTERS:
                    return out
        return out
