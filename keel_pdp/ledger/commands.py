"""CLI: ``keel-pdp ledger [import | period | report | export | replay]``.

The one place the ledger's objects are wired together (the sidecar's own
commands live in ``keel_pdp/cli.py``, which registers these). ``keel-pdp
ledger`` alone runs the writer; the top-level ``period``, ``report``, ``export``,
``replay`` and ``policy replay`` of earlier releases are hidden aliases.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from keel_pdp.errors import SettingsError
from keel_pdp.flags import (
    LOG_LEVELS,
    Alias,
    Choice,
    Integer,
    Loop,
    Port,
    RedisUrl,
    Seconds,
    Setting,
    Switch,
    add_settings,
    ms_to_seconds,
    resolve,
)
from keel_pdp.ledger import export, replay, report
from keel_pdp.ledger.cli_support import (
    actor,
    add_alias,
    add_store,
    open_for_cli,
    period_arg,
    run_cli,
    store_url,
)
from keel_pdp.ledger.money import parse_usd, usd
from keel_pdp.ledger.periods import iso_utc
from keel_pdp.ledger.store import LedgerStore, StoreError, StoreRejected, StoreUnavailable

if TYPE_CHECKING:
    import redis

    from keel_pdp.ledger.writer import WriterConfig

log = logging.getLogger("keel_pdp.ledger")


# The ledger writer's settings (keel_pdp.settings explains the table and the
# units: durations are seconds; the old millisecond flags still work).
WRITER: tuple[Setting, ...] = (
    Setting("redis_url", "--redis-url", "KEEL_REDIS_URL", "redis://127.0.0.1:6379/0",
            RedisUrl(), "Redis URL: redis://, rediss:// (TLS), unix://, or "
            "redis+cluster://h1:p1,h2:p2/ for Redis Cluster seed nodes", "URL"),
    Setting("store", "--store", "KEEL_LEDGER_STORE", "", metavar="URL",
            help="ledger store: sqlite:///path or postgresql://... (required)"),
    Setting("key_shards", "--key-shards", "KEEL_KEY_SHARDS", "0", Integer(0, 1024),
            "key shards of the deployment (as given to serve): one stream each; 0 = 1 "
            "on a standalone Redis, 64 on Redis Cluster", "N"),
    Setting("key_prefix", "--key-prefix", "KEEL_KEY_PREFIX", "keel", help="Redis key prefix",
            metavar="P"),
    Setting("metrics_port", "--metrics-port", "KEEL_LEDGER_METRICS_PORT", "0", Port(),
            "Prometheus port, 0 disables", "PORT"),
    Setting("metrics_host", "--metrics-host", "KEEL_LEDGER_METRICS_HOST", "0.0.0.0",
            help="address the metrics endpoint binds", metavar="HOST"),
    Setting("group", "--group", "KEEL_LEDGER_GROUP", "keel-ledger",
            help="consumer group name", metavar="NAME"),
    Setting("consumer", "--consumer", "KEEL_LEDGER_CONSUMER", "", metavar="NAME",
            help="consumer name (default: host name; keep it stable across restarts)"),
    Setting("batch_size", "--batch-size", "KEEL_LEDGER_BATCH_SIZE", "500",
            Integer(1, 100_000), "stream entries read and stored per batch", "N"),
    Setting("block_s", "--block", "KEEL_LEDGER_BLOCK", "1", Seconds(0.001, 60),
            "seconds one stream read waits for new entries", "S",
            Alias("--block-ms", "KEEL_LEDGER_BLOCK_MS", Integer(1, 60_000, " ms"),
                  ms_to_seconds)),
    Setting("claim_idle_s", "--claim-idle", "KEEL_LEDGER_CLAIM_IDLE", "60",
            Seconds(0.001, 86_400), "claim entries another consumer has held this many "
            "seconds without acking", "S",
            Alias("--claim-idle-ms", "KEEL_LEDGER_CLAIM_IDLE_MS", Integer(1, 86_400_000, " ms"),
                  ms_to_seconds)),
    Setting("claim_interval_s", "--claim-interval", "KEEL_LEDGER_CLAIM_INTERVAL", "10",
            Loop(0.01, 3600), "seconds between claims of stale entries", "S",
            Alias("--claim-interval-s", "", Seconds(-1e9, 1e9), float)),
    Setting("trim_interval_s", "--trim-interval", "KEEL_LEDGER_TRIM_INTERVAL", "30",
            Loop(0.01, 86_400), "seconds between stream trims", "S",
            Alias("--trim-interval-s", "", Seconds(-1e9, 1e9), float)),
    Setting("no_trim", "--no-trim", "KEEL_LEDGER_NO_TRIM", "false", Switch(),
            "never trim the stream", show_default=False),
    Setting("log_level", "--log-level", "KEEL_LOG_LEVEL", "INFO", Choice(LOG_LEVELS, True),
            "DEBUG, INFO, WARNING, ERROR or CRITICAL", "LEVEL"),
)


@dataclass(frozen=True)
class WriterSettings:
    """What ``keel-pdp ledger`` (the writer) runs with."""

    redis_url: str
    store: str
    key_prefix: str
    metrics_port: int
    metrics_host: str
    group: str
    consumer: str
    batch_size: int
    block_s: float
    claim_idle_s: float
    claim_interval_s: float
    trim_interval_s: float
    no_trim: bool
    log_level: str
    notes: tuple[str, ...] = ()
    key_shards: int = 0

    def config(self) -> WriterConfig:
        from keel_pdp.budget.store import default_shards
        from keel_pdp.ledger.writer import WriterConfig

        return WriterConfig(
            key_prefix=self.key_prefix, group=self.group, consumer=self.consumer,
            batch_size=self.batch_size, block_ms=max(1, round(self.block_s * 1000)),
            claim_idle_ms=max(1, round(self.claim_idle_s * 1000)),
            claim_interval_s=self.claim_interval_s, trim=not self.no_trim,
            trim_interval_s=self.trim_interval_s,
            shards=self.key_shards or default_shards(self.redis_url))


def writer_settings(ns: argparse.Namespace, env: Mapping[str, str] | None = None
                    ) -> WriterSettings:
    r = resolve(ns, WRITER, env)
    if not r.values["store"]:
        raise SettingsError("--store is required (or set KEEL_LEDGER_STORE)")
    return WriterSettings(**r.values, notes=r.notes)


LEDGER_HELP = "the ledger: its writer (decision stream -> ledger store), periods, reports"
LEDGER_DESCRIPTION = (
    "Without a sub-command: run the ledger writer, which consumes the decision stream into "
    "the ledger store. The sub-commands read and book the ledger store: import, period, "
    "report, export, replay.")


def register(sub: Any) -> None:
    p = sub.add_parser("ledger", help=LEDGER_HELP, description=LEDGER_DESCRIPTION,
                       allow_abbrev=False)
    add_settings(p, WRITER)
    p.set_defaults(func=cmd_ledger)
    lsub = p.add_subparsers(dest="ledger_command", required=False, metavar="COMMAND")
    _register_import(lsub)
    # The ledger's tools live under `keel-pdp ledger`; their old top-level
    # spellings (and `policy replay`) keep working, hidden, with a note.
    for name, reg in (("period", _register_period), ("report", report.register),
                      ("export", export.register), ("replay", replay.register)):
        reg(lsub)
        add_alias(sub, name, reg, f"keel-pdp ledger {name}")
    from keel_pdp.policy.commands import POLICY_SUBPARSERS

    for psub in POLICY_SUBPARSERS:  # one per parser built in this process
        if "replay" not in psub.choices:
            add_alias(psub, "replay", replay.register, "keel-pdp ledger replay")


def _register_import(lsub: Any) -> None:
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


def _register_period(sub: Any) -> None:
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


# --------------------------------------------------------------------- writer
def stream_client(url: str, *, socket_timeout: float) -> redis.Redis:
    """The writer's redis-py client: ``redis.Redis`` for one node, ``RedisCluster``
    for a ``redis+cluster://`` URL (the stream, its dead-letter stream and the
    consumer group share one slot, so each command and the ack transaction go
    to the one master that owns it)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from keel_pdp.budget.cluster import is_cluster_url, redis_py_options

    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                    socket_connect_timeout=5)
    seeds, options = redis_py_options(url)
    cluster = RedisCluster(startup_nodes=[ClusterNode(h, p)  # type: ignore[no-untyped-call]
                                          for h, p in seeds],
                           socket_timeout=socket_timeout, socket_connect_timeout=5,
                           **options)
    # The writer uses single-key stream commands and a one-slot transaction, which
    # both clients serve; redis-py types them apart.
    return cast("redis.Redis", cluster)


