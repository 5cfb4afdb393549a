"""Ledger test kit: PostgreSQL fixtures, a store URL parametrised over SQLite and
PostgreSQL, and helpers that drive the real engine to produce genuine events."""

from __future__ import annotations

import json
import pathlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, write_bundle
from tests.integration.pg_fixture import PostgresServer, pg_server, pg_url

__all__ = ["PostgresServer", "pg_server", "pg_url"]

PREFIX = "t"  # tests.helpers.make_engine uses KeySpace("t")
STREAM = "t:{pdp}:events"
RETENTION_S = 90 * 86_400  # lets tests issue permits in the previous month


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """One test body over the embedded SQLite store and a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return str(request.getfixturevalue("pg_url"))


def ledger_bundle(directory: pathlib.Path) -> pathlib.Path:
    return write_bundle(
        directory,
        [budget("org-monthly", "1000.00", window="monthly", exception_path="finance-overage"),
         budget("tenant-daily", "50.00", per=["tenant"], mode="observe"),
         budget("tiny-daily", "0.000100", scope={"tenant": "tiny"})],
        settings={"permit_retention_seconds": RETENTION_S},
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "100.00"}],
        routes=[{"id": "restricted-models", "scope": {"workload": "restricted"},
                 "allowed_models": ["openai/gpt-4o-mini"]}])


MODELS = (("openai", "gpt-4o-mini"), ("openai", "gpt-4.1"), ("anthropic", "claude-sonnet-4-5"))


@dataclass
class Traffic:
    permits: list[str] = field(default_factory=list)
    open: list[str] = field(default_factory=list)
    denials: int = 0


async def traffic(engine: Engine, n: int, tag: str, *, tenants: tuple[str, ...] = (
        "acme", "globex"), settle: bool = True) -> Traffic:
    """n Authorize calls with a deterministic mix of outcomes: most permits are
    settled (some with a provider-reported cost), some voided, some left open;
    every 11th request is denied by routing policy."""
    out = Traffic()
    for i in range(n):
        provider, model = MODELS[i % len(MODELS)]
        workload = "restricted" if i % 11 == 5 else ("chat", "search")[(i // 2) % 2]
        tin, tout = 200 + 37 * (i % 13), 50 + 11 * (i % 7)
        res = await engine.authorize(AuthorizeInput(
            f"{tag}-{i}", tenants[i % len(tenants)], workload, model, provider, tin, tout))
        if res.decision is DecisionKind.DENY:
            out.denials += 1
            continue
        out.permits.append(res.permit_id)
        mode = i % 5
        if settle and mode in (0, 1, 2):
            usage = TokenUsage(input_tokens=tin, cached_input_tokens=tin // 4,
                               output_tokens=tout // 2, reasoning_tokens=tout // 8)
            cost = 1234 if i % 7 == 0 else None
            await engine.closeout(res.permit_id, usage, "SUCCEEDED", cost)
        elif settle and mode == 3:
            await engine.void(res.permit_id, "caller gave up")
        else:
            out.open.append(res.permit_id)
    return out


@dataclass
class Totals:
    events: int
    types: dict[str, int]
    held: int  # sum of holds made by ALLOW/CONSTRAIN decisions
    denied: int
    actual: int  # sum of settled actual cost
    released: int  # sum released by voids and expiries


def stream_totals(client: redis.Redis, stream: str = STREAM) -> Totals:
    """What the stream says, read independently of the ledger's parser."""
    raw: Any = client.xrange(stream)
    types: Counter[str] = Counter()
    held = denied = actual = released = 0
    for _, f in raw:
        etype = f[b"type"].decode()
        res = json.loads(f[b"res"])
        types[etype] += 1
        if etype == "decision":
            if res["d"] == "DENY":
                denied += 1
            else:
                held += int(res["amt"])
        elif etype == "settlement":
            actual += int(res["act"])
        elif etype in ("void", "expiry"):
            released += int(res["amt"])
    return Totals(len(raw), dict(types), held, denied, actual, released)


def store_totals(store: LedgerStore) -> Totals:
    kinds = dict(store.query("SELECT kind, COUNT(*) FROM ledger_entries GROUP BY kind"))
    etypes = {str(k): int(v) for k, v in
              store.query("SELECT etype, COUNT(*) FROM ledger_events GROUP BY etype")}
    sums = store.query(
        "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'permit' THEN held_micros END), 0) AS BIGINT),"
        " CAST(COALESCE(SUM(CASE WHEN kind = 'settlement' THEN actual_micros END), 0) AS BIGINT),"
        " CAST(COALESCE(SUM(CASE WHEN kind IN ('void', 'expiry') THEN held_micros END), 0)"
        " AS BIGINT) FROM ledger_entries")[0]
    return Totals(sum(etypes.values()), etypes, int(sums[0]), int(kinds.get("denial", 0)),
                  int(sums[1]), int(sums[2]))


def assert_ledger_matches_stream(store: LedgerStore, client: redis.Redis) -> None:
    want, got = stream_totals(client), store_totals(store)
    assert got == want
    kinds = dict(store.query("SELECT kind, COUNT(*) FROM ledger_entries GROUP BY kind"))
    assert int(kinds.get("settlement", 0)) == want.types.get("settlement", 0)
    assert int(kinds.get("correction", 0)) == want.types.get("settlement", 0)
    assert int(kinds.get("permit", 0)) + int(kinds.get("denial", 0)) == \
        want.types.get("decision", 0)


def make_writer(redis_url: str, store: LedgerStore, **kw: Any) -> LedgerWriter:
    cfg = WriterConfig(**{"key_prefix": PREFIX, "block_ms": 10, "consumer": "w1",
                          "trim": False, "backoff_initial_s": 0.01,
                          "backoff_max_s": 0.05, **kw})
    return LedgerWriter(cfg, store, redis.Redis.from_url(redis_url))


def drain(writer: LedgerWriter, max_steps: int = 10_000) -> int:
    """Step the writer until a read comes back empty; returns entries handled."""
    total = 0
    for _ in range(max_steps):
        n = writer.step()
        if n == 0:
            return total
        total += n
    raise AssertionError("writer did not drain")
