"""Service tiers from the ledger store (``--store``): the engine settles calls at
the tier the provider reported (priority, default, flex, a priority call the
provider downgraded, one that reported nothing), the ledger keeps the tier on the
settlement, and reconciliation re-rates each request at its own tier's line of a
provider export that bills standard, priority and flex traffic of one project and
model separately. Runs over SQLite and a real PostgreSQL server (the ledger's
store fixture). Also: an internal file with tiers imported into the store
(``ledger import``) reconciles exactly as the file does."""

from __future__ import annotations

import csv
import json
import pathlib
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import fakeredis
import pytest

from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.pricing import TokenUsage
from keel_pdp.reconcile.internal import from_ledger
from keel_pdp.reconcile.period import Period
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.integration.conftest import STREAM
from tests.unit.test_reconcile_e2e import main

pytestmark = pytest.mark.integration

# USD per 1M tokens: the price table's and the provider's (the same card).
CARD = {"standard": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
        "priority": {"input": "4.25", "cached_input": "2.125", "output": "17.00"},
        "flex": {"input": "1.25", "cached_input": "0.625", "output": "5.00"}}
PRICES = {"openai": {"gpt-4o": {**CARD["standard"], "service_tiers": {
    "priority": CARD["priority"], "flex": CARD["flex"]}}}}
SNAPSHOT = "gpt-4o-2024-08-06"
# (tier asked for, tier the provider reported, tier it billed at)
CALLS = [("priority", "priority", "priority"), ("auto", "default", "standard"),
         ("", "default", "standard"), ("priority", "default", "standard"),
         ("priority", "", "priority"), ("flex", "flex", "flex"), ("default", "", "standard")]
# Asked "auto" and nothing reported: the ledger cannot know the tier (held and
# booked at the highest rate); the project runs at priority, which billed it.
UNKNOWN = ("auto", "", "priority")


async def _traffic(bundle: pathlib.Path, store: LedgerStore, unknown: bool
                   ) -> dict[str, tuple[str, TokenUsage]]:
    """Settle each call three times over; returns permit -> (tier billed, usage)."""
    client = fakeredis.FakeAsyncRedis()
    engine = make_engine(client, bundle)
    billed: dict[str, tuple[str, TokenUsage]] = {}
    calls = [*CALLS, UNKNOWN] if unknown else CALLS
    for i in range(3 * len(calls)):
        asked, reported, tier = calls[i % len(calls)]
        total_in = 9_000 + 1_337 * i
        res = await engine.authorize(AuthorizeInput(f"tier-{i}", "acme", "realtime", "gpt-4o",
                                                    "openai", total_in, 900,
                                                    service_tier=asked))
        assert res.decision is not DecisionKind.DENY
        usage = TokenUsage(input_tokens=total_in, cached_input_tokens=1_000 * (i % 4),
                           output_tokens=200 + 31 * i)
        await engine.closeout(res.permit_id, usage, "SUCCEEDED", None, service_tier=reported)
        billed[res.permit_id] = (tier, usage)
    raw: Any = await read_stream(client, STREAM)
    store.write_batch([parse_entry(eid.decode(), fields) for eid, fields in raw])
    return billed


def _usage_export(billed: dict[str, tuple[str, TokenUsage]], day: int,
                  path: pathlib.Path) -> None:
    """The Usage API page grouped by project, model, batch and service tier: each
    tier's tokens, over which its rate is read."""
    usage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tier, u in billed.values():
        row = usage["default" if tier == "standard" else tier]
        row["input_tokens"] += u.input_tokens
        row["input_cached_tokens"] += u.cached_input_tokens
        row["output_tokens"] += u.output_tokens
        row["num_model_requests"] += 1
    results = [{"object": "organization.usage.completions.result", **row,
                "project_id": "proj_rt", "model": SNAPSHOT, "batch": False,
                "service_tier": tier} for tier, row in sorted(usage.items())]
    page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": day, "end_time": day + 86_400,
         "results": results}]}
    path.write_text(json.dumps(page))


def _costs_export(billed: dict[str, tuple[str, TokenUsage]], day: int,
                  path: pathlib.Path) -> None:
    """What the provider bills: each tier on its own line items, exactly."""
    million = Decimal(1_000_000)
    amounts: dict[str, Decimal] = defaultdict(Decimal)
    for tier, u in billed.values():
        rate = {k: Decimal(v) / million for k, v in CARD[tier].items()}
        prefix = "" if tier == "standard" else f"{tier} | "
        amounts[f"{prefix}{SNAPSHOT}, input"] += (
            u.input_tokens - u.cached_input_tokens) * rate["input"]
        amounts[f"{prefix}{SNAPSHOT}, cached input"] += u.cached_input_tokens * rate[
            "cached_input"]
        amounts[f"{prefix}{SNAPSHOT}, output"] += u.output_tokens * rate["output"]
    results = [{"object": "organization.costs.result",
                "amount": {"value": f"@@{usd:f}@@", "currency": "usd"}, "line_item": item,
                "project_id": "proj_rt"} for item, usd in sorted(amounts.items()) if usd]
    page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": day, "end_time": day + 86_400,
         "results": results}]}
    path.write_text(json.dumps(page).replace('"@@', "").replace('@@"', ""))


MAPPING = ("finance_owner: Priya Natarajan\nai_program_lead: Sam Okafor\naccounts:\n"
           "  - {provider: openai, account: proj_rt, tenant: acme, workload: realtime}\n"
           "workloads:\n"
           "  - {tenant: acme, workload: realtime, engineering_owner: Aiko Sato}\n")