def cmd_ledger(ns: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from keel_pdp.ledger.metrics import LedgerMetrics
    from keel_pdp.ledger.writer import Backoff, LedgerWriter

    s = writer_settings(ns)
    for note in s.notes:
        print(f"keel-pdp ledger: note: {note}", file=sys.stderr)
    logging.basicConfig(level=s.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        store = LedgerStore(s.store)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = s.config()
    client = stream_client(s.redis_url, socket_timeout=s.block_s + 5)
    metrics = LedgerMetrics()
    writer = LedgerWriter(config, store, client, metrics)
    signal.signal(signal.SIGTERM, lambda *_: writer.stop())
    signal.signal(signal.SIGINT, lambda *_: writer.stop())
    if s.metrics_port:
        start_http_server(s.metrics_port, addr=s.metrics_host, registry=metrics.registry)
    # The store may not be up yet (PostgreSQL starting next to us): wait for it.
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    while not writer.stopping.is_set():
        try:
            applied = store.migrate()
            if applied:
                log.info("ledger schema migrated to version %d", applied[-1])
            # A column changed by hand would refuse every row alike: say so now,
            # rather than take the stream's entries for bad ones.
            store.check_schema()
            break
        except StoreUnavailable as exc:
            delay = backoff.next()
            log.warning("ledger store unavailable (%s); retrying in %.2fs", exc, delay)
            writer.stopping.wait(delay)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    streams = writer.stream if len(writer.shards) == 1 else (
        f"{len(writer.shards)} shard streams ({writer.stream} ...)")
    print(f"keel-pdp ledger writer: {streams} -> {store.dialect} store, group "
          f"{config.group}, consumer {writer.consumer}", flush=True)
    try:
        code = writer.run()
    finally:
        store.close()
        client.close()
    if writer.failure is not None:
        print(f"error: {writer.failure}", file=sys.stderr)
        print("keel-pdp ledger: the writer stopped; the stream entries it had not stored stay "
              "pending and are stored once by the writer started after the repair",
              file=sys.stderr)
    return code


def cmd_ledger_import(ns: argparse.Namespace) -> int:
    from keel_pdp.reconcile.errors import ReconcileError
    from keel_pdp.reconcile.ledger_import import import_file

    url = store_url(ns.store)
    if not url:
        print("error: --store is required (or set KEEL_LEDGER_STORE)", file=sys.stderr)
        return 2
    try:
        total, new = import_file(url, ns.file, ns.internal_tz)
    except ReconcileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was imported", file=sys.stderr)
        return 2
    except (StoreError, StoreUnavailable, StoreRejected, OSError) as exc:
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
