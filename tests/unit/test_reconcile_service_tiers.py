"""Service tiers in the monthly reconciliation: each provider line keeps the tier
it was billed at, each internal request the tier it ran at, and a request is
re-rated at its own tier's line, never at a rate blended from several tiers.

Covered here: how every adapter reads the tier (and refuses a value that is no
tier name, naming file, place and field), the ``service_tier`` field of the
internal export (written back, refused when hostile), a request whose tier is
not recorded on an account and model billed at several tiers (shown, not
blended), a tier on one side only, an export that does not tell tiers apart,
and the price split at the request's tier. The ledger path is in
``tests/integration/test_reconcile_service_tiers.py``.
"""

from __future__ import annotations

import csv
import json
import pathlib
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from keel_pdp.reconcile.adapters import anthropic, generic, openai
from keel_pdp.reconcile.adapters.common import DuplicateGuard
from keel_pdp.reconcile.adapters.imports import import_exports
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.internal import FileInternalSource, InternalUsageLine, write_export
from keel_pdp.reconcile.model import ProviderLine, service_tier_name
from keel_pdp.reconcile.period import Period
from keel_pdp.reconcile.prices import load_prices
from tests.reconcile_probe.month import CATEGORIES, write_month
from tests.reconcile_probe.test_probe_month import _memo, _run

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "reconcile"
JAN = Period(2026, 1)
JAN5 = 1767571200  # 2026-01-05T00:00:00Z


def _tiers(lines: list[ProviderLine]) -> list[tuple[str, str, str]]:
    return [(ln.model, ln.token_type, ln.service_tier) for ln in lines]


# --------------------------------------------------------------------- the names


@pytest.mark.parametrize(("value", "name"), [
    (None, ""), ("", ""), ("  ", ""), ("auto", ""), ("highest", ""), ("unreadable", ""),
    ("default", "standard"), ("Standard", "standard"), ("DEFAULT", "standard"),
    ("priority", "priority"), ("Batch", "batch"), ("flex", "flex"), ("scale", "scale"),
    ("priority_on_demand", "priority_on_demand")])
def test_tier_names_have_one_spelling(value: Any, name: str) -> None:
    assert service_tier_name(value) == name


@pytest.mark.parametrize(("value", "why"), [
    (5, "must be a string, not int"), (True, "must be a string, not bool"),
    (["priority"], "must be a string, not list"), ({"tier": "batch"}, "not dict"),
    ("p" * 65, "longer than 64 characters"), ("pri ority", "may only hold letters"),
    ("batch;drop", "may only hold letters")])
def test_a_value_that_is_no_tier_name_says_why(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match="service tier") as exc:
        service_tier_name(value)
    assert why in str(exc.value)
    assert len(str(exc.value)) < 160  # an absurd value is not echoed whole


# ------------------------------------------------------------------ the adapters


def _page(results: list[dict[str, Any]]) -> str:
    return json.dumps({"object": "page", "has_more": False, "data": [
        {"object": "bucket", "start_time": JAN5, "end_time": JAN5 + 86400,
         "results": results}]})


def _usage(**kw: Any) -> dict[str, Any]:
    return {"object": "organization.usage.completions.result", "input_tokens": 1000,
            "input_cached_tokens": 0, "output_tokens": 10, "num_model_requests": 1,
            "project_id": "p", "model": "gpt-4o-mini-2024-07-18", **kw}


def _cost(item: str) -> dict[str, Any]:
    return {"object": "organization.costs.result",
            "amount": {"value": 0.5, "currency": "usd"}, "line_item": item,
            "project_id": "p"}


def test_openai_usage_results_keep_batch_and_service_tier() -> None:
    text = _page([_usage(batch=False, service_tier="default", api_key_id="k1"),
                  _usage(batch=True, service_tier="default", api_key_id="k2"),
                  _usage(batch=None, service_tier="priority", api_key_id="k3"),
                  _usage(service_tier="flex", api_key_id="k4"),
                  _usage(api_key_id="k5")])  # not grouped by either: not said
    lines = openai.parse(pathlib.Path("usage.json"), text, "usage-json", JAN, {},
                         DuplicateGuard())
    by_key = {ln.api_key: ln.service_tier for ln in lines}
    assert by_key == {"k1": "standard", "k2": "batch", "k3": "priority", "k4": "flex",
                      "k5": ""}


