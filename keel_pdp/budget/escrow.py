"""Escrow: shared budgets on a sharded key space, without a hot key.

A budget that several tenants spend from (an organisation-wide cap, a per-model
cap across tenants) cannot live in every tenant's shard. Its window (the
*parent*) lives in a shard of its own and holds no requests: it leases its
headroom, in slices, to the shards that spend it. Each shard keeps a *lease*
(a window hash with ``g``, the micro-USD leased to it) next to its tenants'
keys, and the authorize script checks and holds against the lease in the same
atomic call as every other budget of the request.

* **Refill.** When a lease is short of a request's estimate, the authorize
  script answers "lease" and writes nothing. The sidecar takes a slice from the
  parent (``take``: at most what the parent has left, so the parent's
  settled + held + leased never exceeds its cap plus active exception grants;
  a request larger than a slice gets all it needs or nothing),
  credits it to the lease (``credit``), and asks again. That request costs
  three more round trips; every other request costs one. A refill asks for 32
  times what was short, or twice the lease's last refill, up to 1/(2 x shards)
  of the cap; requests of one sidecar that find the same lease short at once
  share one refill.
* **Return.** A lease that refused a request gives back what it does not use
  (``give`` on the lease, then ``back`` on the parent), so the last slices of a
  nearly spent budget gather where they are asked for. A lease left idle is
  given back by the sweeper. At the window's end the keys expire.
* **Debt.** A lease may book more than it was leased (a Closeout above its hold,
  a late Closeout after the lease gave its rest back): that money is spent from
  the shared budget. The sweeper charges it to the parent (``take`` without a
  cap, then ``credit``), so the other shards cannot lease it again; a refill of
  the lease charges it too (it asks for what the lease is short of).
* **A cap cut.** A lease records the cap its last refill was leased under
  (``c``). A lease leased under a cap above its budget's cap in the policy now
  loaded (cut mid-window) gives its unused part back, busy or idle: when a
  sidecar loads a policy that cuts the cap (or its first policy: it cannot know
  what was cut before it started), before its first Authorize under that policy
  holds against the budget (``reclaim``), and at every look of every sidecar's
  sweeper (``return_idle``), so one started after the cut sees it too. The next
  refill's ``take`` applies the new cap. A raised cap needs nothing.
* **Idempotent, recorded.** Each step carries a transfer id and is applied once
  per side (a record under the id answers a retry). Every step that moves money
  is appended to its side's decision stream (type ``lease``), so the ledger sees
  both sides of every transfer.
* **Failures are conservative.** A transfer cut between its two steps (a crash,
  a timeout, a master lost) leaves the headroom leased but unused: stranded
  until the window ends, never spent twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore, StoreUnavailable

# Transfer records of returns only need to outlive a retry.
_RETURN_RECORD_S = 3600


@dataclass(frozen=True, slots=True)
class Parent:
    """A shared budget's window, as the leases of one shape see it."""

    budget_id: str
    split: tuple[str, ...]
    window_start_ms: int
    key: str  # the parent window (in its home shard)
    grants_key: str  # its exception grants (same shard)
    home: int
    limit_micros: int
    expire_at_s: int  # when the window's keys may expire
    slice_micros: int  # what one refill asks for, at least

    def data(self, lease_shard: int) -> str:
        return json.dumps({"budget": self.budget_id, "split": list(self.split),
                           "ws": self.window_start_ms, "shard": lease_shard},
                          separators=(",", ":"))


# A refill asks for this many times what the request was short of (about as many
# requests' estimates), up to the budget's slice: a busy shard refills about once
# every 32 requests, and an idle lease strands at most that much.
REFILL_REQUESTS = 32


