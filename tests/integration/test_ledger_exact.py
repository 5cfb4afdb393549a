"""Exact amounts in the ledger: many small calls through the real engine, a real
Redis and the ledger writer (SQLite and a real PostgreSQL server), then the
report, the chargeback and FOCUS exports and reconciliation's ledger reader.

Each settlement books its cost rounded up to the micro-dollar (budgets stay
conservative) and carries the exact cost beside it; what finance reads sums the
exact costs and rounds each output line once, half to even. The expectations are
worked out here from the price table's YAML with Decimal arithmetic (not through
keel_pdp.pricing or keel_pdp.money): 701 embeddings at 8.5 micro-USD are
5,958.5 micro-USD, shown as 0.005958 (not 701 x 9 = 0.006309, nor 0.005959).
"""

from __future__ import annotations

import csv
import json
import pathlib
import time
from collections import defaultdict
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
import yaml

from keel_pdp.cli import main
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.ledger.connection import insert_sql
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.migrations import BOOKKEEPING, MIGRATIONS
from keel_pdp.ledger.periods import period_of_ms
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.rows import ENTRY_COLUMNS, entry_values
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.pricing import TokenUsage
from keel_pdp.reconcile.internal import from_ledger
from keel_pdp.reconcile.period import Period
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.integration.conftest import STREAM, drain, make_writer
from tests.unit.test_reconcile_e2e import main as recon_main

pytestmark = pytest.mark.integration

EMBED = "text-embedding-3-small"
PRICES = {"openai": {
    EMBED: {"input": "0.02", "output": "0", "max_output_tokens": 1},
    "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60",
                    "max_output_tokens": 1000},
}}
# tenant -> (calls, input tokens each, provider-reported cost in micro-USD or None)
CALLS = {
    "acme": (701, 425, None),     # 8.5 micro-USD each
    "globex": (299, 333, None),   # 6.66 micro-USD each
    "initech": (3, 425, 7),       # the provider reported 7 micro-USD: exact as it is
}


def _bundle(directory: pathlib.Path) -> pathlib.Path:
    return write_bundle(directory, [budget("org-monthly", "100.00", window="monthly")],
                        prices=PRICES, settings={"min_output_tokens": 1})


def _exact_call(bundle: pathlib.Path, tokens: int) -> Decimal:
    """One embedding's exact cost in micro-USD: USD per 1M tokens is micro-USD per token."""
    spec = yaml.safe_load((bundle / "prices.yaml").read_text())["providers"]["openai"][EMBED]
    return Decimal(spec["input"]) * tokens


def _expected(bundle: pathlib.Path) -> dict[str, tuple[Decimal, int]]:
    """tenant -> (exact micro-USD, booked micro-USD: each call rounded up)."""
    out = {}
    for tenant, (n, tokens, cost) in CALLS.items():
        one = Decimal(cost) if cost is not None else _exact_call(bundle, tokens)
        out[tenant] = (one * n, int(one.to_integral_value(rounding=ROUND_CEILING)) * n)
    return out


def _once(exact: Decimal) -> int:
    return int(exact.to_integral_value(rounding=ROUND_HALF_EVEN))


def _micros(text: str) -> int:
    value = Decimal(text) * 1_000_000
    assert value == value.to_integral_value(), text
    return int(value)


async def _embed(engine: Engine, tag: str, tenants: dict[str, tuple[int, int, int | None]]
                 ) -> list[int]:
    booked = []
    for tenant, (n, tokens, cost) in tenants.items():
        for i in range(n):
            ok = await engine.authorize(AuthorizeInput(f"{tag}-{tenant}-{i}", tenant, "embed",
                                                       EMBED, "openai", tokens, 1))
            assert ok.decision is not DecisionKind.DENY, ok.reasons
            done = await engine.closeout(ok.permit_id, TokenUsage(input_tokens=tokens),
                                         "SUCCEEDED", cost)
            booked.append(done.actual_cost_micros)
            if i % 100 == 0:
                # A retried closeout (other usage, even) books nothing more.
                again = await engine.closeout(ok.permit_id, TokenUsage(input_tokens=tokens * 3),
                                              "SUCCEEDED", cost)
                assert again.status == "ALREADY_SETTLED"
    return booked


