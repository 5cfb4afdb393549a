"""Helpers shared by the ledger's CLI commands (argument types, store opening, aliases)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from keel_pdp.errors import MappingError
from keel_pdp.ledger.migrations import LATEST
from keel_pdp.ledger.periods import PeriodError, check_period
from keel_pdp.ledger.store import LedgerStore, StoreError, StoreRejected, StoreUnavailable


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def period_arg(text: str) -> str:
    try:
        return check_period(text)
    except PeriodError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_store(p: argparse.ArgumentParser) -> None:
    # Read from the environment when the command runs (open_for_cli), not here.
    p.add_argument("--store", default=None, metavar="URL",
                   help="sqlite:///path or postgresql://... (env KEEL_LEDGER_STORE)")


def store_url(given: str | None) -> str:
    """``--store`` if given, else ``KEEL_LEDGER_STORE`` ('' when neither)."""
    return given if given is not None else os.environ.get("KEEL_LEDGER_STORE", "")


def hide(sub: Any, name: str) -> None:
    """Keep sub-command ``name`` working but out of the help listing."""
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != name]


def add_alias(sub: Any, name: str, register: Any, new: str) -> None:
    """An old spelling of a command: ``register(sub)`` adds it under ``sub`` as ``name``,
    hidden from help; running it prints a note naming ``new``."""
    register(sub)
    hide(sub, name)
    sub.choices[name].set_defaults(
        deprecated_spelling=f"this spelling is deprecated: use `{new}` (same arguments)")


def actor() -> str:
    try:
        return os.environ.get("KEEL_ACTOR") or getpass.getuser()
    except Exception:
        return "unknown"


def open_for_cli(given: str | None) -> LedgerStore:
    url = store_url(given)
    if not url:
        raise StoreError("--store is required (or set KEEL_LEDGER_STORE)")
    store = LedgerStore(url)
    try:
        version = store.schema_version()
        if 0 < version < LATEST:
            # The ledger writer owns the schema: a newer command-line tool that upgraded
            # it would stop the writers still running the previous version (they refuse
            # a schema newer than theirs) in the middle of a rolling upgrade.
            raise StoreError(
                f"the ledger's schema is version {version} and this keel-pdp reads version "
                f"{LATEST}: upgrade the ledger writer first (it migrates when it starts); "
                "a command-line tool does not upgrade a ledger in use")
        store.migrate()  # a new ledger gets its schema; a current one is left as it is
    except BaseException:
        store.close()
        raise
    return store


def run_cli(fn: Any, ns: argparse.Namespace) -> int:
    """Run a store command, turning expected failures into one line on stderr."""
    try:
        return int(fn(ns))
    except MappingError as exc:
        # A mapping file finance must correct (it names the file and key): bad input.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, StoreUnavailable, StoreRejected, PeriodError, ValueError,
            OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
