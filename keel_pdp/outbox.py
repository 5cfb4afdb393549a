"""Decision events taken while the budget store was unreachable, and their relay.

They wait here, in order, until the store is back. With a directory
configured, every event is also appended (and fsynced) to a journal file
before the caller gets its answer, so a sidecar killed during an outage does
not lose them: the next process to start claims every journal in the
directory (by an atomic rename) and replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
from collections import deque
from collections.abc import Iterator

from keel_pdp.budget.store import BudgetStore, DegradedPermit
from keel_pdp.errors import StoreUnavailable
from keel_pdp.events import ABORT_REASON, release_data
from keel_pdp.metrics import Metrics

log = logging.getLogger("keel_pdp.outbox")

# type, permit_id, ts_ms, data, res, spec: "" for a plain event; JSON for a degraded
# permit's record or for an "abort" (see Engine._enqueue)
Event = tuple[str, str, int, str, str, str]


class Outbox:
    def __init__(self, max_events: int = 100_000, directory: str | None = None) -> None:
        self.max_events = max_events
        self.dropped = 0
        self._q: deque[Event] = deque()
        self._dir = pathlib.Path(directory) if directory else None
        self._path: pathlib.Path | None = None
        self._fh: object = None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._path = self._dir / f"outbox-{os.getpid()}.jsonl"
            self._claim()

    def _claim(self) -> None:
        assert self._dir is not None
        assert self._path is not None
        # Our own name included: in a container every restart is the same pid.
        for old in sorted(self._dir.glob("outbox-*.jsonl")):
            mine = self._dir / f"claimed-{os.getpid()}-{os.urandom(4).hex()}-{old.name}"
            try:
                os.rename(old, mine)  # atomic: one claimant wins
            except OSError:
                continue
            for line in mine.read_text().splitlines():
                try:
                    row = json.loads(line)
                    etype, pid, ts, data, res = row[:5]
                    spec = row[5] if len(row) > 5 else ""
                    self._q.append((str(etype), str(pid), int(ts), str(data), str(res),
                                    str(spec)))
                except (ValueError, TypeError):
                    log.error("outbox journal %s: skipping an unreadable line", mine.name)
            mine.unlink()
        if self._q:
            log.warning("replaying %d decision events journaled before a restart",
                        len(self._q))
            self._rewrite()

    def _rewrite(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for ev in self._q:
                fh.write(json.dumps(ev, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def append(self, ev: Event) -> None:
        if len(self._q) >= self.max_events:
            self._q.popleft()
            self.dropped += 1
            log.error("outbox full: oldest unrecorded decision dropped")
        self._q.append(ev)
        if self._path is not None:
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(ev, separators=(",", ":")) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def peek(self) -> Event:
        return self._q[0]

    def pop(self) -> None:
        self._q.popleft()

    def sync(self) -> None:
        """Make the journal match what is still waiting (after a flush)."""
        if self._path is None:
            return
        if not self._q:
            self._path.unlink(missing_ok=True)
        else:
            self._rewrite()

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._q)


class OutboxRelay:
    """What was decided without the store, replayed into it in order, each entry once.

    Two kinds of entries wait here: decision events (a denial the store did not
    take in time, a fail-mode decision, a degraded permit with its record) and
    aborts of hold scripts whose answer was lost. Each kind is idempotent in the
    store (record.lua writes a record first, abort.lua a tombstone), so an entry
    whose earlier attempt ran but lost its reply is not applied twice.
    """

    def __init__(self, store: BudgetStore, metrics: Metrics, size: int = 100_000,
                 directory: str | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self._box = Outbox(size, directory)
        self._task: asyncio.Task[int] | None = None
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._box)

    def __bool__(self) -> bool:
        return bool(self._box)

    def enqueue(self, etype: str, pid: str, ts: int, data: str, res: str,
                degraded: DegradedPermit | None = None) -> None:
        spec = "" if degraded is None else json.dumps({
            "keys": list(degraded.keys), "wx": list(degraded.wexp), "meta": degraded.meta,
            "est": degraded.estimate_micros, "k": degraded.max_output_tokens,
            "exp": degraded.expires_at_ms, "ret": degraded.retention_s},
            separators=(",", ":"))
        self._append((etype, pid, ts, data, res, spec))

    def abort_later(self, pid: str, ts: int, idempotency_key: str,
                    window_keys: tuple[str, ...]) -> None:
        """Undo the hold the authorize script may still make under ``pid`` (its reply
        was lost): journaled first, sent at once (abort.lua; either order is safe)."""
        self._append(("abort", pid, ts, release_data(ts, ABORT_REASON), "",
                      json.dumps({"ik": idempotency_key, "keys": list(window_keys)},
                                 separators=(",", ":"))))
        self.kick()

    def _append(self, ev: Event) -> None:
        before = self._box.dropped
        self._box.append(ev)
        if self._box.dropped != before:
            self.metrics.outbox_dropped.inc()
        self.metrics.outbox.set(len(self._box))

    def kick(self) -> None:
        """Start a flush in the background unless one is running."""
        if self._box and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self.flush())

    async def flush_within(self, timeout_s: float | None) -> None:
        """Replay what waits (as ``flush``), waiting at most ``timeout_s`` (None: until
        done). A replay that takes longer goes on in the background: after an outage
        the outbox may hold more than one caller's deadline can wait for."""
        if timeout_s is None:
            await self.flush()
            return
        self.kick()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), max(timeout_s, 0.0))

    async def flush(self) -> int:
        """Replay what waits, in order, until the store fails; returns how many."""
        done = 0
        async with self._lock:
            while self._box:
                try:
                    await self._replay(*self._box.peek())
                except StoreUnavailable:
                    break
                self._box.pop()
                done += 1
            if done:
                self._box.sync()
            self.metrics.outbox.set(len(self._box))
        return done

    async def _replay(self, etype: str, pid: str, ts: int, data: str, res: str,
                      spec: str) -> None:
        extra = json.loads(spec) if spec else {}
        if etype == "abort":
            out = await self.store.abort(pid, str(extra["ik"]), list(extra["keys"]), ts, data,
                                         timeout_s=1.0)
            self.metrics.child(self.metrics.holds_aborted, out.status.lower()).inc()
            return
        degraded = None
        if extra:
            degraded = DegradedPermit(
                tuple(extra["keys"]), tuple(int(w) for w in extra["wx"]), str(extra["meta"]),
                int(extra["est"]), int(extra["k"]), int(extra["exp"]), int(extra["ret"]))
        await self.store.record(etype, pid, ts, data, res, timeout_s=1.0, degraded=degraded)