@pytest.fixture
async def booked(redis_url: str, store_url: str, tmp_path: pathlib.Path) -> Any:
    bundle = _bundle(tmp_path / "bundle")
    client = aioredis.Redis.from_url(redis_url)
    engine = make_engine(client, bundle)
    store = LedgerStore(store_url)
    store.migrate()
    writer = make_writer(redis_url, store)
    tag = f"emb{time.time_ns()}"
    booked = await _embed(engine, tag, CALLS)
    drain(writer)
    yield {"store": store, "bundle": bundle, "booked": booked,
           "period": period_of_ms(time.time_ns() // 1_000_000)}
    store.close()
    await client.aclose()


async def test_settlements_book_rounded_up_and_keep_the_exact_cost(booked: Any) -> None:
    store: LedgerStore = booked["store"]
    want = _expected(booked["bundle"])
    # The caller and the budgets see the booked cost: each call rounded up.
    assert sum(booked["booked"]) == sum(b for _, b in want.values())
    rows = store.query("SELECT tenant, actual_micros, actual_pico FROM ledger_entries "
                       "WHERE kind = 'settlement'")
    by_tenant: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for tenant, micros, pico in rows:
        by_tenant[str(tenant)].append((int(micros), int(pico)))
    for tenant, (n, tokens, cost) in CALLS.items():
        one = Decimal(cost) if cost is not None else _exact_call(booked["bundle"], tokens)
        assert set(by_tenant[tenant]) == {(int(one.to_integral_value(rounding=ROUND_CEILING)),
                                           int(one * 1_000_000))}, tenant
        assert len(by_tenant[tenant]) == n


async def test_report_sums_exact_costs_and_rounds_each_line_once(
        booked: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store: LedgerStore = booked["store"]
    want = _expected(booked["bundle"])
    report = build_report(store, booked["period"], ["tenant"])
    for tenant, (exact, booked_micros) in want.items():
        fig = report.groups[(tenant,)]
        assert fig.settlements == CALLS[tenant][0]
        assert fig.actual_micros == booked_micros  # the books, as booked
        assert fig.actual_line_micros == _once(exact), tenant
    assert main(["report", "--store", store.url, "--period", booked["period"], "--by",
                 "tenant", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for g in doc["groups"]:
        exact = want[g["tenant"]][0]
        # Every permit is settled: cost = actual; nothing accrued.
        assert _micros(g["actual_usd"]) == _micros(g["cost_usd"]) == _once(exact), g
        assert _micros(g["booked_usd"]) == _once(exact), g
        assert _micros(g["accrued_usd"]) == 0
    total = sum((e for e, _ in want.values()), Decimal(0))
    assert _micros(doc["total"]["actual_usd"]) == _once(total)
    acme = next(g for g in doc["groups"] if g["tenant"] == "acme")
    assert acme["actual_usd"] == "0.005958"  # 701 x 8.5 = 5,958.5 -> half even
    # The variance is the exact cost against the held estimates (rounded up).
    forecast = _micros(acme["forecast_usd"])
    assert _micros(acme["variance_usd"]) == _once(want["acme"][0] - forecast)


async def test_exports_sum_exact_costs_and_round_each_row_once(
        booked: Any, tmp_path: pathlib.Path) -> None:
    store: LedgerStore = booked["store"]
    want = _expected(booked["bundle"])
    out = tmp_path / "chargeback.csv"
    assert main(["export", "--store", store.url, "--period", booked["period"], "--format",
                 "csv", "--by", "tenant", "--out", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["tenant"] for r in rows) == sorted(CALLS)
    for r in rows:
        exact = want[r["tenant"]][0]
        assert _micros(r["actual_usd"]) == _micros(r["charge_usd"]) == _once(exact), r
        assert _micros(r["accrual_usd"]) == 0
        assert int(r["settlements"]) == CALLS[r["tenant"]][0]

    focus = tmp_path / "focus.csv"
    assert main(["export", "--store", store.url, "--period", booked["period"], "--format",
                 "focus", "--out", str(focus)]) == 0
    with focus.open(newline="") as fh:
        frows = list(csv.DictReader(fh))
    billed: dict[str, list[int]] = defaultdict(list)
    for r in frows:
        assert r["BilledCost"] == r["EffectiveCost"]
        billed[r["x_Tenant"]].append(_micros(r["BilledCost"]))
    # One day, one model, input tokens only: one row per tenant, rounded once.
    assert {t: v for t, v in billed.items()} == {t: [_once(e)] for t, (e, _) in want.items()}


async def test_reconcile_reads_the_exact_costs(booked: Any) -> None:
    store: LedgerStore = booked["store"]
    want = _expected(booked["bundle"])
    now = time.gmtime()
    lines = from_ledger(store.url, Period(now.tm_year, now.tm_mon))
    got: dict[str, int] = defaultdict(int)
    for ln in lines:
        got[ln.tenant] += ln.cost_micros
    # One series per tenant (same workload, model, day and token type): rounded once.
    assert dict(got) == {t: _once(e) for t, (e, _) in want.items()}


# ------------------------------------------------------------ an older ledger

OLD_COLUMNS = ENTRY_COLUMNS[:ENTRY_COLUMNS.index("actual_pico")]


async def _stream_events(bundle: pathlib.Path, tag: str, n: int,
                         old_sidecar: bool) -> list[Any]:
    client = fakeredis.FakeAsyncRedis()
    engine = make_engine(client, bundle)
    await _embed(engine, tag, {"acme": (n, 425, None)})
    raw: Any = await read_stream(client, STREAM)
    out = []
    for eid, fields in raw:
        if old_sidecar and fields[b"type"] == b"settlement":
            data = json.loads(fields[b"data"])
            del data["exact_pico"]  # written before exact amounts existed
            fields = {**fields, b"data": json.dumps(data).encode()}
        out.append(parse_entry(eid.decode(), fields))
    return out


async def test_an_older_ledger_upgrades_and_still_reports(
        store_url: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle(tmp_path / "bundle")
    old_events = await _stream_events(bundle, "old", 5, old_sidecar=True)
    period = period_of_ms(old_events[0].ts_ms)
    # The ledger as the previous release left it: migrations 1-3, entries without
    # the exact column.
    old = LedgerStore(store_url)
    with old.tx() as tx:
        tx.script(BOOKKEEPING)
        for m in MIGRATIONS[:3]:
            for stmt in m.statements(old.dialect):
                tx.script(stmt)
            tx.run("INSERT INTO ledger_schema_migrations (version, name, applied_at_ms) "
                   "VALUES (?, ?, ?)", (m.version, m.name, 0))
        rows = [r for ev in old_events for r in ev.rows]
        assert all(r.actual_pico is None for r in rows)
        # A settlement's entries are charged to its permit's tenant and workload.
        dims = {r.permit_id: r.dims for r in rows if r.kind == "permit"}
        tx.many(insert_sql("ledger_entries", OLD_COLUMNS),
                [entry_values(r, dims[r.permit_id], period, 0)[:len(OLD_COLUMNS)]
                 for r in rows])
    old.close()

    store = LedgerStore(store_url)
    try:
        assert store.migrate() == [MIGRATIONS[-1].version]
        assert store.query("SELECT COUNT(*) FROM ledger_entries WHERE actual_pico IS NULL "
                           "AND kind = 'settlement'") == [(5,)]
        # The upgraded sidecar's settlements carry the exact cost.
        store.write_batch(await _stream_events(bundle, "new", 3, old_sidecar=False))
        # Old entries count as booked (5 x 9), new ones exactly (3 x 8.5): 70.5 -> 70.
        exact = 5 * Decimal(9) + 3 * _exact_call(bundle, 425)
        report = build_report(store, period, ["tenant"])
        assert report.groups[("acme",)].actual_line_micros == _once(exact) == 70
        assert main(["report", "--store", store.url, "--period", period, "--by", "tenant",
                     "--format", "csv"]) == 0
        (row,) = [r for r in csv.DictReader(capsys.readouterr().out.splitlines())
                  if r["tenant"] == "acme"]
        assert _micros(row["actual_usd"]) == _micros(row["cost_usd"]) == 70
        out = tmp_path / "chargeback.csv"
        assert main(["export", "--store", store.url, "--period", period, "--format", "csv",
                     "--by", "tenant", "--out", str(out)]) == 0
        with out.open(newline="") as fh:
            (charge,) = list(csv.DictReader(fh))
        assert _micros(charge["charge_usd"]) == 70
        year, month = (int(x) for x in period.split("-"))
        lines = from_ledger(store.url, Period(year, month))
        assert [ln.tenant for ln in lines] == ["acme"] * 8
        assert sum(ln.cost_micros for ln in lines) == 70
    finally:
        store.close()


async def test_reconcile_rounding_carries_no_bias(booked: Any, tmp_path: pathlib.Path) -> None:
    """The provider bills the same calls exactly (Costs API, sub-micro decimals): with
    exact amounts on both sides there is no gap, so nothing for rounding to carry
    (with each call rounded up the gap was 701 x 0.5 + 299 x 0.34 micro-USD)."""
    store: LedgerStore = booked["store"]
    want = _expected(booked["bundle"])
    days = {int(ts) // 86_400_000 for (ts,) in store.query(
        "SELECT ts_ms FROM ledger_entries WHERE kind = 'settlement'")}
    assert len(days) == 1, "the calls straddle midnight UTC; run again"
    day = days.pop() * 86_400
    results = [{"object": "organization.costs.result",
                "amount": {"value": f"__{exact / 1_000_000:f}__", "currency": "usd"},
                "line_item": f"{EMBED}, input", "project_id": f"proj_{tenant}"}
               for tenant, (exact, _) in want.items()]
    page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": day, "end_time": day + 86_400,
         "results": results}]}
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(page).replace('"__', "").replace('__"', ""))
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("accounts:\n" + "".join(
        f"  - {{provider: openai, account: proj_{t}, tenant: {t}, workload: embed}}\n"
        for t in CALLS) + "workloads:\n" + "".join(
        f"  - {{tenant: {t}, workload: embed, engineering_owner: Dana Ruiz}}\n"
        for t in CALLS))
    now = time.gmtime(day)
    period = Period(now.tm_year, now.tm_mon)
    out = tmp_path / "out"
    assert recon_main(["reconcile", "--store", store.url, "--period", str(period),
                       "--provider", "openai", "--export", str(costs), "--mapping",
                       str(mapping), "--out", str(out)]) == 0
    memo = json.loads((out / str(period) / "openai" / "memo.json").read_text())
    cats = {c["category"]: c["net_micros"] for c in memo["categories"]}
    assert memo["totals"]["internal_micros"] == sum(_once(e) for e, _ in want.values())
    assert memo["totals"]["gap_micros"] == 0
    assert cats["rounding"] == cats["unexplained"] == 0