def test_openai_cost_line_items_name_their_tier() -> None:
    text = _page([_cost("gpt-4o-2024-08-06, input"),
                  _cost("priority | gpt-4o-2024-08-06, input"),
                  _cost("Flex | o4-mini-2025-04-16, cached input"),
                  _cost("batch | gpt-4o-mini-2024-07-18, output"),
                  _cost("gpt-4o-mini-2024-07-18, input, batch"),
                  _cost("priority | gpt-5-2025-08-07, output, long context"),
                  _cost("web search tool calls")])
    lines = openai.parse(pathlib.Path("costs.json"), text, "costs-json", JAN, {},
                         DuplicateGuard())
    assert _tiers(lines) == [
        ("gpt-4o", "input", "standard"), ("gpt-4o", "input", "priority"),
        ("o4-mini", "cached_input", "flex"), ("gpt-4o-mini", "output", "batch"),
        ("gpt-4o-mini", "input", "batch"), ("gpt-5", "output", "priority"),
        ("", "web_search_tool_calls", "")]
    assert lines[5].tier == "long_context"


def test_openai_dashboard_csv_reads_the_batch_and_service_tier_columns() -> None:
    text = (FIXTURES / "openai" / "usage_dashboard.csv").read_text()
    lines = openai.parse(pathlib.Path("u.csv"), text, "usage-csv", JAN, {}, DuplicateGuard())
    assert {ln.service_tier for ln in lines} == {"standard"}
    text = text.replace("FALSE,default", "TRUE,default", 1)
    lines = openai.parse(pathlib.Path("u.csv"), text, "usage-csv", JAN, {}, DuplicateGuard())
    assert [ln.service_tier for ln in lines[:3]] == ["batch"] * 3
    assert {ln.service_tier for ln in lines[3:]} == {"standard"}


def test_anthropic_reports_and_console_downloads_keep_their_tier() -> None:
    lines = import_exports("anthropic", [FIXTURES / "anthropic" / n for n in (
        "usage_report.json", "cost_report.json", "console_usage.csv", "console_cost.csv")],
        JAN, {}, None).lines
    assert {ln.service_tier for ln in lines if ln.model} == {"standard"}
    usage = json.loads((FIXTURES / "anthropic" / "usage_report.json").read_text())
    usage["data"][0]["results"][0]["service_tier"] = "batch"
    del usage["data"][0]["results"][1]["service_tier"]
    lines = anthropic.parse(pathlib.Path("u.json"), json.dumps(usage), "usage-json", JAN, {},
                            DuplicateGuard())
    first = [ln.service_tier for ln in lines if ln.where == "data[0].results[0]"]
    second = {ln.service_tier for ln in lines if ln.where == "data[0].results[1]"}
    assert set(first) == {"batch"} and second == {""}
    costs = json.loads((FIXTURES / "anthropic" / "cost_report.json").read_text())
    row = costs["data"][0]["results"][0]
    del row["service_tier"]
    row["description"] = "Claude Sonnet 4.5 Batch Usage - Input Tokens"
    lines = anthropic.parse(pathlib.Path("c.json"), json.dumps(costs), "cost-json", JAN, {},
                            DuplicateGuard())
    assert lines[0].service_tier == "batch"  # the description names the tier
    assert lines[1].service_tier == "standard"
    console = (FIXTURES / "anthropic" / "console_usage.csv").read_text().replace(
        "Support,standard", "Support,Message Batch", 1)
    lines = anthropic.parse(pathlib.Path("u.csv"), console, "usage-csv", JAN, {},
                            DuplicateGuard())
    assert lines[0].service_tier == "batch"


def test_a_generic_csv_names_tiers_through_its_column_map(tmp_path: pathlib.Path) -> None:
    cmap_text = (FIXTURES / "generic" / "usage_by_deployment.columns.yaml").read_text()
    cmap_text = cmap_text.replace("  currency: Currency\n", "  currency: Currency\n"
                                  "  service_tier: Processing\n") + \
        "service_tiers: {Global Batch: batch}\n"
    (tmp_path / "cmap.yaml").write_text(cmap_text)
    rows = (FIXTURES / "generic" / "usage_by_deployment.csv").read_text().splitlines()
    body = [rows[0] + ",Processing", rows[1] + ",Global Batch",
            *[r + ",Standard" for r in rows[2:]]]
    (tmp_path / "usage.csv").write_text("\n".join(body) + "\n")
    cmap = generic.load_column_map(tmp_path / "cmap.yaml")
    lines = import_exports("csv", [tmp_path / "usage.csv"], JAN, {}, cmap).lines
    assert {ln.service_tier for ln in lines if ln.where == "row 2"} == {"batch"}
    assert {ln.service_tier for ln in lines if ln.where != "row 2"} == {"standard"}


