"""The budget store: one typed async method per Lua script.

This is the only module that talks to Redis for holds. Each method is one
script call (one round trip); every key a script touches is passed in KEYS.
Any Redis failure or timeout surfaces as ``StoreUnavailable`` so the caller
can apply the budgets' fail modes.

The calls go through a small transport: the pipelined RESP client of
``keel_pdp.budget.resp`` in production (``from_url``), or redis-py for a client
handed in directly (fakeredis in unit tests, tools). ``client`` stays a
redis-py client either way, for the non-hot-path ``window`` read.

A ``redis+cluster://`` URL gives the Redis Cluster client of
``keel_pdp.budget.cluster`` for the scripts and redis-py's ``RedisCluster`` for
the administrative reads. ``wait_replicas`` > 0 sends ``WAIT`` after each
script on the same connection (see docs/redis-cluster.md, "Durability").
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from keel_pdp.budget.cluster import (
    ClusterClient,
    describe_cluster_url,
    is_cluster_url,
    redis_py_options,
)
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.records import RECORDS_FORMAT, check_format, declared_format
from keel_pdp.budget.replies import (
    HoldReply,
    ReleaseReply,
    SettleReply,
    hold_reply,
    release_reply,
    settle_reply,
)
from keel_pdp.budget.resp import RespClient, RespError, Shared
from keel_pdp.budget.store_transport import RedisPyTransport, Transport, WaitingTransport
from keel_pdp.budget.store_types import (
    Arg,
    DegradedPermit,
    HoldCandidate,
    HoldRequest,
    PermitRecord,
    hold_shape,
)
from keel_pdp.errors import StoreUnavailable

# A shape's stored copy lives this long after it was last sent (refreshed while in
# use): a ledger writer that falls further behind finds it gone (docs/ledger.md).
SHAPE_COPY_TTL_S = 8 * 86400
SHAPE_COPY_REFRESH_S = 3600
# The store's scripts (keel_pdp/budget/lua/<name>.lua).
_SCRIPTS = ("authorize", "closeout", "release", "record", "abort", "grant", "escrow")
# Answers the authorize script gives before it reaches the shape's copy.
_BEFORE_COPY = frozenset(("replay", "reused", "ended", "aborted", "lease"))

__all__ = [
    "Arg", "BudgetStore", "DegradedPermit", "HoldCandidate", "HoldRequest", "PermitRecord",
    "RedisPyTransport", "StoreUnavailable", "Transport", "WaitingTransport", "describe_url",
    "hold_shape",
]


def _lua(name: str) -> str:
    return resources.files("keel_pdp.budget").joinpath("lua", name).read_text()


def script_source(name: str, records: int = RECORDS_FORMAT) -> str:
    """A script as the store sends it: ``RECORDS`` (the idempotency records'
    format, ``keel_pdp.budget.records``) set on its first line, then the file."""
    check_format(records)
    return f"local RECORDS = {records}\n" + _lua(name)


def _text(raw: Any) -> str:
    """A reply's bytes (RESP, redis-py) or str (decoded clients) as str."""
    return raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)


def _decode(raw: Any) -> dict[str, Any]:
    text = _text(raw)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable(f"unexpected script answer {text[:80]!r}")
    # No list ever goes through cjson (which would print an empty one as {}):
    # authorize.lua writes its lists by hand.
    return value


_FAILURES = (TimeoutError, RedisError, RespError, OSError)


DEFAULT_CLUSTER_SHARDS = 64


def default_shards(url: str) -> int:
    """Key shards when none are configured: one on a standalone Redis (all keys
    under one hash tag, as always), 64 on Redis Cluster (see docs/redis-cluster.md)."""
    return DEFAULT_CLUSTER_SHARDS if is_cluster_url(url) else 1


def describe_url(url: str) -> str:
    """Where a Redis URL points, without its credentials (for logs)."""
    if is_cluster_url(url):
        return describe_cluster_url(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def _connected_replicas(raw: Any) -> int | None:
    """``connected_slaves`` of an INFO replication reply (redis-py parses INFO)."""
    if isinstance(raw, dict):
        return int(raw.get("connected_slaves", 0))
    for line in _text(raw).splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.partition(":")[2])
    return None