async def _reconcile(store_url: str, tmp_path: pathlib.Path, unknown: bool
                     ) -> tuple[int, pathlib.Path, dict[str, tuple[str, TokenUsage]]]:
    bundle = write_bundle(tmp_path / "bundle", [budget("org", "100000.00", window="monthly")],
                          prices=PRICES)
    store = LedgerStore(store_url)
    store.migrate()
    try:
        billed = await _traffic(bundle, store, unknown)
        ts = [int(t) for (t,) in store.query(
            "SELECT ts_ms FROM ledger_entries WHERE kind = 'settlement'")]
    finally:
        store.close()
    days = {t // 86_400_000 for t in ts}
    if len(days) > 1:
        pytest.skip("the traffic crossed midnight UTC")
    at = datetime.fromtimestamp(ts[0] / 1000, tz=UTC)
    period = Period(at.year, at.month)
    costs, usage = tmp_path / "costs.json", tmp_path / "usage.json"
    day = days.pop() * 86_400
    _costs_export(billed, day, costs)
    _usage_export(billed, day, usage)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(MAPPING)
    out = tmp_path / "out"
    rc = main(["reconcile", "--store", store_url, "--period", str(period), "--provider",
               "openai", "--export", str(costs), "--export", str(usage), "--mapping",
               str(mapping), "--out", str(out)])
    return rc, out / str(period) / "openai", billed


async def test_tiered_settlements_reconcile_tier_by_tier(store_url: str,
                                                         tmp_path: pathlib.Path) -> None:
    rc, folder, billed = await _reconcile(store_url, tmp_path, unknown=False)
    assert rc == 0
    memo = json.loads((folder / "memo.json").read_text())
    at = datetime.now(UTC)
    lines = {ln.permit_id: ln for ln in from_ledger(store_url, Period(at.year, at.month),
                                                    86_400_000)}
    assert {pid: lines[pid].service_tier for pid in billed} == {
        pid: tier for pid, (tier, _) in billed.items()}
    cats = {c["category"]: c for c in memo["categories"]}
    for name in ("unexplained", "cache_read_rate", "clock_skew", "tier_breakpoint",
                 "failed_request_billing"):
        assert cats[name]["net_micros"] == 0, name
        assert cats[name]["request_ids"] == [], name
    assert abs(cats["rounding"]["net_micros"]) <= len(billed)
    with (folder / "line_items.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["service_tier"] for r in rows} == {"standard", "priority", "flex"}
    for row in rows:  # each tier's line carries its own requests only
        assert int(row["provider_micros"]) - int(row["internal_micros"]) == int(
            row["rounding_micros"]), row


async def test_a_settlement_without_a_known_tier_is_not_blended(
        store_url: str, tmp_path: pathlib.Path) -> None:
    """The call that let the provider choose and heard nothing back: attributed at
    the standard tier and shown as unexplained (it was billed on the priority lines),
    never re-rated at a rate blended from both."""
    rc, folder, billed = await _reconcile(store_url, tmp_path, unknown=True)
    assert rc in (0, 1)
    memo = json.loads((folder / "memo.json").read_text())
    unknown = sorted(_unknown_permits(store_url))
    assert len(unknown) == 3 and set(unknown) <= set(billed)
    cats = {c["category"]: c for c in memo["categories"]}
    assert sorted(cats["unexplained"]["request_ids"]) == unknown
    assert cats["cache_read_rate"]["request_ids"] == []
    notes = " ".join(i["note"] for i in cats["unexplained"]["line_items"])
    assert "service tier not recorded" in notes
    # Booked at the highest rate (priority's) and billed at priority: the request's
    # difference at the standard card and the priority line's excess cancel out.
    assert abs(cats["unexplained"]["net_micros"]) <= 3 * 3
    assert cats["unexplained"]["gross_micros"] > 10_000


def _unknown_permits(store_url: str) -> set[str]:
    store = LedgerStore(store_url)
    try:
        return {str(pid) for pid, detail in store.query(
            "SELECT permit_id, detail FROM ledger_entries WHERE kind = 'settlement'")
            if json.loads(detail).get("priced_tier") == "highest"}
    finally:
        store.close()


def test_an_imported_file_with_tiers_reconciles_through_the_store_as_the_file_does(
        store_url: str, tmp_path: pathlib.Path) -> None:
    from keel_pdp.cli import main as cli_main
    from tests.reconcile_probe.month import CATEGORIES, write_month
    from tests.reconcile_probe.test_probe_month import _run

    src = tmp_path / "in"
    answer = write_month(src, "anthropic", mixed=True)
    assert cli_main(["ledger", "import", "--store", store_url,
                     str(src / answer["internal"])]) == 0
    rc_file, _ = _run(src, answer, tmp_path / "file")
    assert rc_file == 0
    args = ["reconcile", "--store", store_url, "--period", answer["period"], "--provider",
            "anthropic", "--mapping", str(src / answer["mapping"]), "--column-map",
            str(src / answer["column_map"]), "--out", str(tmp_path / "store")]
    for name in answer["exports"]:
        args += ["--export", str(src / name)]
    assert main(args) == 0
    memos = [json.loads((tmp_path / d / answer["period"] / "anthropic" / "memo.json")
                        .read_text()) for d in ("file", "store")]
    by_file, by_store = ({c["category"]: (c["net_micros"], sorted(c["request_ids"]))
                          for c in m["categories"]} for m in memos)
    assert by_store == by_file
    assert {c: by_store[c][0] if c in by_store else 0 for c in CATEGORIES} == \
        answer["expected"]["net_micros"]
