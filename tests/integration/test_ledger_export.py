"""Chargeback/showback and FOCUS exports, checked column by column against the
ledger entries each row names."""

from __future__ import annotations

import csv
import pathlib
from decimal import Decimal
from typing import Any

import pytest

from keel_pdp.cli import main
from keel_pdp.ledger.export import CHARGEBACK_FIGURES, FOCUS_COLUMNS, parse_id_ranges
from keel_pdp.ledger.periods import bounds_ms, day_start_ms, iso_utc, permit_issued_ms
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import LedgerStore
from tests.integration.conftest import drain
from tests.integration.test_ledger_periods import (
    CURRENT,
    NOW,
    PREVIOUS,
    USAGE,
    scenario,
)

__all__ = ["scenario"]

MAPPING = """
default: {cost_center: unallocated, business_unit: unallocated}
tenants:
  acme: {cost_center: CC-100, business_unit: Retail}
workloads:
  acme/search: {cost_center: CC-110, business_unit: Retail}
"""


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def entries(store: LedgerStore, ids: list[int]) -> list[dict[str, Any]]:
    marks = ", ".join("?" for _ in ids)
    cols = ("id", "kind", "period", "belongs_to", "permit_id", "held_micros", "actual_micros",
            "amount_micros", "input_tokens", "cached_input_tokens", "output_tokens")
    rows = store.query(f"SELECT {', '.join(cols)} FROM ledger_entries "
                       f"WHERE id IN ({marks}) ORDER BY id", ids)
    return [dict(zip(cols, r, strict=True)) for r in rows]