def slice_for(limit_micros: int, shards: int) -> int:
    """The largest slice of a shared budget one refill takes: 1/(2 x shards) of its
    cap, at least 1."""
    return max(limit_micros // (2 * shards), 1)


def new_transfer_id() -> str:
    return "lse_" + os.urandom(10).hex()


class Escrow:
    """The transfers between a shared budget and its leases (see the module docstring)."""

    def __init__(self, store: BudgetStore, idle_s: float = 10.0) -> None:
        self.store = store
        # Leases whose figures did not move for this long are given back.
        self.idle_s = idle_s
        self._next_idle_look = 0
        self._seen: dict[str, tuple[int, int, int]] = {}  # lease key -> its last figures
        self.keys: KeySpace = store.keys
        self.refills = 0
        self.returns = 0
        self._last: dict[str, int] = {}  # lease key -> what its last refill got
        self._inflight: dict[str, asyncio.Future[int]] = {}

    async def refill(self, parent: Parent, lease_key: str, need_micros: int, now_ms: int,
                     timeout_s: float | None = None) -> int:
        """Refill a lease (see ``_refill``); a refill of the same lease already under
        way in this process is awaited instead of starting another."""
        running = self._inflight.get(lease_key)
        if running is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(running), timeout_s)
            except TimeoutError as exc:
                raise StoreUnavailable("a refill of the same lease did not end in time"
                                       ) from exc
        task = asyncio.ensure_future(self._refill(parent, lease_key, need_micros, now_ms,
                                                  timeout_s))
        self._inflight[lease_key] = task
        try:
            return await task
        finally:
            self._inflight.pop(lease_key, None)

    async def _refill(self, parent: Parent, lease_key: str, need_micros: int, now_ms: int,
                      timeout_s: float | None = None) -> int:
        """Lease at least ``need_micros`` (up to ``REFILL_REQUESTS`` times that, within
        the budget's slice) to the shard of ``lease_key``; returns what was leased
        (less when the parent has less)."""
        ks, store = self.keys, self.store
        shard = ks.key_shard(lease_key)
        tid = new_transfer_id()
        data = parent.data(shard)
        # A lease refilled before asks for twice its last slice: a busy shard's
        # refills grow geometrically up to the budget's slice.
        last = self._last.get(lease_key, 0)
        want = max(need_micros,
                   min(parent.slice_micros, max(need_micros * REFILL_REQUESTS, 2 * last)))
        # A request larger than a slice gets all it needs or nothing: it must not
        # pull the rest of the budget into its shard only to give it back.
        least = need_micros if need_micros > parent.slice_micros else 0
        got = await store.escrow(
            "take", [parent.key, ks.transfer(tid, parent.home, "take"), ks.streams[parent.home],
                     parent.grants_key],
            tid, want, parent.limit_micros, parent.expire_at_s, now_ms, data, lease_key,
            timeout_s, least)
        if len(self._last) >= 100_000:
            self._last.clear()
        self._last[lease_key] = got
        if got > 0:
            # The lease records the cap this take applied (c): a cap cut later is
            # seen on the lease by any sidecar's sweeper, even one started after it.
            await store.escrow(
                "credit", [lease_key, ks.transfer(tid, shard, "credit"), ks.streams[shard],
                           ks.leases(shard)],
                tid, got, parent.limit_micros, parent.expire_at_s, now_ms, data, parent.key,
                timeout_s)
        self.refills += 1
        return got

    async def give_back(self, lease_key: str, parent_key: str, now_ms: int,
                        timeout_s: float | None = None) -> int:
        """Return what a lease does not use to its parent; returns the amount."""
        ks, store = self.keys, self.store
        data = json.dumps({"lease": lease_key, "parent": parent_key}, separators=(",", ":"))
        shard, home = ks.key_shard(lease_key), ks.key_shard(parent_key)
        tid = new_transfer_id()
        until = int(time.time()) + _RETURN_RECORD_S
        amount = await store.escrow(
            "give", [lease_key, ks.transfer(tid, shard, "give"), ks.streams[shard]],
            tid, 0, 0, until, now_ms, data, parent_key, timeout_s)
        if amount > 0:
            await store.escrow(
                "back", [parent_key, ks.transfer(tid, home, "back"), ks.streams[home]],
                tid, amount, 0, until, now_ms, data, lease_key, timeout_s)
            self.returns += 1
        return amount

    async def charge_debt(self, lease_key: str, parent_key: str,
                          figures: tuple[int, int, int], now_ms: int,
                          timeout_s: float | None = None) -> int:
        """Book on the parent what a lease spent above what it was leased (from its
        ``figures``: leased, settled, held), whatever the parent has left (the
        money is spent), and credit it to the lease; returns the amount (0 when the
        lease is gone)."""
        ks, store = self.keys, self.store
        leased, settled, held = figures
        debt = settled + held - leased
        expire_at = await store.expire_at_s(lease_key)
        if debt <= 0 or expire_at < 0:
            return 0
        data = json.dumps({"lease": lease_key, "parent": parent_key, "debt": debt},
                          separators=(",", ":"))
        shard, home = ks.key_shard(lease_key), ks.key_shard(parent_key)
        # The transfer id is the debt's own: sweepers of every sidecar that see the
        # same figures charge it once (settled never falls and the charge raises
        # leased to settled + held, so the same figures never owe twice).
        tid = "lse_" + hashlib.sha256(
            f"{lease_key}\n{parent_key}\n{leased}:{settled}:{held}".encode()).hexdigest()[:20]
        # Limit -1: no cap, so the grants (KEYS[4]) are not read.
        got = await store.escrow(
            "take", [parent_key, ks.transfer(tid, home, "take"), ks.streams[home], parent_key],
            tid, debt, -1, expire_at, now_ms, data, lease_key, timeout_s)
        if got > 0:
            # Limit -1: a debt is no refill under a cap; the lease's c stays.
            await store.escrow(
                "credit", [lease_key, ks.transfer(tid, shard, "credit"), ks.streams[shard],
                           ks.leases(shard)],
                tid, got, -1, expire_at, now_ms, data, parent_key, timeout_s)
        return got

    def above_cap(self, lease_key: str, leased_under: int | None,
                  caps: Mapping[str, int] | None) -> bool:
        """Whether a lease was leased under a cap above its budget's cap in ``caps``
        (budget id -> cap in the policy now loaded): the cap was cut since. A lease
        that does not say (written before leases recorded it) counts as above; a
        budget ``caps`` does not name (no policy, or no longer in it) never does."""
        if not caps:
            return False
        now = caps.get(self.keys.lease_budget(lease_key))
        return now is not None and (leased_under is None or leased_under > now)

    async def reclaim(self, now_ms: int, caps: Mapping[str, int],
                      budgets: Collection[str] | None = None) -> int:
        """Give back, now, the unused part of every lease (of every shard) leased
        under a cap above its budget's cap in ``caps`` (of ``budgets`` only, when
        given), so that the next refill's take applies the cap now in force.
        Returns the amount given back. Safe with many sidecars at once: each
        give-back is a transfer of its own, and a lease given back already gives 0."""
        shards = range(self.keys.shards)
        indexes = await asyncio.gather(*(self.store.lease_index(s) for s in shards))
        leases = [(lease_key, parent_key) for index in indexes
                  for lease_key, parent_key in index.items()
                  if budgets is None or self.keys.lease_budget(lease_key) in budgets]

        async def one(lease_key: str, parent_key: str) -> int:
            figures = await self.store.lease_figures(lease_key)
            if figures is None:
                return 0
            leased, settled, held, leased_under = figures
            if leased > settled + held and self.above_cap(lease_key, leased_under, caps):
                return await self.give_back(lease_key, parent_key, now_ms, 2.0)
            return 0

        return sum(await asyncio.gather(*(one(lk, pk) for lk, pk in leases)))

    async def return_idle(self, now_ms: int, caps: Mapping[str, int] | None = None) -> int:
        """At most every ``idle_s``: give back the unused part of every lease (of every
        shard) whose figures did not move since the last look, or that was leased
        under a cap above its budget's cap in ``caps`` (budget id -> cap in the
        policy now loaded: a cap cut mid-window, however busy the lease); charge
        the parent what a lease spent above its lease; forget leases that have
        expired. Returns the amount given back."""
        if now_ms < self._next_idle_look:
            return 0
        self._next_idle_look = now_ms + int(self.idle_s * 1000)
        total = 0
        seen = self._seen
        for shard in range(self.keys.shards):
            for lease_key, parent_key in (await self.store.lease_index(shard)).items():
                state = await self.store.lease_figures(lease_key)
                if state is None:
                    seen.pop(lease_key, None)
                    await self.store.forget_lease(shard, lease_key)
                    continue
                leased, settled, held, leased_under = state
                figures = (leased, settled, held)
                if settled + held > leased:
                    await self.charge_debt(lease_key, parent_key, figures, now_ms, 2.0)
                    seen.pop(lease_key, None)
                elif leased > settled + held and (
                        seen.get(lease_key) == figures
                        or self.above_cap(lease_key, leased_under, caps)):
                    total += await self.give_back(lease_key, parent_key, now_ms, 2.0)
                    seen.pop(lease_key, None)
                else:
                    seen[lease_key] = figures
        return total
