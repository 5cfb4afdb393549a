"""Load a policy bundle directory, validate all of it, compile a snapshot.

Every problem is reported with the file, the field path and the reason; one
bad file rejects the whole bundle (the caller keeps serving the last good one).

This module reads the directory and fingerprints it (``content_hash``: reload
is decided on content, never on mtime, because Kubernetes ConfigMaps update by
swapping a symlink). Parsing is ``keel_pdp.policy.documents``, compilation
``keel_pdp.policy.compile``; the names the rest of the code imports from here
(``load_bundle``, ``compile_bundle``, ``PolicyError``, ``Problem``,
``price_history``) are re-exported.
"""

from __future__ import annotations

import hashlib
import pathlib

from keel_pdp.policy.compile import compile_bundle
from keel_pdp.policy.compile_prices import price_history
from keel_pdp.policy.documents import MAX_FILE_BYTES, parse_documents
from keel_pdp.policy.problems import PolicyError, Problem
from keel_pdp.policy.snapshot import PolicySnapshot

__all__ = ["MAX_FILE_BYTES", "PolicyError", "Problem", "bundle_files", "compile_bundle",
           "content_hash", "load_bundle", "parse_documents", "price_history"]


def bundle_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The bundle's YAML files in name order (hidden files skipped)."""
    if not directory.is_dir():
        raise PolicyError([Problem(str(directory), "", "policy directory does not exist")])
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def content_hash(directory: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in bundle_files(directory):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def load_bundle(directory: pathlib.Path | str) -> PolicySnapshot:
    """Read, validate and compile the bundle in ``directory`` (raises PolicyError)."""
    path = pathlib.Path(directory)
    files: list[tuple[str, bytes]] = []
    for p in bundle_files(path):
        try:
            files.append((p.name, p.read_bytes()))
        except OSError as exc:
            raise PolicyError([Problem(p.name, "", f"cannot read: {exc}")]) from exc
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return compile_bundle(files, digest.hexdigest())