@pytest.mark.parametrize(("name", "text", "place"), [
    ("usage.json", _page([_usage(service_tier=7)]),
     "usage.json: data[0].results[0].service_tier: service tier 7 must be a string"),
    ("usage.json", _page([_usage(batch="maybe")]),
     "usage.json: data[0].results[0].batch: batch 'maybe' is not true or false"),
    ("usage.json", _page([_usage(service_tier="x" * 5000)]),
     "usage.json: data[0].results[0].service_tier: service tier 'xxxx"),
    ("costs.json", _page([_cost("p" * 300 + " | gpt-4o-2024-08-06, input")]),
     "costs.json: data[0].results[0].line_item: line item: service tier"),
])
def test_openai_tier_values_that_name_no_tier_are_refused(
        tmp_path: pathlib.Path, name: str, text: str, place: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        import_exports("openai", [path], JAN, {}, None)
    assert str(exc.value).startswith(f"{path.parent}/{place}"), str(exc.value)


def test_anthropic_tier_values_that_name_no_tier_are_refused(tmp_path: pathlib.Path) -> None:
    costs = json.loads((FIXTURES / "anthropic" / "cost_report.json").read_text())
    costs["data"][1]["results"][2]["service_tier"] = {"tier": "batch"}
    path = tmp_path / "cost_report.json"
    path.write_text(json.dumps(costs))
    with pytest.raises(InputError) as exc:
        import_exports("anthropic", [path], JAN, {}, None)
    assert str(exc.value).startswith(f"{path}: data[1].results[2].service_tier: service "
                                     "tier {'tier': 'batch'} must be a string, not dict")


# ------------------------------------------------------------ the internal side


def _rows(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_internal_export_carries_the_tier_and_writes_it_back(
        tmp_path: pathlib.Path) -> None:
    base = {"ts_ms": JAN5 * 1000, "tenant": "acme", "workload": "w", "provider": "openai",
            "model": "gpt-4o", "input_tokens": 100, "output_tokens": 10, "cost_micros": 5}
    spellings = ["default", "Standard", "priority", "BATCH", "", "auto", None]
    rows = [{**base, "permit_id": f"p{i}", **({} if s is None else {"service_tier": s})}
            for i, s in enumerate(spellings)]
    src = tmp_path / "internal.jsonl"
    _write_rows(src, rows)
    lines = FileInternalSource(src).all_lines()
    assert [ln.service_tier for ln in lines] == ["standard", "standard", "priority", "batch",
                                                  "", "", ""]
    back = tmp_path / "internal_usage.csv"
    write_export(lines, back)
    with back.open() as fh:
        assert [r["service_tier"] for r in csv.DictReader(fh)] == [
            "standard", "standard", "priority", "batch", "", "", ""]
    assert FileInternalSource(back).all_lines() == lines


@pytest.mark.parametrize("value", [5, True, ["priority"], {"tier": "priority"}, "x" * 1000,
                                   "pri ority"])
def test_a_hostile_internal_tier_stops_the_run_naming_file_line_and_field(
        tmp_path: pathlib.Path, value: Any) -> None:
    src = tmp_path / "in"
    answer = write_month(src, "openai", mixed=True)
    path = src / answer["internal"]
    rows = _rows(path)
    rows[41]["service_tier"] = value
    _write_rows(path, rows)
    rc, text = _run(src, answer, tmp_path / "out")
    assert rc == 2, text
    assert f"{path}: line 42: column 'service_tier': service tier" in text
    assert "nothing was written" in text
    assert len(text) < 1000
    assert not (tmp_path / "out").exists()


def test_a_hostile_tier_in_an_internal_csv_names_the_row(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in"
    answer = write_month(src, "anthropic", mixed=True)
    lines = FileInternalSource(src / answer["internal"]).all_lines()
    path = src / "internal_usage.csv"
    write_export(lines, path)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    rows[9]["service_tier"] = "standard" * 40
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rc, text = _run(src, {**answer, "internal": path.name}, tmp_path / "out")
    assert rc == 2, text
    assert (f"{path}: row 11: column 'service_tier': service tier 'standardstandard"
            in text)
    assert "is longer than 64 characters" in text


# ------------------------------------------------------------ matching tiers


def _nets(memo: dict[str, Any]) -> dict[str, int]:
    got = {c["category"]: c["net_micros"] for c in memo["categories"]}
    return {c: got.get(c, 0) for c in CATEGORIES}


def _category(memo: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in memo["categories"] if c["category"] == name)
    return found


def _identity(memo: dict[str, Any]) -> None:
    for account, row in memo["by_account"].items():
        cats = sum(row.get(c, 0) for c in CATEGORIES)
        assert cats == row["provider_micros"] - row.get("internal_micros", 0), account


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_internal_csv_with_tiers_reconciles_as_the_json_lines_do(
        provider: str, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in"
    answer = write_month(src, provider, mixed=True)
    lines = FileInternalSource(src / answer["internal"]).all_lines()
    assert {ln.service_tier for ln in lines} == (
        {"standard", "priority", "flex", "batch"} if provider == "openai"
        else {"standard", "batch"})
    write_export(lines, src / "internal_usage.csv")
    rc, text = _run(src, {**answer, "internal": "internal_usage.csv"}, tmp_path / "out")
    assert rc == 0, text
    memo = _memo(tmp_path / "out", answer)
    assert _nets(memo) == answer["expected"]["net_micros"]
    assert _category(memo, "unexplained")["request_ids"] == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_spellings_of_the_standard_tier_and_auto_reconcile_alike(
        provider: str, tmp_path: pathlib.Path) -> None:
    """``default`` and ``standard`` are one tier; ``auto`` (and no tier at all) is
    a tier not recorded, which takes the one tier its account and model were
    billed at."""
    src = tmp_path / "in"
    answer = write_month(src, provider)
    path = src / answer["internal"]
    rows = _rows(path)
    words = {"default": ["default", "Standard", "auto", ""],
             "standard": ["standard", "DEFAULT", "auto", ""]}
    for i, row in enumerate(rows):
        row.pop("service_tier", None)
        if i % 5 == 4:
            continue
        service = _service(provider, row)
        row["service_tier"] = words[service][i % 4] if service in words else service
    _write_rows(path, rows)
    rc, text = _run(src, answer, tmp_path / "out")
    assert rc == 0, text
    assert _nets(_memo(tmp_path / "out", answer)) == answer["expected"]["net_micros"]


def _service(provider: str, row: dict[str, Any]) -> str:
    from tests.reconcile_probe.month import _workloads

    return next(w.service for w in _workloads(provider)
                if (w.tenant, w.workload) == (row["tenant"], row["workload"]))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_requests_without_a_tier_on_an_account_billed_at_two_are_shown_not_blended(
        provider: str, tmp_path: pathlib.Path) -> None:
    """The mixed month with the tiers left out of the internal export: the requests
    of the account and model billed at two tiers are attributed at the standard
    tier and their differences are unexplained, each naming the cause; nothing of
    theirs lands in cache_read_rate, and the totals and the identity hold."""
    src = tmp_path / "in"
    answer = write_month(src, provider, mixed=True)
    path = src / answer["internal"]
    rows = _rows(path)
    for row in rows:
        del row["service_tier"]
    _write_rows(path, rows)
    rc, text = _run(src, answer, tmp_path / "out")
    assert rc == 1, text  # posting is blocked until the tiers are recorded
    memo = _memo(tmp_path / "out", answer)
    assert memo["totals"]["invoice_micros"] == answer["expected"]["invoice_micros"]
    assert memo["totals"]["internal_micros"] == answer["expected"]["internal_micros"]
    _identity(memo)
    account, model = {"openai": ("proj_rt", "gpt-4o"),
                      "anthropic": ("wrkspc_01SupportQvzr7rXLA5AG", "claude-sonnet-4-5")}[
        provider]
    both = {r["permit_id"] for r in rows if (r["account"], r["model"]) == (account, model)}
    unexplained = _category(memo, "unexplained")
    assert unexplained["request_ids"]
    assert set(unexplained["request_ids"]) <= both
    assert not set(_category(memo, "cache_read_rate")["request_ids"]) & both
    notes = " ".join(i["note"] for i in unexplained["line_items"])
    assert "service tier not recorded: attributed at the standard tier" in notes
    assert "record each request's service_tier" in notes


@pytest.mark.parametrize(("tier", "shown"), [("priority", "priority"),
                                             ("Turbo-2", "turbo-2")])
def test_a_tier_the_provider_did_not_bill_is_unexplained_with_its_name(
        tmp_path: pathlib.Path, tier: str, shown: str) -> None:
    """The gateway records one workload at a tier the provider billed nothing at on
    its project and model (a known tier, or a name no provider uses: its own tier
    all the same); the provider's standard lines carry its usage. Both sides show
    as unexplained, naming the tiers; the other workload of the project is
    untouched."""
    src = tmp_path / "in"
    answer = write_month(src, "openai")
    path = src / answer["internal"]
    rows = _rows(path)
    moved = set()
    for row in rows:
        if (row["tenant"], row["workload"]) == ("acme", "agent-assist"):
            row["service_tier"] = tier
            moved.add(row["permit_id"])
    _write_rows(path, rows)
    rc, text = _run(src, answer, tmp_path / "out")
    assert rc == 1, text
    memo = _memo(tmp_path / "out", answer)
    assert memo["totals"]["invoice_micros"] == answer["expected"]["invoice_micros"]
    _identity(memo)
    unexplained = _category(memo, "unexplained")
    assert set(unexplained["request_ids"]) == moved
    notes: dict[str, str] = {}
    for item in unexplained["line_items"]:
        if item["account"] != "proj_support":
            continue  # the month's web search calls, billed without a request
        notes[item["service_tier"]] = notes.get(item["service_tier"], "") + item["note"]
    assert set(notes) == {shown, "standard"}
    assert (f"no provider line at the {shown} service tier for this account and model: "
            "the provider billed it at standard") in notes[shown]
    # the standard lines carry the moved workload's tokens beyond their requests
    assert "billable tokens" in notes["standard"]
    # The cache-rate requests of the project's other workload are still found.
    assert sorted(_category(memo, "cache_read_rate")["request_ids"]) == \
        answer["expected"]["request_ids"]["cache_read_rate"]


def _tiny_month(root: pathlib.Path, tier_column: str | None) -> list[str]:
    """An Azure-style CSV export of a Batch deployment, with or without a tier column,
    and the gateway's export recording its requests at the batch tier."""
    root.mkdir(parents=True)
    rates = {"input": Decimal("0.075"), "cached_input": Decimal("0.0375"),
             "output": Decimal("0.30")}
    rows, internal = [], []
    for day in (5, 6):
        tokens = {"input": 0, "cached_input": 0, "output": 0}
        for i in range(3):
            t = {"input": 40_000 + 1_000 * i, "cached_input": 8_000 * i,
                 "output": 2_000 + 100 * i}
            cost = {k: int(v * rates[k]) for k, v in t.items()}
            internal.append({
                "ts": f"2026-01-{day:02d}T1{i}:00:00Z", "tenant": "initech",
                "workload": "nightly", "provider": "azure-openai", "model": "gpt-4o-mini",
                "input_tokens": t["input"] + t["cached_input"],
                "cached_input_tokens": t["cached_input"], "output_tokens": t["output"],
                "cost_micros": sum(cost.values()), "input_cost_micros": cost["input"],
                "cached_input_cost_micros": cost["cached_input"],
                "cache_write_cost_micros": 0, "output_cost_micros": cost["output"],
                "permit_id": f"b-{day}-{i}", "service_tier": "batch"})
            for k in tokens:
                tokens[k] += t[k]
        usd = {k: v * rates[k] / 1_000_000 for k, v in tokens.items()}
        row = [f"2026-01-{day:02d}", "batch-eastus", "gpt-4o-mini", tokens["input"],
               tokens["cached_input"], tokens["output"], usd["input"], usd["cached_input"],
               usd["output"], "USD"]
        rows.append(",".join(str(x) for x in row) + (f",{tier_column}" if tier_column else ""))
    head = ("Usage Date,Deployment,Model,Input Tokens,Cached Input Tokens,Output Tokens,"
            "Input Cost,Cached Input Cost,Output Cost,Currency")
    (root / "usage.csv").write_text("\n".join(
        [head + (",Tier" if tier_column else ""), *rows]) + "\n")
    cmap = (FIXTURES / "generic" / "usage_by_deployment.columns.yaml").read_text()
    if tier_column:
        cmap = cmap.replace("  currency: Currency\n", "  currency: Currency\n"
                            "  service_tier: Tier\n")
    (root / "cmap.yaml").write_text(cmap)
    _write_rows(root / "internal.jsonl", internal)
    (root / "mapping.yaml").write_text(
        "finance_owner: Priya Natarajan\nai_program_lead: Sam Okafor\naccounts:\n"
        "  - {provider: azure-openai, account: batch-eastus, tenant: initech, "
        "workload: nightly}\n"
        "workloads:\n  - {tenant: initech, workload: nightly, engineering_owner: Bill L}\n")
    return ["reconcile", "--internal", str(root / "internal.jsonl"), "--period", "2026-01",
            "--provider", "csv", "--column-map", str(root / "cmap.yaml"), "--export",
            str(root / "usage.csv"), "--mapping", str(root / "mapping.yaml")]


def _cli(args: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from keel_pdp.cli import main

    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(args)
    return rc, err.getvalue() + std.getvalue()


def test_an_export_that_does_not_tell_tiers_takes_the_one_tier_the_gateway_recorded(
        tmp_path: pathlib.Path) -> None:
    args = _tiny_month(tmp_path / "in", None)
    rc, text = _cli([*args, "--out", str(tmp_path / "out")])
    assert rc == 0, text
    folder = tmp_path / "out" / "2026-01" / "azure-openai"
    memo = json.loads((folder / "memo.json").read_text())
    assert memo["totals"]["gap_micros"] == 0
    assert {c["category"] for c in memo["categories"] if c["net_micros"]} == set()
    with (folder / "line_items.csv").open() as fh:
        assert {r["service_tier"] for r in csv.DictReader(fh)} == {"batch"}
    with (folder / "provider_export.csv").open() as fh:  # as the export said: nothing
        assert {r["service_tier"] for r in csv.DictReader(fh)} == {""}


def test_an_export_that_bills_another_tier_than_the_gateway_recorded_shows_it(
        tmp_path: pathlib.Path) -> None:
    """The export says Standard, the gateway says batch: no blending, no adoption;
    the requests have no line at their tier and the lines no requests at theirs."""
    args = _tiny_month(tmp_path / "in", "Standard")
    rc, text = _cli([*args, "--out", str(tmp_path / "out")])
    assert rc == 1, text
    memo = json.loads((tmp_path / "out" / "2026-01" / "azure-openai" / "memo.json")
                      .read_text())
    unexplained = _category(memo, "unexplained")
    assert unexplained["net_micros"] == 0 and unexplained["gross_micros"] > 0
    assert len(unexplained["request_ids"]) == 6
    notes = " ".join(i["note"] for i in unexplained["line_items"])
    assert "no provider line at the batch service tier" in notes
    assert ("billed by the provider at the standard service tier; the internal usage of "
            "this account and model is at batch") in notes
    _identity(memo)


# ------------------------------------------------------------ the price split


def test_a_total_only_line_is_split_at_its_tier_rates(tmp_path: pathlib.Path) -> None:
    (tmp_path / "prices.yaml").write_text(
        "apiVersion: keel.pdp/v1\nkind: PriceTable\nrevision: t1\nproviders:\n"
        "  openai:\n    gpt-5:\n      input: \"1.00\"\n      output: \"10.00\"\n"
        "      service_tiers:\n        priority: {input: \"2.00\", output: \"40.00\"}\n")
    book = load_prices(tmp_path / "prices.yaml")
    line = InternalUsageLine(ts_ms=JAN5 * 1000, tenant="t", workload="w", provider="openai",
                             model="gpt-5", input_tokens=1_000, output_tokens=100,
                             cost_micros=6_000)
    assert line.costs_by_type(book, "gpt-5")["input"] == 3_000  # 1,000 : 1,000
    split = replace(line, service_tier="priority").costs_by_type(book, "gpt-5")
    assert (split["input"], split["output"]) == (2_000, 4_000)  # 2,000 : 4,000
    # A tier the table does not price: the model's own rates.
    assert replace(line, service_tier="flex").costs_by_type(book, "gpt-5")["input"] == 3_000
