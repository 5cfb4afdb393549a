"""Hot reload: one reference to the active snapshot, swapped atomically.

The directory is polled by content hash (not mtime), so Kubernetes ConfigMap
updates, which swap a symlink, are seen. A bad bundle is logged file by file
and counted; the last good snapshot keeps serving.

Reloads come from three threads (the poll, SIGHUP, Admin.ReloadPolicy) and are
serialised by one lock, and a loaded bundle is published only if it is still
what the directory holds once loading is done: a slow load of an older bundle
never publishes after a newer one, and a bundle read while the directory was
being swapped (some files old, some new) is read again rather than served.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import threading
from collections.abc import Callable

from keel_pdp.policy.loader import PolicyError, Problem, content_hash, load_bundle
from keel_pdp.policy.snapshot import PolicySnapshot

log = logging.getLogger("keel_pdp.policy")


# Loads of a directory that keeps changing under the reader, before giving up
# until the next poll (the last good bundle keeps serving meanwhile).
_ATTEMPTS = 3


def _unreadable(directory: pathlib.Path, exc: OSError) -> PolicyError:
    where = exc.filename if exc.filename else directory
    return PolicyError([Problem(str(where), "", f"cannot read: {exc.strerror or exc}")])


class PolicyHolder:
    def __init__(self, directory: pathlib.Path | str | None = None) -> None:
        self.directory = pathlib.Path(directory) if directory is not None else None
        self.current: PolicySnapshot | None = None
        self.last_error: PolicyError | None = None
        self._seen_hash = ""
        self._lock = threading.Lock()
        self.listeners: list[Callable[[PolicySnapshot | None, PolicyError | None], None]] = []

    def set(self, snapshot: PolicySnapshot) -> None:
        with self._lock:
            self.current = snapshot
            self._seen_hash = snapshot.content_hash
            for cb in self.listeners:
                cb(snapshot, None)

    def reload(self, force: bool = False) -> bool:
        """Load the directory if its content changed; True if a new snapshot is serving."""
        if self.directory is None:
            return False
        with self._lock:
            return self._reload(self.directory, force)

    def _hash(self, directory: pathlib.Path) -> str | None:
        try:
            return content_hash(directory)
        except PolicyError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(_unreadable(directory, exc))
        return None

    def _reload(self, directory: pathlib.Path, force: bool) -> bool:
        digest = self._hash(directory)
        if digest is None:
            return False
        if not force and digest == self._seen_hash:
            return False
        for _ in range(_ATTEMPTS):
            try:
                snapshot = load_bundle(directory)
            except PolicyError as exc:
                error: PolicyError = exc
            except OSError as exc:
                error = _unreadable(directory, exc)
            else:
                now = self._hash(directory)
                if now is None:
                    return False
                if now != snapshot.content_hash:
                    digest = now  # changed while loading: load what is there now
                    continue
                self._seen_hash = digest
                self._publish(snapshot)
                return True
            now = self._hash(directory)
            if now is None:
                return False
            if now != digest:
                digest = now  # perhaps read half-swapped: read it again
                continue
            # A bad bundle: not retried by the poll until its content changes.
            self._seen_hash = digest
            self._fail(error)
            return False
        self._fail(PolicyError([Problem(
            str(directory), "", f"the directory changed during each of {_ATTEMPTS} loads; "
            "it is read again at the next poll")]))
        return False

    def _publish(self, snapshot: PolicySnapshot) -> None:
        self.current = snapshot
        self.last_error = None
        log.info("policy bundle %s loaded from %s (%d budgets, %d prices)",
                 snapshot.policy_revision, self.directory, len(snapshot.budgets),
                 len(snapshot.prices))
        for cb in self.listeners:
            cb(snapshot, None)

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
