"""``keel-pdp``: the one place objects are wired together.

``serve`` (the sidecar) is built here; the other commands (``policy``, ``ledger``,
``reconcile``, ``mesh``, ``exceptions``, ...) register from their packages
(``COMMAND_MODULES``). Building the parsers reads no environment variable: each
command resolves its own settings when it runs (keel_pdp.settings), and a bad
setting ends it with exit 2 and one line naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.util
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from keel_pdp.settings import (
    ServeSettings,
    SettingsError,
    add_serve_arguments,
    redacted_url,
    serve_settings,
)

SERVE_DESCRIPTION = (
    "Run the gRPC sidecar. Every flag can also be set by the environment variable its help "
    "names; a flag wins over its variable. Durations are seconds, decimals allowed "
    "(--store-timeout 0.025 is 25 ms).")

log = logging.getLogger("keel_pdp")

# Each module here defines ``register(subparsers)``, adding sub-commands whose
# parsers set ``func`` (called with the parsed namespace, returns an exit code).
COMMAND_MODULES = (
    "keel_pdp.policy.commands",
    "keel_pdp.ledger.commands",
    "keel_pdp.reconcile.commands",
    "keel_pdp.mesh.commands",
    "keel_pdp.overage.commands",
    "keel_pdp.budget.commands",
)


def _say(line: str) -> None:
    """One start-up line to stdout in one write: the workers of ``--workers N`` share
    the stream, and ``print`` writes the text and its newline apart when stdout is
    unbuffered (PYTHONUNBUFFERED), so two workers' lines could run into one."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


