"""Decision events taken while the budget store was unreachable, and their relay.

They wait here, in order, until the store is back. With a directory
configured, every event is also appended (and fsynced) to a journal file
before the caller gets its answer, so a sidecar killed during an outage does
not lose them: the next process to start claims every journal in the
directory that no live process holds and replays it.

A claim takes whole journals while what waits stays within the outbox's size
(``max_events``; the first journal always): the rest stay on disk, untouched,
and are claimed once what was taken has been replayed. So a directory of many
killed processes' journals neither fills memory nor makes the next appends drop
journaled decisions to make room.

A live process holds an exclusive ``flock`` on its own journal (a file name of
its pid and a random part: two containers sharing a volume may both be pid 1),
so another process on the same directory never takes it over. A claimed
journal is removed only once its entries are in the claimant's own journal: a
process killed while claiming loses nothing. Lines that are not a row (a write
torn by a kill, garbage) are skipped and logged; rows this version cannot
replay (a newer version's) are set aside in ``rejected-*.jsonl`` for an
operator, never replayed and never blocking the rows after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pathlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO

from keel_pdp.budget.store import BudgetStore, DegradedPermit
from keel_pdp.errors import StoreUnavailable
from keel_pdp.events import ABORT_REASON, release_data
from keel_pdp.metrics import Metrics

log = logging.getLogger("keel_pdp.outbox")

# type, permit_id, ts_ms, data, res, spec: "" for a plain event; JSON for a degraded
# permit's record or for an "abort" (see Engine._enqueue)
Event = tuple[str, str, int, str, str, str]

# While the journal cannot be written (disk full, directory gone), how often an
# append tries again to write the whole journal.
REWRITE_RETRY_S = 1.0
_DEGRADED_SPEC = {"keys": list, "wx": list, "meta": str, "est": int, "k": int, "exp": int,
                  "ret": int}
_ABORT_SPEC = {"ik": str, "keys": list}


def _replayable(ev: Event) -> bool:
    """Whether this version knows how to replay ``ev`` (see OutboxRelay._replay)."""
    etype, _, _, _, _, spec = ev
    if etype not in ("decision", "abort"):
        return False
    if not spec:
        return etype == "decision"
    try:
        extra = json.loads(spec)
    except ValueError:
        return False
    want = _ABORT_SPEC if etype == "abort" else _DEGRADED_SPEC
    return isinstance(extra, dict) and all(
        isinstance(extra.get(k), t) and not isinstance(extra.get(k), bool)
        for k, t in want.items())


def _row(line: bytes) -> Event | None:
    """A journal line as an event, or None when it is not a row at all."""
    try:
        row = json.loads(line.decode("utf-8"))
        if not isinstance(row, list) or not 5 <= len(row) <= 6:
            return None
        etype, pid, ts, data, res = row[:5]
        spec = row[5] if len(row) > 5 else ""
        if not all(isinstance(v, str) for v in (etype, pid, data, res, spec)) or \
                not isinstance(ts, int) or isinstance(ts, bool):
            return None
        return (etype, pid, ts, data, res, spec)
    except ValueError:  # UnicodeDecodeError included
        return None


def _locked(path: pathlib.Path) -> int | None:
    """``path`` opened and exclusively locked, or None when a live process holds
    it (or it went away meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine, now = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(path)  # replaced by its owner's rewrite: look again
    except OSError:
        os.close(fd)
        return None
    return fd


class Outbox:
    def __init__(self, max_events: int = 100_000, directory: str | None = None,
                 on_journal_error: Callable[[], None] | None = None,
                 on_set_aside: Callable[[], None] | None = None) -> None:
        self.max_events = max_events
        self.dropped = 0
        self._q: deque[Event] = deque()
        self._dir = pathlib.Path(directory) if directory else None
        self._path: pathlib.Path | None = None
        self._fh: IO[str] | None = None  # our journal, flock'ed while we live
        self._behind = False  # the journal misses entries (a failed write)
        self._retry_at = 0.0
        self._on_journal_error = on_journal_error
        self._on_set_aside = on_set_aside
        self.left = 0  # journals a claim left on disk (they did not fit)
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._path = self._dir / f"outbox-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
            self._claim()

    def _journal_dirs(self) -> list[pathlib.Path]:
        """The directory, and the ``worker-<i>`` folders in it: earlier versions gave
        each pre-forked worker a folder of its own, which only a worker of the same
        number claimed (so a restart with fewer workers, or none, left them)."""
        assert self._dir is not None
        return [self._dir, *sorted(d for d in self._dir.glob("worker-*") if d.is_dir())]

    def _claim(self) -> None:
        assert self._dir is not None
        dirs = self._journal_dirs()
        # claimed-*: left by an earlier version killed while it claimed
        found = sorted(path for d in dirs for pattern in ("outbox-*.jsonl", "claimed-*.jsonl")
                       for path in d.glob(pattern))
        claimed: list[tuple[pathlib.Path, int]] = []
        rejected: list[bytes] = []
        had = len(self._q)
        self.left = 0
        try:
            for old in found:
                fd = _locked(old)
                if fd is None:
                    continue  # a live process's journal
                with open(fd, "rb", closefd=False) as fh:
                    raw = fh.read()
                rows: list[Event] = []
                refused: list[bytes] = []
                bad = 0
                for line in raw.split(b"\n"):
                    if not line.strip():
                        continue
                    ev = _row(line)
                    if ev is None:
                        bad += 1
                    elif not _replayable(ev):
                        refused.append(line)
                    else:
                        rows.append(ev)
                if self._q and len(self._q) + len(rows) > self.max_events:
                    os.close(fd)  # for a later claim, once what was taken is replayed
                    self.left += 1
                    continue
                claimed.append((old, fd))
                self._q.extend(rows)
                rejected.extend(refused)
                if bad:
                    log.error("outbox journal %s: skipping %d unreadable line(s) (a write "
                              "torn by a kill, or not a journal)", old.name, bad)
            if self.left:
                log.warning("outbox: %d journal(s) in %s left for later: claiming them now "
                            "would hold more than %d events; they are claimed once these "
                            "are replayed", self.left, self._dir, self.max_events)
            if rejected:
                self._set_aside_lines(rejected)
            if len(self._q) > had:
                log.warning("replaying %d decision events journaled before a restart",
                            len(self._q) - had)
                self._rewrite()
            # Only now that every entry is in our journal (or set aside).
            for old, _ in claimed:
                old.unlink(missing_ok=True)
        except OSError as exc:
            # Journals left in place: the next process claims them again (replays are
            # idempotent); what was read is replayed from memory meanwhile.
            self._journal_failed(exc)
        finally:
            for _, fd in claimed:
                os.close(fd)
        for tmp in (t for d in dirs for t in d.glob("outbox-*.tmp")):  # a rewrite killed midway
            fd = _locked(tmp)
            if fd is not None:
                tmp.unlink(missing_ok=True)
                os.close(fd)
        for d in dirs[1:]:
            with contextlib.suppress(OSError):
                d.rmdir()  # only once empty

    def _set_aside_lines(self, lines: list[bytes]) -> None:
        assert self._dir is not None
        path = self._dir / f"rejected-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
        with open(path, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        log.error("outbox: %d journaled row(s) this version cannot replay were set aside in "
                  "%s; they did not reach the ledger: replay them with the version that "
                  "wrote them, or book them by hand", len(lines), path.name)
        if self._on_set_aside is not None:
            for _ in lines:
                self._on_set_aside()

    def set_aside(self, ev: Event) -> None:
        """Keep ``ev`` (it could not be replayed) apart for an operator."""
        line = json.dumps(ev, separators=(",", ":")).encode()
        if self._dir is None:
            log.error("outbox: a row that could not be replayed was dropped: %s",
                      line.decode()[:2000])
            if self._on_set_aside is not None:
                self._on_set_aside()
            return
        try:
            self._set_aside_lines([line])
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc: OSError) -> None:
        if self._on_journal_error is not None:
            self._on_journal_error()
        self._retry_at = time.monotonic() + REWRITE_RETRY_S
        if not self._behind:
            log.error("outbox journal %s cannot be written (%s): %d decision events are kept "
                      "in memory only until it can; a restart now would lose them",
                      self._path.name if self._path else "-", exc, len(self._q))
        self._behind = True

    def _rewrite(self) -> None:
        """The journal, written anew from what waits; raises OSError."""
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 (kept open: it holds the lock)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            for ev in self._q:
                fh.write(json.dumps(ev, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except OSError:
            fh.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        old, self._fh = self._fh, fh
        if old is not None:
            old.close()
        if self._behind:
            log.warning("outbox journal %s is written again (%d decision events)",
                        self._path.name, len(self._q))
        self._behind = False

    def append(self, ev: Event) -> None:
        if len(self._q) >= self.max_events:
            self._q.popleft()
            self.dropped += 1
            log.error("outbox full: oldest unrecorded decision dropped")
        self._q.append(ev)
        if self._path is None:
            return
        if self._behind and time.monotonic() < self._retry_at:
            if self._on_journal_error is not None:
                self._on_journal_error()
            return
        try:
            if self._fh is not None and os.fstat(self._fh.fileno()).st_nlink == 0:
                # Removed under us (the directory deleted): writes would go to a file
                # no restart can find.
                log.error("outbox journal %s was removed; writing it again", self._path.name)
                self._behind = True
            if self._fh is None or self._behind:
                # No journal yet, or one a failed write may have left torn: the
                # whole of it, so no entry is glued to a torn line.
                self._rewrite()
            else:
                self._fh.write(json.dumps(ev, separators=(",", ":")) + "\n")
                self._fh.flush()
                os.fsync(self._fh.fileno())
        except OSError as exc:
            self._journal_failed(exc)

    def claim_left(self) -> bool:
        """Claim the journals an earlier claim left on disk, now that the outbox is
        empty; returns whether it took any events."""
        if not self.left or self._q or self._dir is None:
            return False
        self._claim()
        return bool(self._q)

    def peek(self) -> Event:
        return self._q[0]

    def pop(self) -> None:
        self._q.popleft()

    def sync(self) -> None:
        """Make the journal match what is still waiting (after a flush)."""
        if self._path is None:
            return
        try:
            if not self._q:
                self._path.unlink(missing_ok=True)  # before the lock goes with the file
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                self._behind = False
            else:
                self._rewrite()
        except OSError as exc:
            self._journal_failed(exc)

    def close(self) -> None:
        """Let go of the journal (as the exit of the process does): another process
        may claim what it still holds."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

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
        self._box = Outbox(size, directory, metrics.outbox_journal_errors.inc,
                           metrics.outbox_set_aside.inc)
        self._task: asyncio.Task[int] | None = None
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._box)

    def close(self) -> None:
        """Stop replaying and let go of the journal, as a killed process does."""
        if self._task is not None:
            self._task.cancel()
        self._box.close()

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
            down = False
            while not down:
                taken = 0
                while self._box:
                    ev = self._box.peek()
                    try:
                        await self._replay(*ev)
                        done += 1
                    except StoreUnavailable:
                        down = True
                        break
                    except Exception:
                        # Not an outage: retrying would block every entry behind it.
                        log.exception("outbox: the entry for permit %s could not be "
                                      "replayed; setting it aside", ev[1])
                        self._box.set_aside(ev)
                    self._box.pop()
                    taken += 1
                if taken:
                    self._box.sync()
                # Journals a claim left on disk (they did not fit) come next.
                if down or not self._box.claim_left():
                    break
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
