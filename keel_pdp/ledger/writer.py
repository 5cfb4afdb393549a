"""The ledger writer: decision stream -> ledger store, each event exactly once.

Delivery is at least once (a Redis consumer group; entries are acknowledged
only after the transaction that stores them has committed) and storage is
idempotent on the stream entry id, so together each event is stored exactly
once. A sharded key space has one stream per shard, each with its own consumer
group; the writer reads them in turn, and the ledger's event id is then the
shard's tag + "/" + the stream id (stream ids are unique per stream only).
A writer that restarts reads its own pending entries first; entries left
pending by a consumer that died are claimed after ``claim_idle_ms``.

When the store or Redis is unavailable the writer keeps the batch, backs off
and retries; nothing is acknowledged that is not stored. Entries that cannot
be parsed are moved to ``<stream>:dead`` with the reason, in the same MULTI as
their acknowledgement. The stream is trimmed only below the oldest entry that
some consumer group has not acknowledged; entries someone else deleted before
the group read them are reported (dead-letter stream, metric), not skipped, and
each such loss once (``report_loss.lua``), however many writers see it and
however often they restart.

A store that cannot be used as it is (a privilege revoked, a column's type
changed by hand: ``StoreBroken``) stops the writer with exit 2 and an error that
names the problem; the batch in hand stays pending, to be stored exactly once by
the writer started after the repair.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from keel_pdp.budget.keys import KeySpace, shape_copy_key
from keel_pdp.errors import SettingsError
from keel_pdp.events import entry_shape, entry_with_shape
from keel_pdp.ledger.events import ParseError, StreamEvent, parse_entry
from keel_pdp.ledger.metrics import LedgerMetrics
from keel_pdp.ledger.store import (
    LedgerStore,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    now_ms,
)

log = logging.getLogger("keel_pdp.ledger")

Raw = tuple[str, dict[bytes, bytes] | None]


@dataclass(frozen=True)
class WriterConfig:
    key_prefix: str = "keel"
    group: str = "keel-ledger"
    consumer: str = ""
    batch_size: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    claim_interval_s: float = 10.0
    trim: bool = True
    trim_interval_s: float = 30.0
    stats_interval_s: float = 5.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    shards: int = 1  # the key space's shards: one stream (and group) each

    @property
    def consumer_name(self) -> str:
        return self.consumer or socket.gethostname() or "ledger"


def stream_id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def parse_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def successor(value: str) -> str:
    ms, seq = parse_id(value)
    return f"{ms}-{seq + 1}"


class LayoutMismatch(SettingsError):
    """The writer's --key-shards differs from the deployment's recorded one."""


class Backoff:
    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.current = 0.0

    def next(self) -> float:
        self.current = self.initial_s if self.current == 0 else min(self.current * 2, self.max_s)
        return self.current * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.current = 0.0


@dataclass
class _StreamState:
    """Where the writer stands on one shard's stream."""

    stream: str
    next_trim: float
    # Stream ids are unique per stream only: with several shards the ledger's
    # event id is the shard's tag, "/", and the stream id.
    id_prefix: str = ""
    pending_cursor: str | None = "0"
    claim_cursor: str = "0-0"
    next_claim: float = 0.0
    group_ready: bool = False

    @property
    def dead_stream(self) -> str:
        return self.stream + ":dead"

    @property
    def losses(self) -> str:
        """The losses already reported (report_loss.lua); same hash slot as the stream."""
        return self.stream + ":losses"