async def serve(s: ServeSettings, worker: int | None = None) -> int:
    from prometheus_client import start_http_server

    from keel_pdp.budget.store import BudgetStore, StoreUnavailable
    from keel_pdp.engine import Engine
    from keel_pdp.metrics import Metrics
    from keel_pdp.policy.reload import PolicyHolder
    from keel_pdp.server.service import build_server

    metrics = Metrics()
    holder = PolicyHolder(s.policies)
    store = BudgetStore.from_url(s.redis_url, prefix=s.key_prefix,
                                 timeout_s=s.store_timeout_s, wait_replicas=s.wait_replicas,
                                 shards=s.key_shards,
                                 stored_shapes=not s.inline_decision_events,
                                 # format 1 (every release reads it) until the store
                                 # says the deployment writes format 2
                                 records=1)
    store.on_short_wait = lambda script: metrics.store_short_waits.labels(script).inc()
    # Workers share the directory as separate sidecars do: each journals to a file of
    # its own and claims those no live process holds, so a restart with another
    # worker count (or none) replays every journal (keel_pdp.outbox).
    engine = Engine(holder, store, metrics, outbox_dir=s.outbox_dir or None)
    from keel_pdp.server.admin import add_admin
    from keel_pdp.server.identity import caller_interceptors
    from keel_pdp.server.tls import ReloadingCredentials, TlsError, TlsFiles, check_listen

    tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
    try:
        check_listen(s.listen, tls, s.allow_insecure_listen)
        credentials = ReloadingCredentials(tls).credentials() if tls else None
        interceptors = caller_interceptors(s, holder, metrics, store)
    except (TlsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    extra: list[Any] = [add_admin(engine, s.admin_token, s.admin_identities)]
    if _available("keel_pdp.mesh"):
        # Envoy ext_authz / ext_proc on the same port (see keel_pdp/mesh).
        extra += importlib.import_module("keel_pdp.mesh").services(engine, metrics, s.mesh)
    server, health, port = build_server(engine, metrics, s.listen, extra_services=extra,
                                        credentials=credentials,
                                        max_concurrent_rpcs=s.max_concurrent_rpcs,
                                        first_message_timeout_s=s.first_message_timeout_s,
                                        interceptors=interceptors,
                                        reuse_port=worker is not None)
    own_port = ""
    if s.worker_ports:
        # This worker alone, so that a proxy can spread calls over the workers: the
        # kernel spreads the shared port's connections, and a proxy keeps few of them.
        host, _, base = s.listen.rpartition(":")
        own_port = f"{host}:{int(base) + 1 + (worker or 0)}"
        try:
            bound = (server.add_secure_port(own_port, credentials) if credentials is not None
                     else server.add_insecure_port(own_port))
        except RuntimeError:
            bound = 0
        if bound == 0:
            log.error("cannot listen on %s (--worker-ports)", own_port)
            return 2
    metrics_port = s.metrics_port + (worker or 0) if s.metrics_port else 0
    loop = asyncio.get_running_loop()
    draining = False
    background: set[asyncio.Task[Any]] = set()

    def on_policy(snapshot: object, error: object) -> None:
        if snapshot is not None:
            cur = holder.current
            assert cur is not None
            metrics.policy_revision.clear()
            metrics.policy_revision.labels(cur.revision, cur.content_hash[:12],
                                           cur.price_revision).set(1)
            metrics.policy_loaded.set(1)
            metrics.policy_loads.labels("ok").inc()
            if not draining:
                # Reloads run in a worker thread: hand the health update to the loop.
                loop.call_soon_threadsafe(
                    lambda: background.add(loop.create_task(health.set(True))))
        else:
            metrics.policy_loads.labels("rejected").inc()

    holder.listeners.append(on_policy)
    await health.set(False)
    if not await store.warm():
        log.warning("budget store %s not reachable yet; decisions follow each budget's "
                    "fail mode until it is", redacted_url(s.redis_url))
    elif (problem := await store.layout_problem()) is not None:
        log.error("%s", problem)
        await store.close()
        return 2
    else:
        with contextlib.suppress(StoreUnavailable):
            if await store.adopt_records() != 1:
                await store.warm()  # this format's scripts
        if s.wait_replicas:
            fewest = await store.fewest_replicas()
            if fewest is not None and fewest < s.wait_replicas:
                log.warning("--wait-replicas %d: a master of %s has only %d replica(s), so "
                            "every WAIT there will be short and slow (docs/redis-cluster.md)",
                            s.wait_replicas, store.where, fewest)
    with contextlib.suppress(StoreUnavailable):
        await engine.sync_clock()  # the first decisions already on the store's time
    holder.reload(force=True)
    if holder.current is None:
        log.error("no valid policy bundle in %s yet: health is NOT_SERVING, every Authorize "
                  "answers POLICY_NOT_LOADED until one loads", s.policies)
    if metrics_port:
        start_http_server(metrics_port, addr=s.metrics_host, registry=metrics.registry)
    # Everything built so far (modules, protobuf descriptors, the policy snapshot)
    # lives as long as the process: keep it out of the collector's full passes,
    # which otherwise walk it all and paused a worker for 75 ms in the middle of a
    # burst of Checks (bench/bench_envoy_burst.py).
    gc.collect()
    gc.freeze()
    await server.start()
    host = s.listen.rpartition(":")[0]
    who = f"worker {worker} " if worker is not None else ""
    _say(f"keel-pdp {who}gRPC listening on {host}:{port}"
         f"{' (mutual TLS)' if s.tls_client_ca else ' (TLS)' if tls else ''}")
    if own_port:
        _say(f"keel-pdp {who}also alone on {own_port}")
    if metrics_port:
        _say(f"keel-pdp {who}metrics on http://{s.metrics_host}:{metrics_port}/metrics")
    shards = store.keys.shards
    _say(f"keel-pdp budget store {store.where}"
         + (f" ({shards} key shards)" if shards > 1 else "")
         + f", idempotency records format {store.records}")

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Validating a large bundle takes a while: never on the event loop.
    loop.add_signal_handler(signal.SIGHUP, lambda: background.add(
        loop.create_task(asyncio.to_thread(holder.reload, True))))
    tasks = [loop.create_task(holder.watch(s.reload_interval_s)),
             loop.create_task(engine.run_background(s.sweep_interval_s))]
    if metrics_port and s.budget_metrics_interval_s > 0 and not worker:
        from keel_pdp.budget.gauges import BudgetGauges
        from keel_pdp.budget.status import StatusReader

        gauges = BudgetGauges(metrics, holder, StatusReader(store))
        tasks.append(loop.create_task(gauges.run(s.budget_metrics_interval_s)))
    await stop.wait()
    draining = True
    # Report NOT_SERVING first and keep serving for the drain delay, so callers
    # and load balancers move away before new calls are refused; then give
    # in-flight calls the grace period.
    log.info("draining: health NOT_SERVING, serving %.1fs more, then %.1fs for in-flight "
             "calls", s.drain_delay_s, s.grace_s)
    await health.set(False)
    await asyncio.sleep(s.drain_delay_s)
    await server.stop(s.grace_s)
    for t in tasks:
        t.cancel()
    with contextlib.suppress(Exception):
        await engine.flush_outbox()
    if engine.outbox_len:
        log.error("%d decision events could not be recorded before exit", engine.outbox_len)
    await store.close()
    return 0


def _run(s: ServeSettings, worker: int | None) -> int:
    try:
        import uvloop

        return uvloop.run(serve(s, worker))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(s, worker))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel-pdp", description="Keel PDP: the LLM spend sidecar (serve) and its policy, "
        "ledger, reconciliation and exception tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_serve = sub.add_parser("serve", help="run the gRPC sidecar", description=SERVE_DESCRIPTION)
    add_serve_arguments(p_serve)
    for name in COMMAND_MODULES:
        if _available(name):
            importlib.import_module(name).register(sub)
    return parser


def _fail(command: str, exc: Exception) -> int:
    print(f"keel-pdp {command}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    note = getattr(ns, "deprecated_spelling", None)
    if note:
        print(f"keel-pdp: note: {note}", file=sys.stderr)
    if getattr(ns, "func", None) is not None:
        try:
            return int(ns.func(ns))
        except SettingsError as exc:
            return _fail(ns.command, exc)
    if ns.command != "serve":
        return _fail(ns.command, ValueError("nothing to run (see --help)"))

    try:
        s = serve_settings(ns)
    except SettingsError as exc:
        return _fail("serve", exc)
    for line in s.notes:
        print(f"keel-pdp serve: note: {line}", file=sys.stderr)
    logging.basicConfig(level=s.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if s.workers > 1:
        from keel_pdp.workers import run_workers

        # A worker stops in drain delay + grace after SIGTERM; only then may it be killed.
        return run_workers(s.workers, lambda i: _run(s, i),
                           grace_s=s.drain_delay_s + s.grace_s)
    return _run(s, None)


if __name__ == "__main__":
    sys.exit(main())
