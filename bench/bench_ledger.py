"""Ledger writer throughput: decision-stream events per second into SQLite and
into PostgreSQL, measured in one run.

The events are genuine: the engine authorizes and closes out requests against a
benchmark Redis (about two events per permit, plus voids). Each store then gets
its own consumer group over the same stream and an in-process writer drains it
(batches of --batch-size, one transaction per batch, then XACK). The baseline is
the same writer with a store that keeps nothing (read, parse, acknowledge), so
the ratios show what durable storage costs. Both stores run with their durable
settings: SQLite WAL with synchronous=FULL, PostgreSQL with fsync and
synchronous_commit on.

    python -m bench.bench_ledger [--permits 20000] [--batch-size 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.harness import Context, RedisServer, Row
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput
from keel_pdp.engine import Engine
from keel_pdp.ledger.events import StreamEvent
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage

POLICIES = pathlib.Path(__file__).resolve().parent.parent / "policies"
PREFIX = "bench"
TENANTS = ("acme", "globex", "initech")
MODELS = (("openai", "gpt-4o-mini"), ("openai", "gpt-4.1"), ("anthropic", "claude-haiku-4-5"))


class NullStore(LedgerStore):
    """Keeps nothing: the writer's cost without a database."""

    def __init__(self) -> None:
        super().__init__("sqlite:///:memory:")

    def write_batch(self, events: Sequence[StreamEvent], at_ms: int | None = None) -> int:
        return len(events)


async def produce(redis_url: str, permits: int, concurrency: int = 64) -> int:
    client = aioredis.Redis.from_url(redis_url, max_connections=concurrency + 8)
    holder = PolicyHolder(POLICIES)
    holder.set(load_bundle(POLICIES))
    engine = Engine(holder, BudgetStore(client, KeySpace(PREFIX), timeout_s=5.0), Metrics())

    async def one(i: int) -> None:
        provider, model = MODELS[i % len(MODELS)]
        out = await engine.authorize(AuthorizeInput(
            f"bench-{i}", TENANTS[i % len(TENANTS)], ("chat", "search")[i % 2], model,
            provider, 300 + i % 500, 100 + i % 200))
        if i % 10 == 9:
            await engine.void(out.permit_id, "bench")
        else:
            await engine.closeout(out.permit_id, TokenUsage(300 + i % 500, 100, 0, 80),
                                  "SUCCEEDED", None)

    for start in range(0, permits, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(start + concurrency, permits))))
    await client.aclose()
    return int(redis.Redis.from_url(redis_url).xlen(KeySpace(PREFIX).stream))


def drain(redis_url: str, store: LedgerStore, group: str, batch: int) -> tuple[int, float]:
    cfg = WriterConfig(key_prefix=PREFIX, group=group, consumer="bench", batch_size=batch,
                       block_ms=1, trim=False, claim_interval_s=3600)
    writer = LedgerWriter(cfg, store, redis.Redis.from_url(redis_url))
    writer.ensure_group()
    handled = 0
    t0 = time.perf_counter()
    while True:
        n = writer.step()
        if n == 0:
            break
        handled += n
    return handled, time.perf_counter() - t0


def measure(redis_url: str, pg: Any, work: pathlib.Path, *, batch: int,
            rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"null": [], "sqlite": [], "postgresql": []}
    for r in range(rounds):
        # Alternate the order so neither store always runs on a warmer machine.
        order = ("null", "sqlite", "postgresql") if r % 2 == 0 else (
            "postgresql", "sqlite", "null")
        for name in order:
            if name == "null":
                store: LedgerStore = NullStore()
            elif name == "sqlite":
                store = LedgerStore(f"sqlite:///{work}/ledger-{r}.db")
            else:
                store = LedgerStore(pg.create_database())
            store.migrate()
            n, elapsed = drain(redis_url, store, f"{name}-{r}", batch)
            store.close()
            rates[name].append(n / elapsed)
            print(f"bench_ledger: round {r + 1} {name}: {n} events in {elapsed:.2f}s "
                  f"= {n / elapsed:,.0f} events/s", flush=True)
    return rates


def run_bench(permits: int, batch: int, rounds: int, work: pathlib.Path) -> list[Row]:
    from tests.integration.pg_fixture import postgres_server

    with RedisServer(work / "redis") as server, postgres_server(fast=False) as pg:
        t0 = time.perf_counter()
        events = asyncio.run(produce(server.url, permits))
        print(f"bench_ledger: {events} genuine events from {permits} permits in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        rates = measure(server.url, pg, work, batch=batch, rounds=rounds)
    null = statistics.median(rates["null"])
    rows = [Row("ledger", "writer, no store (read+parse+ack)", null, "events/s", None, "",
                f"{events} events, batches of {batch}")]
    for name in ("sqlite", "postgresql"):
        value = statistics.median(rates[name])
        spread = f"{min(rates[name]):,.0f}..{max(rates[name]):,.0f}"
        rows.append(Row("ledger", f"writer into {name}", value, "events/s", value / null,
                        "no store", f"median of {rounds}, range {spread}"))
    return rows


def run(ctx: Context) -> list[Row]:
    permits = 2_000 if ctx.quick else 20_000
    work = ctx.path("ledger")
    work.mkdir(parents=True, exist_ok=True)
    return run_bench(permits, 500, ctx.rounds, work)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_ledger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--permits", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="keel-bench-ledger-"))
    try:
        rows = run_bench(ns.permits, ns.batch_size, ns.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for r in rows:
        ratio = "" if r.ratio is None else f"  ({r.ratio:.2f}x {r.baseline})"
        print(f"{r.name:<40} {r.value:>10,.0f} {r.unit}{ratio}  {r.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
