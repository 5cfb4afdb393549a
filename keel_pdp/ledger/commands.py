"""CLI: ``keel-pdp ledger | period | report | export | replay``.

The one place the ledger's objects are wired together (the sidecar's own
commands live in ``keel_pdp/cli.py``, which registers these).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
import uuid
from typing import Any

from keel_pdp.ledger import export, replay, report
from keel_pdp.ledger.cli_support import (
    actor,
    add_store,
    open_for_cli,
    period_arg,
    positive_int,
    run_cli,
)
from keel_pdp.ledger.money import parse_usd, usd
from keel_pdp.ledger.periods import iso_utc
from keel_pdp.ledger.store import LedgerStore, StoreError, StoreUnavailable

log = logging.getLogger("keel_pdp.ledger")


def register(sub: Any) -> None:
    p = sub.add_parser("ledger", help="run the ledger writer (decision stream -> ledger store)")
    p.add_argument("--redis-url", default=os.environ.get("KEEL_REDIS_URL",
                                                         "redis://127.0.0.1:6379/0"))
    add_store(p)
    p.add_argument("--key-prefix", default=os.environ.get("KEEL_KEY_PREFIX", "keel"))
    p.add_argument("--metrics-port", type=int,
                   default=int(os.environ.get("KEEL_LEDGER_METRICS_PORT", "0")),
                   help="Prometheus port (0 disables)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--group", default="keel-ledger", help="consumer group name")
    p.add_argument("--consumer", default=os.environ.get("KEEL_LEDGER_CONSUMER", ""),
                   help="consumer name (default: host name; keep it stable across restarts)")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--block-ms", type=positive_int, default=1000)
    p.add_argument("--claim-idle-ms", type=positive_int, default=60_000,
                   help="claim entries another consumer has held this long without acking")
    p.add_argument("--claim-interval-s", type=float, default=10.0)
    p.add_argument("--trim-interval-s", type=float, default=30.0)
    p.add_argument("--no-trim", action="store_true", help="never trim the stream")
    p.add_argument("--log-level", default=os.environ.get("KEEL_LOG_LEVEL", "INFO"))
    p.set_defaults(func=cmd_ledger)
    lsub = p.add_subparsers(dest="ledger_command", required=False)
    li = lsub.add_parser(
        "import", help="load an internal usage export into the ledger store (append-only "
                       "entries marked imported)",
        description="Load an internal usage export (CSV or JSON lines, the columns "
                    "`keel-pdp reconcile --internal` reads) into the ledger store, so months "
                    "that predate the sidecar reconcile through --store. Idempotent by "
                    "permit id; a bad row stops the import with nothing booked (exit 2).")
    add_store(li)
    li.add_argument("file", type=pathlib.Path, help="internal usage export")
    li.add_argument("--internal-tz", default="UTC", metavar="ZONE",
                    help="time zone of timestamps written without an offset")
    li.set_defaults(func=cmd_ledger_import)

    pp = sub.add_parser("period", help="accounting periods: status, close, adjust")
    psub = pp.add_subparsers(dest="period_command", required=True)
    ps = psub.add_parser("status", help="state and totals of a period (or of all periods)")
    add_store(ps)
    ps.add_argument("--period", type=period_arg)
    ps.set_defaults(func=cmd_period_status)
    pc = psub.add_parser("close", help="move a period to closing or closed")
    add_store(pc)
    pc.add_argument("--period", type=period_arg, required=True)
    pc.add_argument("--to", choices=("closing", "closed"), default="closed",
                    help="closing: still books late actuals into the period; closed: final")
    pc.add_argument("--force", action="store_true", help="close a period that has not ended")
    pc.set_defaults(func=cmd_period_close)
    pa = psub.add_parser("adjust", help="book a manual adjustment (signed USD amount)")
    add_store(pa)
    pa.add_argument("--period", type=period_arg, required=True,
                    help="the period the amount belongs to (booked in the next open one if "
                         "closed)")
    pa.add_argument("--amount-usd", required=True, help="signed decimal, e.g. -12.50")
    pa.add_argument("--tenant", required=True)
    pa.add_argument("--workload", default="")
    pa.add_argument("--model", default="")
    pa.add_argument("--provider", default="")
    pa.add_argument("--reason", required=True)
    pa.add_argument("--key", default="", help="idempotency key (default: random)")
    pa.set_defaults(func=cmd_period_adjust)

    report.register(sub)
    export.register(sub)
    replay.register(sub)


# --------------------------------------------------------------------- writer
def cmd_ledger(ns: argparse.Namespace) -> int:
    import redis
    from prometheus_client import start_http_server

    from keel_pdp.ledger.metrics import LedgerMetrics
    from keel_pdp.ledger.writer import Backoff, LedgerWriter, WriterConfig

    logging.basicConfig(level=ns.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not ns.store:
        print("error: --store is required (or set KEEL_LEDGER_STORE)", file=sys.stderr)
        return 2
    try:
        store = LedgerStore(ns.store)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = WriterConfig(
        key_prefix=ns.key_prefix, group=ns.group, consumer=ns.consumer,
        batch_size=ns.batch_size, block_ms=ns.block_ms, claim_idle_ms=ns.claim_idle_ms,
        claim_interval_s=ns.claim_interval_s, trim=not ns.no_trim,
        trim_interval_s=ns.trim_interval_s)
    client = redis.Redis.from_url(ns.redis_url, socket_timeout=ns.block_ms / 1000 + 5,
                                  socket_connect_timeout=5)
    metrics = LedgerMetrics()
    writer = LedgerWriter(config, store, client, metrics)
    signal.signal(signal.SIGTERM, lambda *_: writer.stop())
    signal.signal(signal.SIGINT, lambda *_: writer.stop())
    if ns.metrics_port:
        start_http_server(ns.metrics_port, addr=ns.metrics_host, registry=metrics.registry)
    # The store may not be up yet (PostgreSQL starting next to us): wait for it.
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    while not writer.stopping.is_set():
        try:
            applied = store.migrate()
            if applied:
                log.info("ledger schema migrated to version %d", applied[-1])
            break
        except StoreUnavailable as exc:
            delay = backoff.next()
            log.warning("ledger store unavailable (%s); retrying in %.2fs", exc, delay)
            writer.stopping.wait(delay)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"keel-pdp ledger writer: {writer.stream} -> {store.dialect} store, group "
          f"{config.group}, consumer {writer.consumer}", flush=True)
    try:
        return writer.run()
    finally:
        store.close()
        client.close()


def cmd_ledger_import(ns: argparse.Namespace) -> int:
    from keel_pdp.reconcile.errors import ReconcileError
    from keel_pdp.reconcile.ledger_import import import_file

    if not ns.store:
        print("error: --store is required (or set KEEL_LEDGER_STORE)", file=sys.stderr)
        return 2
    try:
        total, new = import_file(ns.store, ns.file, ns.internal_tz)
    except ReconcileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was imported", file=sys.stderr)
        return 2
    except (StoreError, StoreUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {new} of {total} request(s) from {ns.file.name} "
          f"({total - new} already in the ledger)")
    return 0


# --------------------------------------------------------------------- periods
def cmd_period_status(ns: argparse.Namespace) -> int:
    return run_cli(_period_status, ns)


def _period_status(ns: argparse.Namespace) -> int:
    store = open_for_cli(ns.store)
    try:
        periods = [ns.period] if ns.period else list(store.periods())
        if not periods:
            print("no periods yet")
            return 0
        known = store.periods()
        for period in periods:
            state = known.get(period, "open")
            totals = store.period_totals(period)
            print(f"{period}  {state:<8} entries {totals['entries']:>8}  "
                  f"booked {usd(totals['booked_micros'])} USD  "
                  f"open permits {totals['open_permits']} "
                  f"(accrued {usd(totals['open_accrual_micros'])} USD)  "
                  f"adjustments in {usd(totals['adjustments_in_micros'])} USD  "
                  f"late out {usd(totals['late_out_micros'])} USD")
            for frm, to, at, who, summary in store.transitions(period):
                print(f"    {iso_utc(at)} {frm} -> {to} by {who or '?'}: "
                      f"{summary.get('entries', 0)} entries, booked "
                      f"{usd(int(summary.get('booked_micros', 0)))} USD")
    finally:
        store.close()
    return 0


def cmd_period_close(ns: argparse.Namespace) -> int:
    return run_cli(_period_close, ns)


def _period_close(ns: argparse.Namespace) -> int:
    store = open_for_cli(ns.store)
    try:
        t = store.transition(ns.period, ns.to, actor=actor(), force=ns.force)
    finally:
        store.close()
    s = t.summary
    print(f"{t.period}: {t.from_state} -> {t.to_state}; {s['entries']} entries, booked "
          f"{usd(s['booked_micros'])} USD, {s['open_permits']} open permits accrued at "
          f"{usd(s['open_accrual_micros'])} USD")
    return 0


def cmd_period_adjust(ns: argparse.Namespace) -> int:
    return run_cli(_period_adjust, ns)


def _period_adjust(ns: argparse.Namespace) -> int:
    amount = parse_usd(ns.amount_usd)
    store = open_for_cli(ns.store)
    try:
        entry_id, booked = store.manual_adjustment(
            key=ns.key or uuid.uuid4().hex, belongs_to=ns.period, amount_micros=amount,
            tenant=ns.tenant, workload=ns.workload, model=ns.model, provider=ns.provider,
            reason=ns.reason, actor=actor())
    finally:
        store.close()
    note = "" if booked == ns.period else f" (period {ns.period} is closed)"
    print(f"entry {entry_id}: {usd(amount)} USD for {ns.period} booked in {booked}{note}")
    return 0
