"""Policy reload from several threads: serialised, newest content only, clear errors.

The poll, SIGHUP and Admin.ReloadPolicy each reload from their own thread. A slow
load of an older bundle must never publish after a newer one (and stay: the poll
would then believe it had already seen the newer content). An unreadable file is
reported with its path.
"""

from __future__ import annotations

import errno
import pathlib
import threading
from typing import Any

import pytest

from keel_pdp.policy import reload as reload_mod
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.policy.snapshot import PolicySnapshot
from tests.helpers import budget, write_bundle


def _write(d: pathlib.Path, revision: str) -> None:
    write_bundle(d, [budget("org", "10")], revision=revision)


def _revisions(holder: PolicyHolder) -> list[str]:
    seen: list[str] = []

    def on(snapshot: PolicySnapshot | None, _error: object) -> None:
        if snapshot is not None:
            seen.append(snapshot.revision)

    holder.listeners.append(on)
    return seen


def test_a_slow_load_of_an_older_bundle_never_publishes_after_a_newer_one(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "policies"
    _write(d, "r1")
    holder = PolicyHolder(d)
    published = _revisions(holder)
    loaded_r1 = threading.Event()
    release = threading.Event()
    calls = 0

    def slow_first_load(directory: Any) -> PolicySnapshot:
        nonlocal calls
        calls += 1
        snapshot = load_bundle(directory)
        if calls == 1:  # the poll's load of r1 is slow
            loaded_r1.set()
            release.wait(10)
        return snapshot

    monkeypatch.setattr(reload_mod, "load_bundle", slow_first_load)
    poll = threading.Thread(target=holder.reload)
    poll.start()
    assert loaded_r1.wait(10)
    _write(d, "r2")  # the operator's update lands while r1 is still being loaded
    sighup = threading.Thread(target=holder.reload, args=(True,))
    sighup.start()
    sighup.join(1.0)  # serialised: it waits for the poll's reload, if it is correct
    release.set()
    poll.join(10)
    sighup.join(10)
    assert not poll.is_alive() and not sighup.is_alive()
    assert holder.current is not None
    assert holder.current.revision == "r2"
    assert published[-1] == "r2"
    assert "r1" not in published[published.index("r2"):]
    # The next poll sees nothing new, and r2 is what keeps serving.
    assert holder.reload() is False
    assert holder.current.revision == "r2"


def test_concurrent_reloads_from_three_threads_end_on_the_newest_content(
        tmp_path: pathlib.Path) -> None:
    d = tmp_path / "policies"
    _write(d, "r0")
    holder = PolicyHolder(d)
    holder.reload(force=True)
    published = _revisions(holder)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reloader(force: bool) -> None:
        while not stop.is_set():
            try:
                holder.reload(force)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reloader, args=(f,)) for f in (False, True, True)]
    for t in threads:
        t.start()
    for i in range(1, 8):
        _write(d, f"r{i}")
    stop.set()
    for t in threads:
        t.join(20)
    assert errors == []
    holder.reload()
    assert holder.current is not None
    assert holder.current.revision == "r7"
    # Revisions only move forward in what was published.
    order = [int(r[1:]) for r in published]
    assert order == sorted(order), order


def test_an_unreadable_file_is_reported_with_its_path(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "policies"
    _write(d, "r1")
    holder = PolicyHolder(d)
    assert holder.reload() is True
    _write(d, "r2")
    target = d / "budgets.yaml"
    read_bytes = pathlib.Path.read_bytes

    def denied(self: pathlib.Path) -> bytes:
        # As a file mode 0000 behaves for a non-root reader (tests may run as root).
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    assert holder.reload() is False
    assert holder.last_error is not None
    text = str(holder.last_error)
    assert str(target) in text
    assert "Permission denied" in text
    assert holder.current is not None and holder.current.revision == "r1"  # still serving
    monkeypatch.undo()
    assert holder.reload() is True
    assert holder.current.revision == "r2"
    assert holder.last_error is None


def test_a_bundle_that_changed_while_it_was_read_is_read_again(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ConfigMap symlink swap during the read: what was read is not what is there."""
    d = tmp_path / "policies"
    _write(d, "r1")
    holder = PolicyHolder(d)
    published = _revisions(holder)
    calls = 0

    def swapped_during_read(directory: Any) -> PolicySnapshot:
        nonlocal calls
        calls += 1
        snapshot = load_bundle(directory)
        if calls == 1:
            _write(d, "r2")
        return snapshot

    monkeypatch.setattr(reload_mod, "load_bundle", swapped_during_read)
    assert holder.reload() is True
    assert holder.current is not None and holder.current.revision == "r2"
    assert published == ["r2"]
    assert calls == 2
