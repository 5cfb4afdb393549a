"""Provider names reach finance: one permit per provider the mesh meters beyond
OpenAI and Anthropic (Azure OpenAI, Gemini API, Vertex AI, Bedrock), authorized
and settled through the real engine, written by the ledger writer, then read
back from `keel-pdp report --by provider`, the chargeback CSV and the FOCUS CSV.

The expected costs are worked out here from the price table's YAML with
decimal arithmetic (not through keel_pdp.pricing): a row that lost or swapped
its provider, or a cost booked under the wrong one, fails.
"""

from __future__ import annotations

import csv
import json
import pathlib
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from keel_pdp.cli import main
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.periods import period_of_ms
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.pricing import TokenUsage
from tests.helpers import make_engine
from tests.integration.conftest import drain, make_writer

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BUNDLE = ROOT / "tests" / "fixtures" / "mesh_policies"
# provider -> (model, input tokens, output tokens): different figures per
# provider, so a cost booked under another provider cannot add up by chance.
CALLS = {
    "azure": ("gpt-4.1-mini", 1200, 300),
    "gemini": ("gemini-2.5-flash", 2000, 150),
    "vertex": ("gemini-2.5-pro", 900, 410),
    "bedrock": ("anthropic.claude-sonnet-4-5-v1:0", 700, 95),
}


def expected_micros(provider: str) -> int:
    model, inp, out = CALLS[provider]
    doc = yaml.safe_load((BUNDLE / "prices.yaml").read_text())
    spec = doc["providers"][provider][model]
    # USD per million tokens is micro-USD per token; a cost is rounded up once.
    exact = Decimal(spec["input"]) * inp + Decimal(spec["output"]) * out
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def micros(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


@pytest.fixture
async def booked(redis_url: str, store_url: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    engine = make_engine(client, BUNDLE)
    store = LedgerStore(store_url)
    store.migrate()
    writer = make_writer(redis_url, store)
    permits = {}
    for provider, (model, inp, out) in CALLS.items():
        ok = await engine.authorize(AuthorizeInput(f"prov-{provider}-{time.time_ns()}", "acme",
                                                   "chat", model, provider, inp, out))
        assert ok.decision is not DecisionKind.DENY, (provider, ok.reasons)
        assert (ok.provider, ok.model) == (provider, model)
        done = await engine.closeout(ok.permit_id, TokenUsage(input_tokens=inp,
                                                              output_tokens=out),
                                     "SUCCEEDED", None)
        assert done.actual_cost_micros == expected_micros(provider), provider
        permits[provider] = ok.permit_id
    drain(writer)
    yield {"store": store, "permits": permits,
           "period": period_of_ms(time.time_ns() // 1_000_000)}
    store.close()
    await client.aclose()


async def test_ledger_rows_carry_each_permits_provider(booked: Any) -> None:
    store: LedgerStore = booked["store"]
    for provider, pid in booked["permits"].items():
        rows = store.query("SELECT kind, provider, model FROM ledger_entries "
                           "WHERE permit_id = ? ORDER BY id", [pid])
        kinds = [r[0] for r in rows]
        # The settlement's difference from the hold is a correction entry.
        assert kinds[:2] == ["permit", "settlement"] and set(kinds[2:]) <= {"correction"}, rows
        assert {(r[1], r[2]) for r in rows} == {(provider, CALLS[provider][0])}


async def test_report_by_provider_names_every_provider_at_its_cost(
        booked: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store: LedgerStore = booked["store"]
    report = build_report(store, booked["period"], ["provider"])
    assert set(report.groups) == {(p,) for p in CALLS}
    for provider in CALLS:
        fig = report.groups[(provider,)]
        assert (fig.permits, fig.settlements) == (1, 1)
        assert fig.actual_micros == expected_micros(provider), provider
    assert main(["report", "--store", store.url, "--period", booked["period"], "--by",
                 "provider,model", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["by"] == ["provider", "model"]
    got = {(g["provider"], g["model"]): (g["settled"], micros(g["actual_usd"]))
           for g in doc["groups"]}
    assert got == {(p, m): ("1", expected_micros(p)) for p, (m, _, _) in CALLS.items()}


async def test_chargeback_and_focus_exports_carry_the_provider(
        booked: Any, tmp_path: pathlib.Path) -> None:
    store: LedgerStore = booked["store"]
    period = booked["period"]
    out = tmp_path / "chargeback.csv"
    assert main(["export", "--store", store.url, "--period", period, "--format", "csv",
                 "--out", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    actual: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["provider"], r["model"])
        actual[key] = actual.get(key, 0) + micros(r["actual_usd"])
    assert actual == {(p, m): expected_micros(p) for p, (m, _, _) in CALLS.items()}

    focus = tmp_path / "focus.csv"
    assert main(["export", "--store", store.url, "--period", period, "--format", "focus",
                 "--out", str(focus)]) == 0
    with focus.open(newline="") as fh:
        frows = list(csv.DictReader(fh))
    billed: dict[tuple[str, str], int] = {}
    for r in frows:
        assert r["ProviderName"] == r["PublisherName"] == r["InvoiceIssuerName"]
        assert r["ServiceName"] == f"{r['ProviderName']} {r['x_Model']}"
        if r["SkuId"]:
            assert r["SkuId"].startswith(f"{r['ProviderName']}/{r['x_Model']}/")
        key = (r["ProviderName"], r["x_Model"])
        billed[key] = billed.get(key, 0) + micros(r["EffectiveCost"])
    assert billed == {(p, m): expected_micros(p) for p, (m, _, _) in CALLS.items()}
