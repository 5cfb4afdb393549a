"""``keel-pdp reconcile`` and ``keel-pdp signoff``.

Exit codes: 0 done; 1 reconciled but posting is blocked (an unexplained
variance outside tolerance); 2 bad input, nothing written or posted.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from keel_pdp.reconcile.errors import ReconcileError

EXIT_OK = 0
EXIT_BLOCKED = 1
EXIT_INPUT = 2


def _pct(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not value.is_finite() or value < 0 or value > 100:
        raise argparse.ArgumentTypeError("tolerance must be between 0 and 100 (percent)")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reconcile", help="reconcile a provider invoice export against internal usage",
        description="Join a provider export and the internal usage of one UTC month, "
                    "categorise every variance, and write the four-document set "
                    "(provider export, internal export, chargeback, variance memo) to "
                    "OUT/YYYY-MM.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", metavar="URL", help="ledger store URL (internal side)")
    source.add_argument("--internal", metavar="FILE", type=pathlib.Path,
                        help="internal usage export (CSV or JSON lines)")
    p.add_argument("--period", required=True, help="billing month, YYYY-MM (UTC)")
    p.add_argument("--provider", required=True, choices=("openai", "anthropic", "csv"))
    p.add_argument("--export", required=True, action="append", type=pathlib.Path,
                   metavar="FILE", help="provider export file (repeat for usage + costs)")
    p.add_argument("--mapping", required=True, type=pathlib.Path, metavar="FILE",
                   help="translation file: provider accounts to tenants/workloads and owners")
    p.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR")
    p.add_argument("--tolerance-pct", type=_pct, default=Decimal("1.0"), metavar="PCT",
                   help="accepted variance as a percent of the invoice total (default 1.0)")
    p.add_argument("--column-map", type=pathlib.Path, metavar="FILE",
                   help="column-mapping YAML for generic CSV exports")
    p.add_argument("--prices", action="append", default=[], metavar="[ACCOUNT=]FILE|DIR",
                   help="the gateway's price table (PriceTable file or bundle directory), used to "
                        "split internal totals by token type; ACCOUNT=FILE gives one "
                        "project / workspace its own card (repeatable)")
    p.add_argument("--skew-hours", type=int, default=14, metavar="H",
                   help="how far from a UTC midnight a mis-stamped call can be (default 14)")
    p.add_argument("--internal-tz", default="UTC", metavar="ZONE",
                   help="time zone of internal timestamps written without an offset")
    p.add_argument("--replace", action="store_true",
                   help="replace an existing draft whose memo differs (its signatures "
                        "become void)")
    p.add_argument("--ledger-clock", choices=("tenant", "utc"), default="tenant",
                   help="ledger month of a request: its tenant's local calendar month when "
                        "the mapping gives the tenant a time zone (default), or UTC")
    p.set_defaults(func=run_reconcile)

    s = subparsers.add_parser(
        "signoff", help="sign a period's variance memo (three roles post the chargeback)",
        description="Record a sign-off (name, time, SHA-256 of the memo) for a reconciled "
                    "period folder; the chargeback posts when all three roles have signed.")
    s.add_argument("--dir", required=True, type=pathlib.Path, metavar="DIR",
                   help="the folder written by reconcile (OUT/YYYY-MM/PROVIDER)")
    s.add_argument("--role", choices=("engineering-owner", "finance-owner", "ai-program-lead"))
    s.add_argument("--name")
    s.add_argument("--status", action="store_true", help="show the sign-off state only")
    s.set_defaults(func=run_signoff)


def run_reconcile(ns: argparse.Namespace) -> int:
    # A month is up to millions of small objects without reference cycles; the
    # cyclic collector would rescan them again and again as they are created.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run_reconcile(ns)
    finally:
        if collecting:
            gc.enable()


def _run_reconcile(ns: argparse.Namespace) -> int:
    from keel_pdp.reconcile.adapters.generic import load_column_map
    from keel_pdp.reconcile.adapters.imports import import_exports
    from keel_pdp.reconcile.internal import (
        FileInternalSource,
        InternalSource,
        LedgerInternalSource,
    )
    from keel_pdp.reconcile.mapping import load_mapping
    from keel_pdp.reconcile.money import usd
    from keel_pdp.reconcile.output import check_not_posted, period_dir, write_period
    from keel_pdp.reconcile.period import Period
    from keel_pdp.reconcile.prices import load_cards
    from keel_pdp.reconcile.report import BLOCKED, build_report
    from keel_pdp.reconcile.units import check_units
    from keel_pdp.reconcile.variance import ledger_window_ms, reconcile

    try:
        try:
            period = Period.parse(ns.period)
        except ValueError as exc:
            raise ReconcileError(f"--period: {exc}") from None
        if ns.skew_hours < 0 or ns.skew_hours > 48:
            raise ReconcileError("--skew-hours must be between 0 and 48")
        if ns.provider != "csv":
            check_not_posted(period_dir(ns.out, str(period), ns.provider))
        mapping = load_mapping(ns.mapping)
        column_map = load_column_map(ns.column_map) if ns.column_map else None
        prices = load_cards(list(ns.prices))
        imported = import_exports(ns.provider, list(ns.export), period,
                                  mapping.aliases(ns.provider if ns.provider != "csv" else
                                                  (column_map.provider if column_map else "")),
                                  column_map)
        source: InternalSource = (LedgerInternalSource(ns.store) if ns.store
                                  else FileInternalSource(ns.internal, ns.internal_tz))
        low, high = ledger_window_ms(period, mapping, ns.ledger_clock)
        pad_ms = max(ns.skew_hours * 3_600_000, period.start_ms - low, high - period.end_ms)
        internal = source.lines_for_month(period, pad_ms)
        check_units(imported.provider, imported.lines, internal, period, mapping)
        rec = reconcile(period, imported.provider, imported.lines, internal, mapping, prices,
                        ns.skew_hours, ns.ledger_clock)
        report = build_report(rec, mapping, ns.tolerance_pct)
        target = write_period(ns.out, report, list(ns.export), imported.lines,
                              replace=ns.replace)
    except (ReconcileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was written or posted", file=sys.stderr)
        return EXIT_INPUT
    print(f"{period} {imported.provider}: invoice {usd(rec.invoice_micros)}, internal "
          f"{usd(rec.internal_micros)}, gap {usd(rec.invoice_micros - rec.internal_micros)}, "
          f"tolerance {usd(report.tolerance_micros)}")
    for c in report.categories:
        if c.decision != "none":
            print(f"  {c.title}: {usd(c.net_micros, signed=True)} ({c.decision})")
    for line in report.escalations:
        print(f"  escalated: {line}")
    print(f"wrote {target}")
    if report.status == BLOCKED:
        print("posting is blocked: an unexplained variance is outside tolerance",
              file=sys.stderr)
        return EXIT_BLOCKED
    return EXIT_OK


def run_signoff(ns: argparse.Namespace) -> int:
    from keel_pdp.reconcile.signoff import sign, status

    try:
        if ns.status:
            st = status(ns.dir)
        else:
            if not ns.role or not ns.name:
                raise ReconcileError("--role and --name are required to sign (or use --status)")
            st = sign(ns.dir, ns.role, ns.name)
    except ReconcileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for line in st.lines():
        print(line)
    return EXIT_OK
