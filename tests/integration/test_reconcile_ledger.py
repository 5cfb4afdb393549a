"""Reconcile straight from the ledger store (``--store``): genuine events from the
engine, stored by the ledger, read back as internal usage and joined against a
provider cost export priced from the same usage. Runs over SQLite and a real
PostgreSQL server (the ledger's store fixture)."""

from __future__ import annotations

import csv
import json
import pathlib
from collections import defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import fakeredis
import pytest
import yaml

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.pricing import TokenUsage
from keel_pdp.reconcile.internal import from_ledger
from keel_pdp.reconcile.period import Period
from keel_pdp.reconcile.prices import load_prices
from tests.helpers import make_engine, read_stream
from tests.integration.conftest import STREAM, ledger_bundle
from tests.unit.test_reconcile_e2e import main

pytestmark = pytest.mark.integration

PROJECTS = {("acme", "chat"): "proj_chat", ("globex", "search"): "proj_search"}
SNAPSHOT = "gpt-4o-mini-2024-07-18"


async def _settle_traffic(bundle: pathlib.Path, store: LedgerStore) -> list[dict[str, Any]]:
    """Authorize and close out a few requests; store the stream in the ledger."""
    client = fakeredis.FakeAsyncRedis()
    engine = make_engine(client, bundle)
    for i in range(12):
        tenant, workload = list(PROJECTS)[i % 2]
        res = await engine.authorize(AuthorizeInput(f"rq-{i}", tenant, workload, "gpt-4o-mini",
                                                    "openai", 20_000 + 1_000 * i, 800))
        assert res.decision is not DecisionKind.DENY
        usage = TokenUsage(input_tokens=20_000 + 1_000 * i, cached_input_tokens=5_000 * (i % 3),
                           output_tokens=300 + 17 * i, reasoning_tokens=10)
        await engine.closeout(res.permit_id, usage, "FAILED" if i == 7 else "SUCCEEDED", None)
    raw: Any = await read_stream(client, STREAM)
    events = [parse_entry(eid.decode(), fields) for eid, fields in raw]
    store.write_batch(events)
    return [{"ts": e.ts_ms, "pid": e.permit_id, **e.data} for e in events
            if e.etype == "settlement"]


def _exact_pico(s: dict[str, Any], bundle: pathlib.Path) -> int:
    return sum(_exact_by_type(s, bundle).values())


def _exact_by_type(s: dict[str, Any], bundle: pathlib.Path) -> dict[str, int]:
    """One settlement's exact cost per token type, in pico-USD, from the price table."""
    doc = yaml.safe_load((bundle / "prices.yaml").read_text())
    spec = doc["providers"]["openai"]["gpt-4o-mini"]
    rate = {k: int(Decimal(spec[k]) * 10**6) for k in ("input", "cached_input", "output")}
    u = s["usage"]
    return {"input": (u["in"] - u["cached"] - u["cw"]) * rate["input"],
            "cached_input": u["cached"] * rate["cached_input"],
            "output": u["out"] * rate["output"]}