class LedgerWriter:
    def __init__(self, config: WriterConfig, store: LedgerStore, client: redis.Redis,
                 metrics: LedgerMetrics | None = None) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.metrics = metrics or LedgerMetrics()
        keys = self.keys = KeySpace(config.key_prefix, config.shards)
        self._layout_checked = False
        # One consumer group per shard's stream; events of one permit are all on
        # its shard's stream, so order per permit holds shard by shard.
        self.shards = [_StreamState(stream, time.monotonic() + config.trim_interval_s,
                                    f"{tag}/" if len(keys.tags) > 1 else "")
                       for stream, tag in zip(keys.streams, keys.tags, strict=True)]
        self.cur = self.shards[0]
        self.stream = self.cur.stream  # the first shard's (the only one of one shard)
        self.consumer = config.consumer_name
        self.stopping = threading.Event()
        self._next_stats = 0.0
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        self.stored_total = 0
        self.dead_total = 0
        # Shape copies read (digest -> text), checked against their digest.
        self._shapes: dict[str, str] = {}
        self.failure: StoreError | None = None  # why run() stopped with exit 2
        self._report_loss = client.register_script(
            resources.files("keel_pdp.ledger").joinpath("lua", "report_loss.lua").read_text())

    # ------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Consume until ``stop()``; returns 0. Returns 2 when the deployment's key
        layout is not this writer's (``KeySpace.layout_problem``) or the ledger store
        cannot be used as it is (``StoreError``, kept in ``failure``): retrying
        cannot help, and the batch in hand stays pending for the next writer."""
        log.info("ledger writer %s consuming %s as group %s", self.consumer,
                 self.cur.stream if len(self.shards) == 1 else f"{len(self.shards)} streams",
                 self.config.group)
        while not self.stopping.is_set():
            try:
                self.step()
            except RedisError as exc:
                self._redis_failed(exc)
            except LayoutMismatch as exc:
                log.error("%s", exc)
                return 2
            except StoreError as exc:
                self.failure = exc
                log.error("ledger writer stopped: %s. The batch in hand was not stored; its "
                          "stream entries stay pending and the writer started after the "
                          "repair stores them once (%d events stored before)",
                          exc, self.stored_total)
                return 2
        log.info("ledger writer stopped (%d events stored, %d dead-lettered)",
                 self.stored_total, self.dead_total)
        return 0

    def _redis_failed(self, exc: Exception) -> None:
        self.metrics.errors.labels("redis").inc()
        self.metrics.up.labels("redis").set(0)
        for state in self.shards:
            state.group_ready = False
            # After a reconnect, first re-read what this consumer holds.
            state.pending_cursor = "0"
        delay = self._backoff.next()
        log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
        self.stopping.wait(delay)

    def ensure_group(self) -> None:
        if self.cur.group_ready:
            return
        if not self._layout_checked:
            ks = self.keys
            if self.client.get(ks.layout) is None:
                single = bool(self.client.exists(ks.single_shard_stream))
                for key, value in ks.first_records(single):
                    self.client.set(key, value, nx=True)
            problem = ks.layout_problem(self.client.get(ks.layout))
            if problem is not None:
                raise LayoutMismatch(problem)
            self._layout_checked = True
        try:
            # "0": a new group starts at the beginning, so nothing already in the
            # stream is skipped.
            self.client.xgroup_create(self.cur.stream, self.config.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.cur.group_ready = True

    # ------------------------------------------------------------ one step
    def step(self) -> int:
        """Read one batch from each shard's stream (own pending, claimed, or new),
        store and ack it; returns how many entries were handled."""
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + self.config.stats_interval_s
            self.refresh_stats()
        if len(self.shards) == 1:
            return self._step_one(self.shards[0], self.config.block_ms)
        total = 0
        for state in self.shards:
            total += self._step_one(state, None)
            if self.stopping.is_set():
                break
        if not total:
            # Nothing on any shard: wait a little before looking again.
            self.stopping.wait(min(self.config.block_ms, 100) / 1000)
        return total

    def _step_one(self, state: _StreamState, block: int | None) -> int:
        self.cur = state
        self.ensure_group()
        if self.config.trim and time.monotonic() >= state.next_trim:
            state.next_trim = time.monotonic() + self.config.trim_interval_s
            self.trim()
        batch = self.read(block)
        self.metrics.up.labels("redis").set(1)
        self._backoff.reset()
        if not batch:
            return 0
        self.handle(batch)
        return len(batch)

    def read(self, block: int | None = None) -> list[Raw]:
        cfg = self.config
        try:
            if self.cur.pending_cursor is not None:
                got = self._xread(self.cur.pending_cursor, block=None)
                if got:
                    self.cur.pending_cursor = got[-1][0]
                    return got
                self.cur.pending_cursor = None
            if time.monotonic() >= self.cur.next_claim:
                claimed = self.claim()
                if claimed:
                    return claimed
            self.check_loss()
            return self._xread(">", block=block)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # The stream or group vanished (Redis restarted without data):
                # recreate it and start again from the beginning.
                log.error("consumer group %s is gone; recreating it", cfg.group)
                self.cur.group_ready = False
                self.cur.pending_cursor = "0"
                return []
            raise

    def _xread(self, start: str, block: int | None) -> list[Raw]:
        resp: Any = self.client.xreadgroup(self.config.group, self.consumer,
                                           {self.cur.stream: start},
                                           count=self.config.batch_size, block=block)
        if not resp:
            return []
        entries = resp[0][1]
        return [(stream_id(i), f) for i, f in entries]

    def claim(self) -> list[Raw]:
        cfg = self.config
        resp: Any = self.client.xautoclaim(self.cur.stream, cfg.group, self.consumer,
                                      min_idle_time=cfg.claim_idle_ms,
                                      start_id=self.cur.claim_cursor, count=cfg.batch_size)
        nxt = stream_id(resp[0])
        entries: list[Raw] = [(stream_id(i), f) for i, f in resp[1]]
        # Redis 7 drops entries deleted from the stream (trimmed, XDEL) from the
        # group and names them here only: passed on without fields, they are
        # dead-lettered as deleted (as one of our own pending entries would be)
        # instead of vanishing without a trace.
        entries.extend((stream_id(i), None) for i in (resp[2] if len(resp) > 2 else []))
        entries.sort(key=lambda e: parse_id(e[0]))
        self.cur.claim_cursor = nxt
        if nxt == "0-0":
            self.cur.next_claim = time.monotonic() + cfg.claim_interval_s
            self._forget_idle_consumers()
        if entries:
            self.metrics.claimed.inc(len(entries))
            log.warning("claimed %d entries left pending by another consumer", len(entries))
        return entries

    def check_loss(self) -> int | None:
        """Report entries deleted from the stream before this group read them: a
        trim by someone else (XTRIM MAXLEN while the writer was down or behind) or an
        XDEL. Reading on would skip them without a trace. Each loss is reported once
        (report_loss.lua), however many writers see it and however often they
        restart. Returns how many were newly reported (None: at least one, the
        number is unknown; 0: none)."""
        stream_info: Any = self.client.xinfo_stream(self.cur.stream)
        groups: Any = self.client.xinfo_groups(self.cur.stream)
        group = next((g for g in groups if stream_id(g["name"]) == self.config.group), None)
        if group is None:
            return 0
        last = parse_id(stream_id(group.get("last-delivered-id", b"0-0")))
        at = f"{last[0]}-{last[1]}"
        first = stream_info.get("first-entry")
        lag = group.get("lag")
        deleted = stream_id(stream_info.get("max-deleted-entry-id", b"0-0"))
        # A trim cuts the head: when the whole stream lies after the group's
        # position, the entries added since (lag) are all still there unless lost.
        # Such a gap is known by the group's position, and grows while the group
        # stands there (the stream trimmed further): what it lost is reported once.
        if (first is None or parse_id(stream_id(first[0])) > last) and lag is not None \
                and int(lag) > int(stream_info.get("length", 0)):
            lost: int | None = int(lag) - int(stream_info.get("length", 0))
            where = f"{self.config.group}|gap|{at}"
            what = f"entries after {at}"
        elif parse_id(deleted) > last:
            # An XDEL after the group's position; Redis keeps only the largest id
            # deleted, so that is what tells one such loss from the next.
            lost = None
            where = f"{self.config.group}|deleted|{deleted}"
            what = f"entries after {at} (the last of them {deleted})"
        else:
            return 0
        reason = (f"{what} were deleted from the stream before the ledger read them: their "
                  "decisions and settlements are missing from the ledger")
        new = int(self._report_loss(
            keys=[self.cur.dead_stream, self.cur.losses],
            args=[where, "" if lost is None else lost, at, now_ms(), reason]))
        if new == 0:
            return 0
        self.metrics.lost.inc(1 if new < 0 else new)
        log.error("%s: %s %s", self.cur.stream, "some" if new < 0 else new, reason)
        return None if new < 0 else new

    def _forget_idle_consumers(self) -> None:
        idle_ms = max(self.config.claim_idle_ms * 10, 3_600_000)
        for c in self.client.xinfo_consumers(self.cur.stream, self.config.group):
            name = stream_id(c.get("name", b""))
            if name != self.consumer and int(c.get("pending", 0)) == 0 \
                    and int(c.get("idle", 0)) > idle_ms:
                self.client.xgroup_delconsumer(self.cur.stream, self.config.group, name)

    # ------------------------------------------------------------ handling
    def handle(self, batch: Sequence[Raw]) -> None:
        t0 = time.perf_counter()
        events: list[StreamEvent] = []
        dead: list[tuple[str, dict[bytes, bytes] | None, str]] = []
        digests = [entry_shape(fields) for _, fields in batch]
        copies = self._shape_copies(digests)
        if copies is None:
            return  # stopping: leave the batch pending; it is re-read on restart
        for (eid, fields), digest in zip(batch, digests, strict=True):
            try:
                whole = fields if fields is None or digest is None else self._with_shape(
                    fields, digest, copies.get(digest))
                events.append(parse_entry(self.cur.id_prefix + eid, whole))
            except ParseError as exc:
                dead.append((eid, fields, str(exc)))  # as the stream has it
        if events:
            try:
                if not self._store_until_done(events):
                    return  # stopping: leave the batch pending; it is re-read on restart
            except StoreRejected as exc:
                # One event the store cannot hold must not block the stream: store
                # the batch one event at a time and dead-letter the ones refused.
                log.error("ledger store refused a batch (%s); storing it event by event", exc)
                fields_of = dict(batch)
                for ev in events:
                    try:
                        if not self._store_until_done([ev]):
                            return
                    except StoreRejected as one:
                        eid = ev.event_id.removeprefix(self.cur.id_prefix)
                        dead.append((eid, fields_of.get(eid),
                                     f"store refused the event: {one}"))
        self._ack_until_done([eid for eid, _ in batch], dead)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def _shape_copies(self, digests: Sequence[str | None]) -> dict[str, str | None] | None:
        """The stored shape copies of ``digests`` (None where Redis has none): from
        memory (a copy never changes: it is named by the hash of its text), else one
        MGET, retried while Redis is unavailable. None: stopping."""
        wanted = {d: self._shapes.get(d) for d in digests if d is not None}
        missing = [d for d, text in wanted.items() if text is None]
        if not missing:
            return wanted
        keys = [shape_copy_key(self.cur.stream, d) for d in missing]
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            try:
                found: Any = self.client.mget(keys)
                break
            except RedisError as exc:
                self.metrics.errors.labels("redis").inc()
                delay = backoff.next()
                log.warning("cannot read %d shape copies (%s); retrying in %.2fs",
                            len(keys), exc, delay)
                if self.stopping.wait(delay):
                    return None
        for digest, value in zip(missing, found, strict=True):
            if isinstance(value, bytes | bytearray):
                wanted[digest] = bytes(value).decode("utf-8", "replace")
        return wanted

    def _with_shape(self, fields: dict[bytes, bytes], digest: str,
                    copy: str | None) -> dict[bytes, bytes]:
        """``fields`` with the reference to shape ``digest`` replaced by ``copy``'s
        members. ParseError when the copy is gone or is not its named text."""
        full = entry_with_shape(fields, digest, copy, shape_copy_key(self.cur.stream, digest))
        # Checked against its name: kept (a copy never changes).
        if copy is not None and digest not in self._shapes:
            if len(self._shapes) >= 4096:
                self._shapes.clear()
            self._shapes[digest] = copy
        return full

    def _store_until_done(self, events: list[StreamEvent]) -> bool:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            try:
                new = self.store.write_batch(events, now_ms())
            except StoreUnavailable as exc:
                self.metrics.errors.labels("store").inc()
                self.metrics.up.labels("store").set(0)
                delay = backoff.next()
                log.warning("ledger store unavailable (%s); batch of %d kept, retrying in "
                            "%.2fs", exc, len(events), delay)
                if self.stopping.wait(delay):
                    return False
                continue
            self.metrics.up.labels("store").set(1)
            self.metrics.stored.inc(new)
            self.metrics.duplicates.inc(len(events) - new)
            self.stored_total += new
            return True

    def _ack_until_done(self, ids: list[str],
                        dead: list[tuple[str, dict[bytes, bytes] | None, str]]) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        at = str(now_ms())
        while True:
            try:
                pipe = self.client.pipeline(transaction=True)
                for eid, fields, reason in dead:
                    entry: dict[str | bytes, str | bytes] = {
                        "src_id": eid, "reason": reason[:1000], "at_ms": at}
                    for k, v in (fields or {}).items():
                        entry[b"orig:" + (k if isinstance(k, bytes) else str(k).encode())] = v
                    pipe.xadd(self.cur.dead_stream, entry)  # type: ignore[arg-type]
                pipe.xack(self.cur.stream, self.config.group, *ids)
                pipe.execute()
                break
            except RedisError as exc:
                # The events are stored; acking again later is harmless, and if this
                # process dies first they are redelivered and skipped as duplicates.
                self.metrics.errors.labels("redis").inc()
                self.metrics.up.labels("redis").set(0)
                delay = backoff.next()
                log.warning("cannot acknowledge %d stored entries (%s); retrying in %.2fs",
                            len(ids), exc, delay)
                if self.stopping.wait(delay):
                    return
        for eid, _, reason in dead:
            log.error("stream entry %s moved to %s: %s", eid, self.cur.dead_stream, reason)
        if dead:
            self.metrics.dead_lettered.inc(len(dead))
            self.dead_total += len(dead)

    # ------------------------------------------------------------ upkeep
    def safe_trim_floor(self) -> str | None:
        """The smallest id some consumer group still needs (None: keep everything)."""
        try:
            groups = self.client.xinfo_groups(self.cur.stream)
        except ResponseError:
            return None
        floor: tuple[int, int] | None = None
        for g in groups:
            pending = int(g.get("pending", 0))
            if pending:
                summary = self.client.xpending(self.cur.stream, stream_id(g["name"]))
                cand = parse_id(stream_id(summary["min"]))
            else:
                cand = parse_id(successor(stream_id(g.get("last-delivered-id", b"0-0"))))
            floor = cand if floor is None else min(floor, cand)
        if floor is None:
            return None
        return f"{floor[0]}-{floor[1]}"

    def trim(self) -> int:
        floor = self.safe_trim_floor()
        if floor is None:
            return 0
        removed = int(self.client.xtrim(self.cur.stream, minid=floor, approximate=False))
        if removed:
            self.metrics.trimmed.inc(removed)
            log.info("trimmed %d acknowledged entries below %s", removed, floor)
        return removed

    def refresh_stats(self) -> None:
        pending = lag_total = dead = 0
        for state in self.shards:
            try:
                groups = self.client.xinfo_groups(state.stream)
            except ResponseError:
                groups = []
            for g in groups:
                if stream_id(g["name"]) != self.config.group:
                    continue
                pending += int(g.get("pending", 0))
                lag = g.get("lag")
                if lag is None:
                    start = successor(stream_id(g.get("last-delivered-id", b"0-0")))
                    found: Any = self.client.xrange(state.stream, min=start, count=100_000)
                    lag = len(found)
                lag_total += int(lag)
            dead += int(self.client.xlen(state.dead_stream))
        self.metrics.pending.set(pending)
        self.metrics.lag.set(lag_total)
        self.metrics.dead_letter.set(dead)
