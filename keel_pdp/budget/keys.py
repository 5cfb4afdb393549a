"""Redis key layout.

Every name that comes from a caller (tenant, workload, request id, split
values) is percent-encoded so it can contain no separator, no hash-tag brace
and no glob character: two different names can never map to the same key, and
no name can reach another key.

**Shards.** The key space is cut into ``shards`` groups, each under its own hash
tag, so each group sits in one Redis Cluster slot and one script can touch all
the keys of one request. A tenant's keys (idempotency records, permits, its
budgets' windows) live in the tenant's shard; a permit id carries its shard in
its last digits, so a Closeout finds it without the tenant; every shard has its
own decision stream and expiry set. With one shard (the default on a standalone
Redis) the tag is ``{pdp}``, as it always was.

The shard tags are chosen so shard *i* hashes into the *i*-th equal part of the
16,384 slots: however a cluster splits the slots into contiguous ranges of
equal size, its masters get equal numbers of shards.

A budget shared by several tenants (no ``per: [tenant]`` and no single tenant in
its scope) has its window in a shard of its own; with more than one shard such a
budget is enforced by escrow (see ``keel_pdp.budget.escrow``).
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from typing import Protocol

from keel_pdp.budget.cluster_slots import key_slot
from keel_pdp.budget.records import RECORDS_FORMAT

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
PERMIT_ID_RE = re.compile(r"^pmt_[0-9a-f]{12}[0-9a-f]{16}$")
MAX_SHARDS = 1024  # the permit id's last 10 bits name the shard
SLOTS = 16384
_TENANT = 0  # the tenant's index in a budget's dimensions (policy.model.DIMENSIONS)
_PATTERN = re.compile(r"[*?\[]")

_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.\-]+")


def enc(value: str) -> str:
    if _SAFE_TEXT.fullmatch(value):
        return value
    return _enc_escaped(value)


@lru_cache(maxsize=65536)
def _enc_escaped(value: str) -> str:
    raw = value.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw) or "%"


@lru_cache(maxsize=16)
def shard_tags(shards: int) -> tuple[str, ...]:
    """The hash tag of each shard: ``pdp`` for one shard; otherwise for shard *i*
    the first ``s<j>`` (j = 0, 1, ...) whose slot lies in the *i*-th of ``shards``
    equal parts of the slot space."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"key shards must be 1 to {MAX_SHARDS}, not {shards}")
    if shards == 1:
        return ("pdp",)
    tags: list[str | None] = [None] * shards
    missing, j = shards, 0
    while missing:
        tag = f"s{j}"
        part = key_slot("{" + tag + "}") * shards // SLOTS
        if tags[part] is None:
            tags[part] = tag
            missing -= 1
        j += 1
    return tuple(t for t in tags if t is not None)


def tenant_shard(tenant: str, shards: int) -> int:
    """The shard of a tenant's keys (stable across processes and versions)."""
    if shards == 1:
        return 0
    return zlib.crc32(tenant.encode("utf-8", "surrogatepass")) % shards


def with_shard(hex_id: str, shard: int, shards: int) -> str:
    """``hex_id`` (ending in at least 3 hex digits) with its last 10 bits naming
    ``shard``: ``shard + shards x k``, k taken from those bits, so the rest stays as
    random as it was. Unchanged with one shard. Read back by ``permit_shard``."""
    if shards == 1:
        return hex_id
    tail = int(hex_id[-3:], 16)
    span = (MAX_SHARDS - 1 - shard) // shards + 1
    low = shard + shards * ((tail & (MAX_SHARDS - 1)) % span)
    return f"{hex_id[:-3]}{(tail & ~(MAX_SHARDS - 1) & 0xFFF) | low:03x}"


def permit_shard(permit_id: str, shards: int) -> int:
    """The shard a permit id was issued in (its last 10 bits, modulo ``shards``)."""
    if shards == 1:
        return 0
    return (int(permit_id[-3:], 16) & (MAX_SHARDS - 1)) % shards