class BudgetStore:
    """The budget store: holds, settlements, releases and events in Redis, one Lua
    script call per operation (see the module docstring).

    ``client`` (redis-py) serves the administrative reads (budget status, exception
    workflow); with the production RESP transport it is only built on first use, so
    a sidecar that never serves those calls never opens a redis-py pool.
    """

    def __init__(self, client: aioredis.Redis | None, keys: KeySpace,
                 timeout_s: float = 0.025, *, transport: Transport | None = None,
                 client_factory: Callable[[], aioredis.Redis] | None = None,
                 where: str = "", wait_replicas: int = 0, stored_shapes: bool = True,
                 records: int = RECORDS_FORMAT) -> None:
        self._client = client
        self._client_factory = client_factory
        self.where = where
        self.keys = keys
        self.timeout_s = timeout_s
        if transport is None:
            if client is None:
                raise ValueError("BudgetStore needs a redis-py client or a transport")
            transport = RedisPyTransport(client)
        self.transport: Transport = transport
        if wait_replicas < 0:
            raise ValueError(f"wait_replicas must be 0 (off) or more, not {wait_replicas}")
        if wait_replicas and not hasattr(transport, "eval_script_wait"):
            raise ValueError("waiting for replicas needs the RESP or Redis Cluster client "
                             "(redis-py pools connections, and WAIT counts one connection's "
                             "writes)")
        self.wait_replicas = wait_replicas
        # Decision events refer to a stored copy of their shape's members (False:
        # written whole, as before; for a fleet whose ledger writers are older).
        self.stored_shapes = stored_shapes
        # Shape copies sent, by key: when (monotonic s). Sent again when the script
        # finds one missing, and every SHAPE_COPY_REFRESH_S so a copy in use never
        # expires.
        self._copies_sent: dict[str, float] = {}
        # Writes WAIT confirmed on fewer replicas than asked, by script (see
        # docs/redis-cluster.md: they are answered as usual). ``on_short_wait`` is
        # called with the script's name, for the metric.
        self.short_waits = 0
        self.on_short_wait: Callable[[str], None] | None = None
        self._names: dict[int, str] = {}
        self.use_records(records)

    def use_records(self, records: int) -> None:
        """Write idempotency records in format ``records`` from now on (both are read
        whatever this is; ``keel_pdp.budget.records``)."""
        self._sources = {name: script_source(f"{name}.lua", records) for name in _SCRIPTS}
        self.records = records
        t, src = self.transport, self._sources
        self._authorize = t.script(src["authorize"])
        self._closeout = t.script(src["closeout"])
        self._release = t.script(src["release"])
        self._record = t.script(src["record"])
        self._abort = t.script(src["abort"])
        self._grant = t.script(src["grant"])
        self._escrow = t.script(src["escrow"])
        self._names = {id(self._authorize): "authorize", id(self._closeout): "closeout",
                       id(self._release): "release", id(self._record): "record",
                       id(self._abort): "abort", id(self._grant): "grant",
                       id(self._escrow): "escrow"}

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            if self._client_factory is None:
                raise RuntimeError("this budget store has no redis-py client")
            self._client = self._client_factory()
        return self._client

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "keel", timeout_s: float = 0.025,
                 max_connections: int = 64, client: str = "resp",
                 wait_replicas: int = 0, shards: int = 0,
                 stored_shapes: bool = True, records: int = RECORDS_FORMAT) -> BudgetStore:
        """``client``: "resp" (pipelined, the default) or "redis-py" for every call.
        A ``redis+cluster://`` URL: the Redis Cluster client for the scripts.
        ``shards``: key shards (0: ``default_shards(url)``). ``stored_shapes``: decision
        events refer to a stored copy of their shape's members (False: written whole).
        ``records``: the idempotency records' format (``keel_pdp.budget.records``)."""
        keyspace = KeySpace(prefix, shards or default_shards(url))
        if is_cluster_url(url):
            return cls._cluster(url, keyspace, timeout_s, max_connections, client,
                                wait_replicas, stored_shapes, records)

        def redis_py() -> aioredis.Redis:
            return aioredis.Redis.from_url(
                url,
                socket_timeout=max(timeout_s * 4, 0.25),
                socket_connect_timeout=max(timeout_s * 4, 0.25),
                max_connections=max_connections,
                health_check_interval=0,
                retry_on_timeout=False,
            )

        if client == "redis-py":
            return cls(redis_py(), keyspace, timeout_s, where=describe_url(url),
                       wait_replicas=wait_replicas, stored_shapes=stored_shapes,
                       records=records)
        if client != "resp":
            raise ValueError(f"unknown Redis client {client!r} (resp or redis-py)")
        resp = RespClient.from_url(url, connect_timeout_s=max(timeout_s * 4, 0.25))
        return cls(None, keyspace, timeout_s, transport=resp, client_factory=redis_py,
                   where=describe_url(url), wait_replicas=wait_replicas,
                   stored_shapes=stored_shapes, records=records)

    @classmethod
    def _cluster(cls, url: str, keyspace: KeySpace, timeout_s: float, max_connections: int,
                 client: str, wait_replicas: int, stored_shapes: bool,
                 records: int) -> BudgetStore:
        if client != "resp":
            raise ValueError(f"a Redis Cluster URL is served by the cluster client, not "
                             f"{client!r}")
        seeds, options = redis_py_options(url)

        def redis_py() -> aioredis.Redis:
            from redis.asyncio.cluster import ClusterNode, RedisCluster
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                socket_timeout=max(timeout_s * 4, 0.25),
                socket_connect_timeout=max(timeout_s * 4, 0.25),
                max_connections=max_connections, **options)
            # The administrative reads use commands both clients share (HGET,
            # HMGET, XRANGE, ZRANGE, non-transactional pipelines); redis-py types
            # the two apart.
            return cast(aioredis.Redis, cluster)

        transport = ClusterClient.from_url(url, connect_timeout_s=max(timeout_s * 4, 0.25))
        return cls(None, keyspace, timeout_s, transport=transport,
                   client_factory=redis_py, where=describe_url(url),
                   wait_replicas=wait_replicas, stored_shapes=stored_shapes, records=records)

    def _budget(self, timeout_s: float | None) -> float:
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        return max(budget, 0.001)

    async def _script(self, script: Any, keys: Sequence[str], args: Sequence[Arg],
                      timeout_s: float | None, shared: Shared | None = None) -> Any:
        if self.wait_replicas:
            return await self._script_wait(script, keys, args, timeout_s, shared)
        try:
            return await self.transport.eval_script(script, keys, args, self._budget(timeout_s),
                                                    shared)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _script_wait(self, script: Any, keys: Sequence[str], args: Sequence[Arg],
                           timeout_s: float | None, shared: Shared | None) -> Any:
        """The script, then WAIT on the same connection: one round trip. WAIT may
        take half the call's budget, so its reply (even a short count) comes back
        before the call times out and a written hold is never reported as a
        failure. A short count is counted and answered as usual."""
        budget = self._budget(timeout_s)
        wait_ms = max(1, int(budget * 500))
        transport = cast(WaitingTransport, self.transport)
        try:
            reply, acked = await transport.eval_script_wait(
                script, keys, args, budget, shared, self.wait_replicas, wait_ms)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if acked < self.wait_replicas:
            self.short_waits += 1
            if self.on_short_wait is not None:
                self.on_short_wait(self._names.get(id(script), "script"))
        return reply

    async def _command(self, *args: Arg, timeout_s: float) -> Any:
        try:
            return await self.transport.command(*args, timeout_s=timeout_s)
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def hold(self, r: HoldRequest, timeout_s: float | None = None) -> HoldReply:
        t0 = time.monotonic()
        keys, args, sent = self._hold_call(r)
        reply = hold_reply(await self._script(self._authorize, keys, args, timeout_s, r.shape))
        if reply.outcome == "shape":
            # The shape's copy is gone (expired, flushed, lost with a master): the
            # script wrote nothing. Send it with the request, once.
            keys, args, sent = self._hold_call(r, send_copy=True)
            left = None if timeout_s is None else timeout_s - (time.monotonic() - t0)
            reply = hold_reply(await self._script(self._authorize, keys, args, left, r.shape))
            if reply.outcome == "shape":
                raise StoreUnavailable("the authorize script refused the shape copy it was "
                                       "sent")
        if sent and reply.outcome in _BEFORE_COPY:
            # Answered before the script reached the copy: not written (the next
            # call sends it again).
            self._copies_sent.pop(r.shape.copy_key, None)
        return reply

    def hold_call(self, r: HoldRequest) -> tuple[list[str], list[Arg]]:
        """The request's own KEYS and ARGV of the authorize script (``r.shape`` has
        the rest). The shape's copy goes with it when this store has not sent it
        yet, or when it is due for a refresh."""
        keys, args, _ = self._hold_call(r)
        return keys, args

    def _hold_call(self, r: HoldRequest, send_copy: bool = False
                   ) -> tuple[list[str], list[Arg], bool]:
        ks, pid, shape = self.keys, r.permit_id, r.shape
        keys = [r.idempotency_key, ks.permit(pid), ks.expiries_of(pid), ks.stream_of(pid)]
        args: list[Arg] = [r.permit_id, r.fingerprint, r.now_ms, r.expires_at_ms,
                           r.expires_at_ms // 1000 + shape.permit_retention_s, r.event_data,
                           len(r.candidates)]
        for c in r.candidates:
            args.extend((c.estimate_micros, c.input_pico, c.output_price_pico, c.output_tokens,
                         1 if c.may_constrain else 0, c.permit_meta))
            if c.budget_indexes == shape.every:
                args.append("a")
            else:
                args.append(len(c.budget_indexes))
                args.extend(i + 1 for i in c.budget_indexes)
        copy_key = shape.copy_key
        if copy_key:
            now = time.monotonic()
            sent = self._copies_sent.get(copy_key)
            if send_copy or sent is None or now - sent > SHAPE_COPY_REFRESH_S:
                if len(self._copies_sent) >= 65536:
                    self._copies_sent.clear()  # each is sent once more: no harm
                self._copies_sent[copy_key] = now
                args.extend((1 if r.refill else 0, shape.copy_text, SHAPE_COPY_TTL_S))
                return keys, args, True
        if r.refill:
            args.append(1)
        return keys, args, False

    async def settle(self, permit_id: str, window_keys: tuple[str, ...], now_ms: int,
                     actual_micros: int, event_data: str,
                     timeout_s: float | None = None, *, idempotency_key: str = "",
                     output_tokens: int = 0, input_over: bool = False,
                     overrun_factor: int = 4, overrun_slack_micros: int = 50_000,
                     priced_micros: int | None = None, keel_flags: Sequence[str] = (),
                     ) -> SettleReply:
        keys, args = self.settle_call(permit_id, window_keys, now_ms, actual_micros,
                                      event_data, idempotency_key=idempotency_key,
                                      output_tokens=output_tokens, input_over=input_over,
                                      overrun_factor=overrun_factor,
                                      overrun_slack_micros=overrun_slack_micros,
                                      priced_micros=priced_micros, keel_flags=keel_flags)
        return settle_reply(await self._script(self._closeout, keys, args, timeout_s))

    def settle_call(self, permit_id: str, window_keys: Sequence[str], now_ms: int,
                    actual_micros: int, event_data: str, *, idempotency_key: str = "",
                    output_tokens: int = 0, input_over: bool = False,
                    overrun_factor: int = 4, overrun_slack_micros: int = 50_000,
                    priced_micros: int | None = None, keel_flags: Sequence[str] = (),
                    ) -> tuple[list[str], list[Arg]]:
        """The closeout script's KEYS and ARGV (see closeout.lua). ``priced_micros``
        (Keel's own price of the usage; ``actual_micros`` when None) and ``keel_flags``
        are kept with the settlement for a retry's answer."""
        keys = self._permit_keys(permit_id, idempotency_key, window_keys)
        args: list[Arg] = [permit_id, now_ms, actual_micros, event_data, output_tokens,
                           1 if input_over else 0, overrun_factor, overrun_slack_micros,
                           f"{actual_micros if priced_micros is None else priced_micros},"
                           f"[{','.join(json.dumps(f) for f in keel_flags)}]"]
        return keys, args

    def _permit_keys(self, permit_id: str, idempotency_key: str,
                     window_keys: Sequence[str]) -> list[str]:
        """KEYS of the scripts that end a permit (closeout, release, abort): the permit,
        its shard's stream and expiry set, its request's idempotency record (the
        permit's own key when it has none), then its windows."""
        ks = self.keys
        pkey = ks.permit(permit_id)
        return [pkey, ks.stream_of(permit_id), ks.expiries_of(permit_id),
                idempotency_key or pkey, *window_keys]

    @property
    def script_sources(self) -> dict[str, str]:
        """The authorize and closeout scripts this store sends (for benchmarks)."""
        return {"authorize": self._sources["authorize"], "closeout": self._sources["closeout"]}

    async def release(self, permit_id: str, window_keys: tuple[str, ...], now_ms: int,
                      target: str, event_data: str,
                      timeout_s: float | None = None, *,
                      idempotency_key: str = "") -> ReleaseReply:
        keys = self._permit_keys(permit_id, idempotency_key, window_keys)
        args: list[str | int] = [permit_id, now_ms, target, event_data]
        return release_reply(await self._script(self._release, keys, args, timeout_s))

    async def abort(self, permit_id: str, idempotency_key: str, window_keys: Sequence[str],
                    now_ms: int, event_data: str, timeout_s: float,
                    tombstone_retention_s: int = 86400) -> ReleaseReply:
        """Undo an authorize whose reply was lost (see abort.lua); idempotent."""
        keys = self._permit_keys(permit_id, idempotency_key, window_keys)
        args: list[str | int] = [permit_id, now_ms, event_data, tombstone_retention_s]
        return release_reply(await self._script(self._abort, keys, args, timeout_s))

    async def record(self, event_type: str, permit_id: str, ts_ms: int, event_data: str,
                     result: str, timeout_s: float | None = None, *,
                     degraded: DegradedPermit | None = None,
                     retention_s: int = 900) -> str:
        """Append an event that holds nothing, once per permit id (record.lua). With
        ``degraded`` the permit record of a fail-open ALLOW is written with it."""
        args: list[str | int] = [event_type, permit_id, ts_ms, event_data, result]
        ks = self.keys
        keys = [ks.stream_of(permit_id), ks.permit(permit_id), ks.expiries_of(permit_id)]
        if degraded is None:
            args.extend(("marker", retention_s, "{}", 0, 0, 0, ""))
        else:
            keys.extend(degraded.keys)
            args.extend(("degraded", degraded.retention_s, degraded.meta,
                         degraded.estimate_micros, degraded.max_output_tokens,
                         degraded.expires_at_ms, ",".join(str(w) for w in degraded.wexp)))
        return _text(await self._script(self._record, keys, args, timeout_s))

    async def grant(self, grant_key: str, grant_id: str, amount_micros: int, expires_at_ms: int,
                    now_ms: int, event_data: str) -> dict[str, Any]:
        args: list[str | int] = [grant_id, amount_micros, expires_at_ms, now_ms, event_data]
        try:
            stream = self.keys.stream_of_key(grant_key)
        except ValueError:  # not one of ours: the first shard's stream (Cluster refuses a
            stream = self.keys.stream  # cross-slot call, so nothing is written)
        keys = [grant_key, stream]
        return _decode(await self._script(self._grant, keys, args,
                                          max(self.timeout_s, 1.0)))

    async def escrow(self, step: str, keys: Sequence[str], transfer_id: str, amount: int,
                     limit: int, expire_at_s: int, now_ms: int, event_data: str,
                     other_key: str, timeout_s: float | None = None,
                     least: int = 0) -> int:
        """One side of an escrow transfer (escrow.lua); returns the amount moved.
        Idempotent per (transfer id, step). ``least`` (take): lease nothing unless
        at least that much is available."""
        args: list[str | int] = [step, transfer_id, amount, limit, expire_at_s, now_ms,
                                 event_data, other_key, least]
        text = _text(await self._script(self._escrow, keys, args, timeout_s))
        if not text.isdigit():
            raise StoreUnavailable(f"escrow {step} answered {text[:40]!r}")
        return int(text)

    async def lease_index(self, shard: int) -> dict[str, str]:
        """A shard's leases on shared budgets: lease key -> parent window key."""
        raw = await self._command("HGETALL", self.keys.leases(shard),
                                  timeout_s=max(self.timeout_s, 1.0))
        if isinstance(raw, dict):
            pairs = list(raw.items())
        else:
            pairs = list(zip(raw[::2], raw[1::2], strict=True))
        return {_text(k): _text(v) for k, v in pairs}

    async def lease_figures(self, key: str) -> tuple[int, int, int, int | None] | None:
        """A lease's (leased, settled, held, the cap of its last refill: None when
        written before leases recorded it); None once it has expired."""
        raw = await self._command("HMGET", key, "g", "s", "h", "c",
                                  timeout_s=max(self.timeout_s, 1.0))
        if raw[0] is None:
            return None
        return (int(raw[0]), int(raw[1] or 0), int(raw[2] or 0),
                int(raw[3]) if raw[3] is not None else None)

    async def expire_at_s(self, key: str) -> int:
        """When a key expires (Unix s); negative when it has no expiry (-1) or is gone
        (-2)."""
        return int(await self._command("EXPIRETIME", key, timeout_s=max(self.timeout_s, 1.0)))

    async def forget_lease(self, shard: int, key: str) -> None:
        await self._command("HDEL", self.keys.leases(shard), key,
                            timeout_s=max(self.timeout_s, 1.0))

    async def permit(self, permit_id: str, timeout_s: float | None = None) -> PermitRecord | None:
        raw = await self._command("HMGET", self.keys.permit(permit_id), "keys", "meta", "state",
                                  "ik", timeout_s=self._budget(timeout_s))
        state = raw[2].decode() if raw[2] else ""
        if not state or state in ("denied", "aborted"):
            return None
        keys = tuple(raw[0].decode().split("\n")) if raw[0] else ()
        meta = json.loads(raw[1]) if raw[1] else {}
        return PermitRecord(keys, meta, state, raw[3].decode() if raw[3] else "")

    async def time_ms(self) -> int:
        """The store's clock (Redis TIME) in epoch ms: the one clock every sidecar
        sharing the store reads alike."""
        raw = await self._command("TIME", timeout_s=max(self.timeout_s, 1.0))
        return int(raw[0]) * 1000 + int(raw[1]) // 1000

    async def due_expiries(self, now_ms: int, limit: int = 200, shard: int = 0) -> list[str]:
        raw = await self._command("ZRANGEBYSCORE", self.keys.expiry_sets[shard], "-inf", now_ms,
                                  "LIMIT", 0, limit, timeout_s=max(self.timeout_s, 1.0))
        return [_text(r) for r in raw]

    async def window(self, key: str) -> tuple[int, int]:
        raw = await self._command("HMGET", key, "s", "h", timeout_s=max(self.timeout_s, 1.0))
        return int(raw[0] or 0), int(raw[1] or 0)

    async def warm(self) -> bool:
        """Connect and load every script so the first decision pays for neither."""
        try:
            for name in ("authorize", "closeout", "release", "record", "abort", "escrow"):
                await self._command("SCRIPT", "LOAD", self._sources[name], timeout_s=2.0)
            return True
        except StoreUnavailable:
            return False

    async def layout_problem(self) -> str | None:
        """Record this key space's shard count in the store unless one is recorded
        already; say why not to run when the recorded one differs."""
        ks = self.keys
        recorded = await self._command("GET", ks.layout, timeout_s=2.0)
        if recorded is None:
            single = await self._command("EXISTS", ks.single_shard_stream, timeout_s=2.0)
            for key, value in ks.first_records(bool(single)):
                await self._command("SET", key, value, "NX", timeout_s=2.0)
            recorded = await self._command("GET", ks.layout, timeout_s=2.0)
        return ks.layout_problem(recorded)

    async def declared_records(self) -> tuple[int, Any]:
        """The idempotency records' format the deployment declares, and the key's
        raw value (None: not set, format 1)."""
        raw = await self._command("GET", self.keys.records, timeout_s=2.0)
        return declared_format(raw), raw

    async def declare_records(self, records: int) -> None:
        """Declare the format every sidecar of the deployment may write
        (``keel-pdp records --upgrade``)."""
        check_format(records)
        await self._command("SET", self.keys.records, records, timeout_s=2.0)

    async def adopt_records(self) -> int:
        """Write idempotency records in the format the deployment has declared
        (``keel-pdp records``): format 1 unless it says otherwise."""
        declared, _ = await self.declared_records()
        self.use_records(declared)
        return self.records

    async def fewest_replicas(self) -> int | None:
        """The fewest replicas any master of the store has (None: could not tell),
        so ``serve`` can say at start that ``--wait-replicas`` cannot be met."""
        try:
            if isinstance(self.transport, ClusterClient):
                # Each master's own count (CLUSTER SLOTS leaves out replicas the
                # cluster does not consider synced yet).
                replies = await self.transport.on_every_master("INFO", "replication",
                                                               timeout_s=2.0)
            else:
                replies = [await self._command("INFO", "replication", timeout_s=2.0)]
        except (StoreUnavailable, *_FAILURES):
            return None
        counts = [_connected_replicas(r) for r in replies]
        known = [c for c in counts if c is not None]
        return min(known) if known and len(known) == len(counts) else None

    async def ping(self) -> bool:
        try:
            await self._command("PING", timeout_s=max(self.timeout_s, 0.5))
            return True
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if not isinstance(self.transport, RedisPyTransport):
            await self.transport.close()
        if self._client is not None:
            await self._client.aclose()

