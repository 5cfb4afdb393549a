"""Helpers shared by the ledger's CLI commands (argument types, store opening)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from keel_pdp.ledger.periods import PeriodError, check_period
from keel_pdp.ledger.store import LedgerStore, StoreError, StoreUnavailable


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
    p.add_argument("--store", default=os.environ.get("KEEL_LEDGER_STORE", ""),
                   help="sqlite:///path or postgresql://... (env KEEL_LEDGER_STORE)")


def actor() -> str:
    try:
        return os.environ.get("KEEL_ACTOR") or getpass.getuser()
    except Exception:
        return "unknown"


def open_for_cli(url: str) -> LedgerStore:
    if not url:
        raise StoreError("--store is required (or set KEEL_LEDGER_STORE)")
    store = LedgerStore(url)
    store.migrate()
    return store


def run_cli(fn: Any, ns: argparse.Namespace) -> int:
    """Run a store command, turning expected failures into one line on stderr."""
    try:
        return int(fn(ns))
    except (StoreError, StoreUnavailable, PeriodError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