def shape_copy_key(stream: str, digest: str) -> str:
    """Where the decisions of ``stream`` that refer to shape ``digest`` find the
    members they leave out (``keel_pdp.events.shape_ref``): the stream's name with
    ``events`` replaced by ``shape:<digest>``. Same hash tag, same slot: the script
    that writes a decision sees its copy, and a slot moves with both."""
    base = stream.removesuffix("events")
    return f"{base}shape:{digest}"


class BudgetLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def scope(self) -> tuple[str, str, str, str]: ...
    @property
    def per(self) -> tuple[int, ...]: ...


def single_tenant(budget: BudgetLike, split: tuple[str, ...]) -> str | None:
    """The one tenant a budget's window belongs to, or None when tenants share it."""
    if _TENANT in budget.per:
        return split[budget.per.index(_TENANT)]
    tenant = budget.scope[_TENANT]
    return None if _PATTERN.search(tenant) else tenant


class KeySpace:
    """The names of every Redis key of one deployment (``prefix``, ``shards``)."""

    def __init__(self, prefix: str = "keel", shards: int = 1) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", prefix):
            raise ValueError(f"key prefix {prefix!r} must match [A-Za-z0-9_.-]{{1,32}}")
        self.prefix = prefix
        self.shards = shards
        self.tags = shard_tags(shards)
        self.bases = tuple(f"{prefix}:{{{t}}}:" for t in self.tags)
        self.streams = tuple(b + "events" for b in self.bases)
        self.expiry_sets = tuple(b + "expiries" for b in self.bases)
        self._shard_of_tag = {t: i for i, t in enumerate(self.tags)}
        # The deployment's key layout (its shard count), under the one-shard tag:
        # sidecars and the ledger writer refuse to run on a different one.
        self.layout = f"{prefix}:{{pdp}}:layout"
        # The idempotency records' format the whole deployment may write
        # (keel_pdp.budget.records): "2", or absent for format 1.
        self.records = f"{prefix}:{{pdp}}:records"
        self.single_shard_stream = f"{prefix}:{{pdp}}:events"
        # Shard 0: the only one of a standalone deployment.
        self.base = self.bases[0]
        self.stream = self.streams[0]
        self.expiries = self.expiry_sets[0]

    def layout_to_record(self, single_shard_stream_exists: bool) -> str:
        """What to record as the layout when none is: a store written before the
        layout was recorded has one shard, which its one-shard stream gives away."""
        return "1" if single_shard_stream_exists else str(self.shards)

    def first_records(self, single_shard_stream_exists: bool) -> tuple[tuple[str, str], ...]:
        """The keys a sidecar or ledger writer sets, each only where absent (``SET
        NX``), on a store with no layout recorded: on a new store (no one-shard
        stream) the idempotency records format this release writes, since no sidecar
        of an earlier release shares it (keel_pdp.budget.records); then the layout."""
        first = () if single_shard_stream_exists else ((self.records, str(RECORDS_FORMAT)),)
        return (*first, (self.layout, self.layout_to_record(single_shard_stream_exists)))

    def layout_problem(self, recorded: bytes | str | None) -> str | None:
        """Why this key space must not run on a Redis whose layout key holds
        ``recorded`` (None: it may)."""
        if recorded is None:
            return None
        text = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
        if text == str(self.shards):
            return None
        return (f"--key-shards {self.shards} (env KEEL_KEY_SHARDS), but the keys under "
                f"prefix {self.prefix!r} in this Redis were written with {text} key "
                f"shard(s) ({self.layout}): every sidecar and the ledger writer of a "
                "deployment must use the same number. To change it, drain (no held "
                f"permits, the ledger writer caught up), delete {self.layout}, and restart "
                "them all with the new number")

    @property
    def escrow(self) -> bool:
        """Whether budgets shared by tenants are enforced by escrow (leases)."""
        return self.shards > 1

    # ----------------------------------------------------------- shards
    def tenant_shard(self, tenant: str) -> int:
        return tenant_shard(tenant, self.shards)

    def permit_shard(self, permit_id: str) -> int:
        return permit_shard(permit_id, self.shards)

    def key_shard(self, key: str) -> int:
        """The shard of a key of this key space (by its hash tag)."""
        start = key.find("{")
        end = key.find("}", start + 1)
        shard = self._shard_of_tag.get(key[start + 1:end]) if start >= 0 and end > 0 else None
        if shard is None:
            raise ValueError(f"{key[:80]!r} is not a key of this key space")
        return shard

    def home_shard(self, budget: BudgetLike, split: tuple[str, ...]) -> int:
        """Where a budget window lives: its tenant's shard, or (shared by tenants)
        a shard of its own."""
        if self.shards == 1:
            return 0
        tenant = single_tenant(budget, split)
        if tenant is not None:
            return self.tenant_shard(tenant)
        name = "\x00".join((budget.id, *split)).encode("utf-8", "surrogatepass")
        return zlib.crc32(name) % self.shards

    def is_shared(self, budget: BudgetLike, split: tuple[str, ...]) -> bool:
        """With escrow on: a budget window several tenants spend from."""
        return self.shards > 1 and single_tenant(budget, split) is None

    # ----------------------------------------------------------- keys
    def idempotency(self, tenant: str, request_id: str) -> str:
        base = self.bases[self.tenant_shard(tenant)]
        return f"{base}req:{enc(tenant)}:{enc(request_id)}"

    def permit(self, permit_id: str) -> str:
        return f"{self.bases[self.permit_shard(permit_id)]}permit:{permit_id}"

    def stream_of(self, permit_id: str) -> str:
        return self.streams[self.permit_shard(permit_id)]

    def shape_copy(self, shard: int, digest: str) -> str:
        """The stored copy of a shape's decision event members (``shape_copy_key``),
        in ``shard``: next to the stream whose decisions refer to it."""
        return shape_copy_key(self.streams[shard], digest)

    def expiries_of(self, permit_id: str) -> str:
        return self.expiry_sets[self.permit_shard(permit_id)]

    def stream_of_key(self, key: str) -> str:
        return self.streams[self.key_shard(key)]

    def grants(self, budget_id: str, split: tuple[str, ...], shard: int = 0) -> str:
        parts = ":".join(enc(v) for v in split)
        return f"{self.bases[shard]}grant:{budget_id}:{len(split)}:{parts}"

    def window(self, budget_id: str, split: tuple[str, ...], start_ms: int,
               shard: int = 0) -> str:
        parts = ":".join(enc(v) for v in split)
        return f"{self.bases[shard]}b:{budget_id}:{len(split)}:{parts}:{start_ms}"

    def lease(self, budget_id: str, split: tuple[str, ...], start_ms: int, shard: int) -> str:
        """A shard's lease on a shared budget's window (fields as a window's, plus
        ``g``: micro-USD leased to this shard)."""
        parts = ":".join(enc(v) for v in split)
        return f"{self.bases[shard]}l:{budget_id}:{len(split)}:{parts}:{start_ms}"

    @staticmethod
    def lease_budget(key: str) -> str:
        """The budget id in a lease's key (budget ids hold no ``:``)."""
        return key.partition("}:l:")[2].partition(":")[0]

    def lease_grants(self, budget_id: str, split: tuple[str, ...], shard: int) -> str:
        """What a lease's holds count as exception grants: a key nothing writes. A
        shared budget's grants live with its parent and count when the parent
        leases; a lease counting them too (its shard may be the parent's) would
        let them be spent twice."""
        parts = ":".join(enc(v) for v in split)
        return f"{self.bases[shard]}lgrant:{budget_id}:{len(split)}:{parts}"

    def transfer(self, transfer_id: str, shard: int, step: str) -> str:
        """The record of one step of an escrow transfer (idempotency). Named by the
        step: both sides of a transfer may share a shard."""
        return f"{self.bases[shard]}x:{transfer_id}:{step}"

    def leases(self, shard: int) -> str:
        """A shard's index of its leases (lease key -> parent key), for returns."""
        return f"{self.bases[shard]}leases"

    def budget_window(self, budget: BudgetLike, split: tuple[str, ...], start_ms: int) -> str:
        return self.window(budget.id, split, start_ms, self.home_shard(budget, split))

    def budget_grants(self, budget: BudgetLike, split: tuple[str, ...]) -> str:
        return self.grants(budget.id, split, self.home_shard(budget, split))