def _exact_by_series(settlements: list[dict[str, Any]], pids: dict[str, tuple[str, str]],
                     bundle: pathlib.Path) -> dict[tuple[str, str, int, str], int]:
    out: dict[tuple[str, str, int, str], int] = defaultdict(int)
    for s in settlements:
        tenant, workload = pids[s["pid"]]
        for ttype, pico in _exact_by_type(s, bundle).items():
            out[(tenant, workload, s["ts"] // 86_400_000, ttype)] += pico
    return out


def _half_even(pico: int) -> int:
    return int((Decimal(pico) / 10**6).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def _costs_export(settlements: list[dict[str, Any]], pids: dict[str, tuple[str, str]],
                  bundle: pathlib.Path, path: pathlib.Path) -> None:
    """What the provider bills: the successful requests, exactly, per day and project."""
    book = load_prices(bundle)
    pico: dict[tuple[int, str, str], int] = defaultdict(int)
    for s in settlements:
        if s["outcome"] == "FAILED":
            continue
        u = s["usage"]
        price = book.price_for("openai", "gpt-4o-mini", s["ts"], u["in"])
        assert price is not None
        day = s["ts"] // 86_400_000 * 86_400
        project = PROJECTS[pids[s["pid"]]]
        pico[(day, project, "input")] += (u["in"] - u["cached"] - u["cw"]) * price.input
        pico[(day, project, "cached input")] += u["cached"] * price.cached_input
        pico[(day, project, "output")] += u["out"] * price.output
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (day, project, label), value in sorted(pico.items()):
        buckets[day].append({"object": "organization.costs.result",
                             "amount": {"value": f"__{Decimal(value) / 10**12:f}__",
                                        "currency": "usd"},
                             "line_item": f"{SNAPSHOT}, {label}", "project_id": project})
    page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": d, "end_time": d + 86_400, "results": r}
        for d, r in sorted(buckets.items())]}
    path.write_text(json.dumps(page).replace('"__', "").replace('__"', ""))


async def test_reconcile_from_the_ledger_store(store_url: str, tmp_path: pathlib.Path) -> None:
    bundle = ledger_bundle(tmp_path / "bundle")
    store = LedgerStore(store_url)
    store.migrate()
    settlements = await _settle_traffic(bundle, store)
    pids = {str(p): (str(t), str(w)) for p, t, w in store.query(
        "SELECT permit_id, tenant, workload FROM ledger_entries WHERE kind = 'permit'")}
    now = datetime.fromtimestamp(settlements[0]["ts"] / 1000, tz=UTC)
    period = Period(now.year, now.month)

    lines = from_ledger(store_url, period)
    assert len(lines) == 12
    # The internal side is the exact cost, rounded once per tenant, workload, day and
    # token type (half even), not the booked costs, each rounded up.
    exact = _exact_by_series(settlements, pids, bundle)
    got: dict[tuple[str, str, int, str], int] = defaultdict(int)
    for ln in lines:
        for ttype, value in (("input", ln.input_cost_micros),
                             ("cached_input", ln.cached_input_cost_micros),
                             ("output", ln.output_cost_micros)):
            got[(ln.tenant, ln.workload, ln.ts_ms // 86_400_000, ttype)] += value or 0
    assert dict(got) == {k: _half_even(v) for k, v in exact.items()}
    assert sum(ln.cost_micros for ln in lines) < sum(s["actual"] for s in settlements)
    for ln in lines:
        parts = [ln.input_cost_micros, ln.cached_input_cost_micros, ln.cache_write_cost_micros,
                 ln.output_cost_micros]
        assert None not in parts and sum(p or 0 for p in parts) == ln.cost_micros
    assert [ln.failed for ln in lines].count(True) == 1
    assert {(ln.tenant, ln.workload) for ln in lines} == set(PROJECTS)
    assert from_ledger(store_url, period.next()) == []

    costs = tmp_path / "costs.json"
    _costs_export(settlements, pids, bundle, costs)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "accounts:\n"
        "  - {provider: openai, account: proj_chat, tenant: acme, workload: chat}\n"
        "  - {provider: openai, account: proj_search, tenant: globex, workload: search}\n"
        "workloads:\n"
        "  - {tenant: acme, workload: chat, engineering_owner: Dana Ruiz}\n"
        "  - {tenant: globex, workload: search, engineering_owner: Lee Park}\n")
    out = tmp_path / "out"
    assert main(["reconcile", "--store", store_url, "--period", str(period), "--provider",
                 "openai", "--export", str(costs), "--mapping", str(mapping),
                 "--out", str(out)]) == 0
    memo = json.loads((out / str(period) / "openai" / "memo.json").read_text())
    cats = {c["category"]: c for c in memo["categories"]}
    failed = next(s for s in settlements if s["outcome"] == "FAILED")
    # The failed request's share of its series' rounded totals: within a micro-dollar
    # of its exact cost per token type.
    failed_exact = Decimal(_exact_pico(failed, bundle)) / 10**6
    assert abs(cats["failed_request_billing"]["net_micros"] + failed_exact) < 3
    for name in ("unexplained", "clock_skew", "cache_read_rate", "tier_breakpoint"):
        assert cats[name]["net_micros"] == 0, name
    assert abs(cats["rounding"]["net_micros"]) <= 12
    assert memo["totals"]["internal_requests"] == 12


def test_a_missing_ledger_database_is_a_clear_error(tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/nothing.db"
    assert main(["reconcile", "--store", url, "--period", "2026-01", "--provider", "openai",
                 "--export", str(pathlib.Path(__file__).parents[1] / "fixtures" / "reconcile"
                                 / "openai" / "costs.json"),
                 "--mapping", str(pathlib.Path(__file__).parents[1] / "fixtures" / "reconcile"
                                  / "mapping.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "no ledger database at that path" in capsys.readouterr().err
    assert not (tmp_path / "nothing.db").exists()


# ------------------------------------------------------------------ a month imported


def _cli(argv: list[str]) -> int:
    from keel_pdp.cli import main as cli_main

    return cli_main(argv)


def test_an_imported_month_reconciles_through_the_store_to_the_cent(
        store_url: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reconcile_month.generate import generate
    from tests.unit.test_reconcile_e2e import reconcile_args

    month = tmp_path / "in"
    answer = generate(month, seed=21, requests=20_000)
    internal = month / answer["internal"]
    assert _cli(["ledger", "import", "--store", store_url, str(internal)]) == 0
    assert "imported 20000 of 20000" in capsys.readouterr().out
    # Importing the same file again books nothing.
    assert _cli(["ledger", "import", "--store", store_url, str(internal)]) == 0
    assert "imported 0 of 20000" in capsys.readouterr().out
    store = LedgerStore(store_url)
    try:
        rows = store.query("SELECT kind, caller, COUNT(*), SUM(amount_micros) FROM "
                           "ledger_entries GROUP BY kind, caller ORDER BY kind")
    finally:
        store.close()
    with internal.open() as fh:
        booked = sum(int(r["cost_micros"]) for r in csv.DictReader(fh))
    assert [(k, c, int(n)) for k, c, n, _ in rows] == [("correction", "import", 20_000),
                                                      ("settlement", "import", 20_000)]
    assert sum(int(s) for *_, s in rows) == booked  # append-only, every micro once
    for provider in ("openai", "anthropic"):
        via_file = reconcile_args(month, answer, provider, tmp_path / "file")
        assert main(via_file) == 1
        i = via_file.index("--internal")
        via_store = [*via_file[:i], "--store", store_url, *via_file[i + 2:]]
        via_store[via_store.index("--out") + 1] = str(tmp_path / "store")
        assert main(via_store) == 1
        memos = [json.loads((tmp_path / d / "2026-01" / provider / "memo.json").read_text())
                 for d in ("file", "store")]
        by_file, by_store = ({c["category"]: (c["net_micros"], sorted(c["request_ids"]))
                              for c in m["categories"]} for m in memos)
        assert by_store == by_file
        assert memos[1]["by_account"] == memos[0]["by_account"]
        expected = answer["providers"][provider]["categories"]
        for cat, (net, _) in by_store.items():
            assert abs(net - Decimal(expected[cat])) < 5_000, (provider, cat)


def test_a_bad_row_imports_nothing(store_url: str, tmp_path: pathlib.Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reconcile_month.generate import generate

    month = tmp_path / "in"
    answer = generate(month, seed=22, requests=300)
    path = month / answer["internal"]
    lines = path.read_text().splitlines()
    cells = lines[5].split(",")
    cells[5] = "12x"  # input_tokens
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    assert _cli(["ledger", "import", "--store", store_url, str(path)]) == 2
    err = capsys.readouterr().err
    assert "internal_usage.csv: row 6: column 'input_tokens'" in err
    assert "nothing was imported" in err
    store = LedgerStore(store_url)
    try:
        store.migrate()
        assert store.query("SELECT COUNT(*) FROM ledger_entries")[0][0] == 0
    finally:
        store.close()


# ------------------------------------------------------------------ a day through the sidecar

DAY_PRICES = {"gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
              "gpt-4.1": {"input": "2.00", "cached_input": "0.50", "output": "8.00"}}
DAY_PROJECTS = {("acme", "chat", "gpt-4o-mini"): "proj_chat",
                ("globex", "search", "gpt-4.1"): "proj_search"}


def test_a_day_of_sidecar_traffic_reconciles_from_the_ledger_store(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    """The sidecar (``keel-pdp serve``) decides and settles a day of traffic over
    gRPC, the ledger writer stores the decision stream, and reconcile reads the
    store. The provider export is written here from the usage the callers sent,
    priced with this test's own arithmetic; the provider did not bill the failed
    attempts and one of its lines carries $1.23 with no usage behind it."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from decimal import Decimal

    import grpc

    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
    from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
    from tests.conftest import free_port
    from tests.helpers import budget, wait_serving, write_bundle
    from tests.integration.conftest import PREFIX, drain, make_writer

    bundle = write_bundle(tmp_path / "policies",
                          [budget("org-monthly", "100000.00", window="monthly")])
    port = free_port()
    env = {**os.environ, "KEEL_POLICIES": str(bundle), "KEEL_REDIS_URL": redis_url,
           "KEEL_LISTEN": f"127.0.0.1:{port}", "KEEL_KEY_PREFIX": PREFIX,
           "KEEL_METRICS_PORT": "0",
           # the machine is shared: give Redis time rather than test the fail-closed path
           "KEEL_STORE_TIMEOUT": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "keel_pdp.cli", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rng = random.Random(5)
    million = Decimal(1_000_000)
    billed: dict[tuple[int, str, str, str], Decimal] = defaultdict(Decimal)
    failed: dict[str, Decimal] = {}
    internal_exact = Decimal(0)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        stub = pb_grpc.PolicyDecisionPointStub(channel)
        for i in range(240):
            (tenant, workload, model), project = rng.choice(list(DAY_PROJECTS.items()))
            total_in = rng.randint(300, 20_000)
            cached = rng.randint(0, total_in // 2) if rng.random() < 0.5 else 0
            generated = rng.randint(20, 900)
            r = stub.Authorize(pb.AuthorizeRequest(
                request_id=f"day-{i}", tenant=tenant, workload=workload, model=model,
                provider="openai", estimated_input_tokens=total_in, max_output_tokens=1000),
                timeout=5)
            assert r.decision == pb.ALLOW, r
            outcome = pb.FAILED if rng.random() < 0.06 else pb.SUCCEEDED
            day = int(time.time()) // 86_400 * 86_400
            c = stub.Closeout(pb.CloseoutRequest(permit_id=r.permit_id, usage=pb.Usage(
                input_tokens=total_in, cached_input_tokens=cached, output_tokens=generated),
                outcome=outcome), timeout=5)
            assert c.status == pb.SETTLED
            p = DAY_PRICES[model]
            parts = {"input": (total_in - cached) * Decimal(p["input"]) / million,
                     "cached input": cached * Decimal(p["cached_input"]) / million,
                     "output": generated * Decimal(p["output"]) / million}
            internal_exact += sum(parts.values())
            if outcome == pb.FAILED:
                failed[r.permit_id] = sum(parts.values(), Decimal(0))
                continue
            for label, usd in parts.items():
                if usd:
                    billed[(day, project, model, label)] += usd
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, log

    store_url = f"sqlite:///{tmp_path}/ledger.db"
    store = LedgerStore(store_url)
    store.migrate()
    assert drain(make_writer(redis_url, store)) > 0
    store.close()

    planted = max(billed, key=lambda k: billed[k])
    billed[planted] += Decimal("1.23")
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    snapshot = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4.1": "gpt-4.1-2025-04-14"}
    for (day, project, model, label), usd in sorted(billed.items()):
        buckets[day].append({"object": "organization.costs.result",
                             "amount": {"value": f"@@{usd:f}@@", "currency": "usd"},
                             "line_item": f"{snapshot[model]}, {label}",
                             "project_id": project})
    page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": d, "end_time": d + 86_400, "results": r}
        for d, r in sorted(buckets.items())]}
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(page).replace('"@@', "").replace('@@"', ""))
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "finance_owner: Priya Natarajan\nai_program_lead: Sam Okafor\naccounts:\n"
        "  - {provider: openai, account: proj_chat, tenant: acme, workload: chat}\n"
        "  - {provider: openai, account: proj_search, tenant: globex, workload: search}\n"
        "workloads:\n"
        "  - {tenant: acme, workload: chat, engineering_owner: Dana Ruiz}\n"
        "  - {tenant: globex, workload: search, engineering_owner: Lee Park}\n")
    now = datetime.now(UTC)
    period = f"{now.year:04d}-{now.month:02d}"
    out = tmp_path / "out"
    assert main(["reconcile", "--store", store_url, "--period", period, "--provider",
                 "openai", "--export", str(costs), "--mapping", str(mapping),
                 "--out", str(out), "--tolerance-pct", "50"]) == 0
    memo = json.loads((out / period / "openai" / "memo.json").read_text())
    cats = {c["category"]: c for c in memo["categories"]}
    half_cent = 5_000
    assert abs(memo["totals"]["internal_micros"] - internal_exact * million) < half_cent
    assert abs(cats["failed_request_billing"]["net_micros"]
               + sum(failed.values()) * million) < half_cent
    assert sorted(cats["failed_request_billing"]["request_ids"]) == sorted(failed)
    # the planted $1.23, give or take the rounding of its one line
    assert abs(cats["unexplained"]["net_micros"] - 1_230_000) < 50
    assert [(i["account"], i["model"]) for i in cats["unexplained"]["line_items"]] == [
        (planted[1], planted[2])]
    for name in ("clock_skew", "cache_read_rate", "tier_breakpoint"):
        assert cats[name]["net_micros"] == 0, name
    assert abs(cats["rounding"]["net_micros"]) < half_cent
    assert memo["totals"]["internal_requests"] == 240