def micros(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


@pytest.fixture
def mapping(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "mapping.yaml"
    path.write_text(MAPPING)
    return str(path)


async def test_chargeback_csv_rows_trace_to_entries_and_sum_to_the_books(
        scenario: Any, mapping: str, tmp_path: pathlib.Path) -> None:
    store: LedgerStore = scenario["store"]
    out = tmp_path / "chargeback.csv"
    assert main(["export", "--store", store.url, "--period", PREVIOUS, "--format", "csv",
                 "--out", str(out), "--mapping", mapping]) == 0
    header, rows = read_csv(out)
    assert header == ["billing_period", "charge_period", "charge_type", "cost_center",
                      "business_unit", "tenant", "workload", "provider", "model",
                      *CHARGEBACK_FIGURES]
    by_key = {(r["tenant"], r["workload"], r["model"]): r for r in rows}
    assert set(by_key) == {("acme", "chat", "gpt-4o-mini"), ("acme", "search", "gpt-4.1"),
                           ("globex", "chat", "gpt-4o-mini"),
                           ("globex", "chat", "claude-sonnet-4-5"),
                           ("acme", "restricted", "gpt-4.1")}
    a, b, a_set = scenario["a"], scenario["b"], scenario["a_set"]
    chat = by_key[("acme", "chat", "gpt-4o-mini")]
    assert (chat["cost_center"], chat["business_unit"]) == ("CC-100", "Retail")
    assert by_key[("acme", "search", "gpt-4.1")]["cost_center"] == "CC-110"
    assert by_key[("globex", "chat", "gpt-4o-mini")]["cost_center"] == "unallocated"
    assert (chat["billing_period"], chat["charge_period"], chat["charge_type"]) == (
        PREVIOUS, PREVIOUS, "usage")
    assert (chat["provider"], chat["currency"]) == ("openai", "USD")
    assert (chat["permits"], chat["denials"], chat["settlements"]) == ("1", "0", "1")
    assert (chat["input_tokens"], chat["cached_input_tokens"], chat["cache_write_tokens"],
            chat["output_tokens"], chat["reasoning_tokens"]) == ("1000", "200", "0", "300", "0")
    assert micros(chat["estimated_usd"]) == a.estimated_cost_micros
    assert micros(chat["actual_usd"]) == a_set.actual_cost_micros
    assert micros(chat["accrual_usd"]) == 0
    assert micros(chat["charge_usd"]) == a_set.actual_cost_micros
    search = by_key[("acme", "search", "gpt-4.1")]
    assert micros(search["accrual_usd"]) == micros(search["charge_usd"]) == \
        b.estimated_cost_micros
    denied = by_key[("acme", "restricted", "gpt-4.1")]
    assert (denied["denials"], denied["permits"], denied["charge_usd"]) == ("1", "0", "0.000000")
    voided = by_key[("globex", "chat", "gpt-4o-mini")]
    assert micros(voided["estimated_usd"]) == scenario["c"].estimated_cost_micros
    assert micros(voided["charge_usd"]) == 0  # permit accrued, void reversed it
    seen: list[int] = []
    for r in rows:
        ids = parse_id_ranges(r["entry_ids"])
        assert len(ids) == int(r["entry_count"])
        es = entries(store, ids)
        assert len(es) == len(ids)
        assert all(e["period"] == PREVIOUS for e in es)
        assert sum(e["amount_micros"] for e in es) == micros(r["charge_usd"])
        assert sum(e["actual_micros"] for e in es if e["kind"] == "settlement") == \
            micros(r["actual_usd"])
        seen += ids
    booked = store.query("SELECT id FROM ledger_entries WHERE period = ? "
                         "AND kind <> 'exception_grant'", (PREVIOUS,))
    assert sorted(seen) == sorted(int(r[0]) for r in booked)  # every entry, exactly once
    total = sum(micros(r["charge_usd"]) for r in rows)
    assert total == build_report(store, PREVIOUS, ["tenant"]).total.booked_micros


async def test_focus_export_columns_for_usage_and_late_corrections(
        scenario: Any, mapping: str, tmp_path: pathlib.Path) -> None:
    store: LedgerStore = scenario["store"]
    out = tmp_path / "focus-prev.csv"
    assert main(["export", "--store", store.url, "--period", PREVIOUS, "--format", "focus",
                 "--out", str(out), "--mapping", mapping]) == 0
    header, rows = read_csv(out)
    assert header == list(FOCUS_COLUMNS)
    a, a_set = scenario["a"], scenario["a_set"]
    day = day_start_ms(permit_issued_ms(a.permit_id) or 0)
    p_start, p_end = bounds_ms(PREVIOUS)
    # Only A was settled in the period: one row per token type it used.
    assert [r["x_TokenType"] for r in rows] == ["cached_input", "input", "output"]
    expect = {"input": ("800", "0.00000015", "0.00012", "0.000120"),
              "cached_input": ("200", "0.000000075", "0.000015", "0.000015"),
              "output": ("300", "0.0000006", "0.00018", "0.000180")}
    settlement_id = store.query(
        "SELECT id FROM ledger_entries WHERE permit_id = ? AND kind = 'settlement'",
        (a.permit_id,))[0][0]
    for r in rows:
        qty, unit, list_cost, billed = expect[r["x_TokenType"]]
        assert (r["ConsumedQuantity"], r["PricingQuantity"]) == (qty, qty)
        assert (r["ConsumedUnit"], r["PricingUnit"]) == ("Tokens", "Tokens")
        assert (r["ListUnitPrice"], r["ContractedUnitPrice"]) == (unit, unit)
        assert (r["ListCost"], r["ContractedCost"]) == (list_cost, list_cost)
        assert (r["BilledCost"], r["EffectiveCost"]) == (billed, billed)
        assert (r["ChargeCategory"], r["ChargeClass"], r["ChargeFrequency"]) == (
            "Usage", "", "Usage-Based")
        assert (r["ChargePeriodStart"], r["ChargePeriodEnd"]) == (
            iso_utc(day), iso_utc(day + 86_400_000))
        assert (r["BillingPeriodStart"], r["BillingPeriodEnd"]) == (
            iso_utc(p_start), iso_utc(p_end))
        assert r["BillingCurrency"] == "USD"
        assert (r["ProviderName"], r["PublisherName"], r["InvoiceIssuerName"]) == (
            "openai", "openai", "openai")
        assert (r["ServiceCategory"], r["ServiceSubcategory"]) == (
            "AI and Machine Learning", "Generative AI")
        assert r["SkuId"] == f"openai/gpt-4o-mini/{r['x_TokenType']}"
        assert r["SkuPriceId"] == f"p1:openai/gpt-4o-mini/{r['x_TokenType']}"
        assert (r["SubAccountId"], r["ResourceId"]) == ("acme", "acme/chat")
        assert (r["x_CostCenter"], r["x_BusinessUnit"], r["x_LedgerPeriod"]) == (
            "CC-100", "Retail", PREVIOUS)
        assert r["Tags"] == ('{"business_unit":"Retail","cost_center":"CC-100",'
                             '"tenant":"acme","workload":"chat"}')
        assert r["x_PermitCount"] == "1"
        assert parse_id_ranges(r["x_EntryIds"]) == [settlement_id]
        for empty in ("AvailabilityZone", "RegionId", "CommitmentDiscountId"):
            assert r[empty] == ""
    assert sum(micros(r["BilledCost"]) for r in rows) == a_set.actual_cost_micros

    # Late actuals for the closed period appear in the current period's export as
    # corrections whose charge period lies in the period they belong to.
    assert main(["period", "close", "--store", store.url, "--period", PREVIOUS]) == 0
    scenario["clock"].at = NOW
    engine = scenario["engine"]
    b, d = scenario["b"], scenario["d"]
    await engine.closeout(b.permit_id, USAGE, "SUCCEEDED", 777)
    d_set = await engine.closeout(d.permit_id, USAGE, "SUCCEEDED", None)
    drain(scenario["writer"])
    main(["period", "adjust", "--store", store.url, "--period", PREVIOUS, "--amount-usd",
          "-1.50", "--tenant", "globex", "--reason", "provider credit", "--key", "k1"])
    out = tmp_path / "focus-cur.csv"
    assert main(["export", "--store", store.url, "--period", CURRENT, "--format", "focus",
                 "--out", str(out), "--mapping", mapping]) == 0
    _, rows = read_csv(out)
    usage = [r for r in rows if r["ChargeCategory"] == "Usage"]
    adjust = [r for r in rows if r["ChargeCategory"] == "Adjustment"]
    assert all(r["ChargeClass"] == "Correction" for r in rows)
    assert all(r["x_LedgerPeriod"] == PREVIOUS for r in rows)
    assert all(r["BillingPeriodStart"] == iso_utc(bounds_ms(CURRENT)[0]) for r in rows)
    assert all(r["ChargePeriodStart"] >= iso_utc(p_start) and r["ChargePeriodEnd"] <=
               iso_utc(p_end) for r in rows)
    b_rows = {r["x_TokenType"]: r["BilledCost"] for r in usage if r["x_Model"] == "gpt-4.1"}
    # 777 micro-USD reported by the provider, split by Keel's priced cost (16:1:24).
    assert b_rows == {"input": "0.000303", "cached_input": "0.000019", "output": "0.000455"}
    d_total = sum(micros(r["BilledCost"]) for r in usage if r["x_Model"] == "claude-sonnet-4-5")
    assert d_total == d_set.actual_cost_micros == 6960
    assert len(adjust) == 1
    assert (adjust[0]["BilledCost"], adjust[0]["ChargeFrequency"], adjust[0]["SubAccountId"]) \
        == ("-1.500000", "One-Time", "globex")
    assert adjust[0]["ChargePeriodStart"] == iso_utc(p_start)
    assert "provider credit" in adjust[0]["ChargeDescription"]

    # The chargeback file of the current period shows the same late items, named.
    cb = tmp_path / "cb-cur.csv"
    assert main(["export", "--store", store.url, "--period", CURRENT, "--format", "csv",
                 "--out", str(cb)]) == 0
    _, cb_rows = read_csv(cb)
    assert {(r["charge_period"], r["charge_type"]) for r in cb_rows} == {
        (PREVIOUS, "late"), (PREVIOUS, "manual")}
    late = sum(micros(r["charge_usd"]) for r in cb_rows if r["charge_type"] == "late")
    # Both were still held when they settled: each books actual minus its accrual.
    assert late == (777 - b.estimated_cost_micros) + (6960 - d.estimated_cost_micros)
