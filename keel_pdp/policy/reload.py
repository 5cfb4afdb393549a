"""Hot reload: one reference to the active snapshot, swapped atomically.

The directory is polled by content hash (not mtime), so Kubernetes ConfigMap
updates, which swap a symlink, are seen. A bad bundle is logged file by file
and counted; the last good snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Callable

from keel_pdp.policy.loader import PolicyError, content_hash, load_bundle
from keel_pdp.policy.snapshot import PolicySnapshot

log = logging.getLogger("keel_pdp.policy")


class PolicyHolder:
    def __init__(self, directory: pathlib.Path | str | None = None) -> None:
        self.directory = pathlib.Path(directory) if directory is not None else None
        self.current: PolicySnapshot | None = None
        self.last_error: PolicyError | None = None
        self._seen_hash = ""
        self.listeners: list[Callable[[PolicySnapshot | None, PolicyError | None], None]] = []

    def set(self, snapshot: PolicySnapshot) -> None:
        self.current = snapshot
        self._seen_hash = snapshot.content_hash
        for cb in self.listeners:
            cb(snapshot, None)

    def reload(self, force: bool = False) -> bool:
        """Load the directory if its content changed; True if a new snapshot is serving."""
        if self.directory is None:
            return False
        try:
            digest = content_hash(self.directory)
        except (PolicyError, OSError) as exc:
            err = exc if isinstance(exc, PolicyError) else PolicyError([])
            self._fail(err)
            return False
        if not force and digest == self._seen_hash:
            return False
        self._seen_hash = digest
        try:
            snapshot = load_bundle(self.directory)
        except PolicyError as exc:
            self._fail(exc)
            return False
        self.current = snapshot
        self.last_error = None
        log.info("policy bundle %s loaded from %s (%d budgets, %d prices)",
                 snapshot.policy_revision, self.directory, len(snapshot.budgets),
                 len(snapshot.prices))
        for cb in self.listeners:
            cb(snapshot, None)
        return True

    def _fail(self, exc: PolicyError) -> None:
        self.last_error = exc
        for problem in exc.problems:
            log.error("policy bundle rejected: %s", problem)
        if self.current is not None:
            log.error("still serving policy %s", self.current.policy_revision)
        for cb in self.listeners:
            cb(None, exc)

    async def watch(self, interval_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:  # a watcher must never die
                log.exception("policy reload failed unexpectedly")
