"""Decision events taken while the budget store was unreachable.

They wait here, in order, until the store is back. With a directory
configured, every event is also appended (and fsynced) to a journal file
before the caller gets its answer, so a sidecar killed during an outage does
not lose them: the next process to start claims every journal in the
directory (by an atomic rename) and replays it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections import deque
from collections.abc import Iterator

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
