"""`keel-pdp reconcile` on a third independent month (``tests.reconcile_probe.month``):
the invoice and internal totals, every category's net to the micro-dollar, which
request lands in which category, and hostile export sets (a page passed twice,
a truncated file, a pull with a page left out, amounts in the wrong unit, another
month's page, a dashboard CSV with a byte-order mark and CRLF line ends), each
either reconciled exactly or refused with exit 2 naming the file and the place.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pathlib
from decimal import Decimal
from typing import Any

import pytest

from keel_pdp.cli import main
from tests.reconcile_probe.month import CATEGORIES, dump_json, write_month

PROVIDERS = ("openai", "anthropic")
Answer = dict[str, Any]


def _run(src: pathlib.Path, answer: Answer, out: pathlib.Path,
         exports: list[pathlib.Path] | None = None) -> tuple[int, str]:
    args = ["reconcile", "--internal", str(src / answer["internal"]), "--period",
            answer["period"], "--provider", answer["provider"], "--mapping",
            str(src / answer["mapping"]), "--column-map", str(src / answer["column_map"]),
            "--out", str(out)]
    for path in exports if exports is not None else [src / e for e in answer["exports"]]:
        args += ["--export", str(path)]
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(args)
    return rc, err.getvalue() + std.getvalue()


def _memo(out: pathlib.Path, answer: Answer) -> dict[str, Any]:
    path = out / answer["period"] / answer["provider"] / "memo.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[pathlib.Path, Answer, int, str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("probe")
    done = {}
    for provider in PROVIDERS:
        src = root / "in" / provider
        answer = write_month(src, provider)
        rc, text = _run(src, answer, root / "out")
        memo = _memo(root / "out", answer) if rc in (0, 1) else {}
        done[provider] = (src, answer, rc, text, memo)
    return done


def _by_category(memo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["category"]: c for c in memo["categories"]}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_month_reconciles_ready_for_signoff_with_exact_totals(
        months: dict[str, Any], provider: str) -> None:
    _, answer, rc, text, memo = months[provider]
    assert rc == 0, text
    exp = answer["expected"]
    assert memo["totals"]["invoice_micros"] == exp["invoice_micros"]
    assert memo["totals"]["internal_micros"] == exp["internal_micros"]
    assert memo["totals"]["internal_requests"] == exp["internal_requests"]
    assert memo["totals"]["gap_micros"] == exp["invoice_micros"] - exp["internal_micros"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_category_nets_to_the_micro_dollar(months: dict[str, Any],
                                                  provider: str) -> None:
    _, answer, _, _, memo = months[provider]
    got = _by_category(memo)
    nets = {c: got[c]["net_micros"] if c in got else 0 for c in CATEGORIES}
    assert nets == answer["expected"]["net_micros"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_request_lands_in_its_own_category(months: dict[str, Any],
                                                provider: str) -> None:
    _, answer, _, _, memo = months[provider]
    got = _by_category(memo)
    exp = answer["expected"]["request_ids"]
    for category in ("clock_skew", "cache_read_rate", "tier_breakpoint",
                     "failed_request_billing"):
        ids = sorted(got.get(category, {}).get("request_ids", []))
        assert ids == exp[category], category
    # No request carries unexplained evidence: the unexplained amounts are lines
    # (web search calls, usage no gateway saw).
    assert got.get("unexplained", {}).get("request_ids", []) == []
    # A gateway that rounds each token type up differs by a micro-dollar: rounding,
    # never another category.
    elsewhere = {rid for c in got.values() if c["category"] != "rounding"
                 for rid in c.get("request_ids", [])}
    assert not elsewhere & set(exp["rounding"])
    skew = got["clock_skew"]
    assert sorted(skew["provider_month_only_ids"]) == answer["expected"][
        "provider_month_only_ids"]
    assert sorted(skew["ledger_month_only_ids"]) == answer["expected"]["ledger_month_only_ids"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_boundary_and_edge_requests(months: dict[str, Any], provider: str) -> None:
    """The planted requests by name: both month edges on both sides of UTC, the
    tier threshold itself, failed attempts each way and one both sides charged."""
    _, answer, _, _, memo = months[provider]
    got = _by_category(memo)
    notes: dict[str, str] = answer["notes"]

    def where(note: str) -> set[str]:
        rids = {rid for rid, n in notes.items() if n == note}
        assert rids, note
        return {c for c, entry in got.items() for rid in entry.get("request_ids", [])
                if rid in rids}

    assert where("la-feb28-evening") == {"clock_skew"}
    assert where("la-mar31-evening") == {"clock_skew"}  # a cache-rate request too
    assert where("la-mar1-early") == set()
    assert where("tokyo-mar31-late") == set()
    assert where("utc-last-second") == set()
    assert where("utc-april") == set()
    assert where("at-threshold") == set()
    assert where("long") == {"tier_breakpoint"}
    assert where("billed-booked-zero") == {"failed_request_billing"}
    assert where("both-charged") == set()
    if provider == "openai":
        assert where("tokyo-mar1-early") == {"clock_skew"}
        assert where("tokyo-apr1-early-long") == {"clock_skew"}
        assert where("booked-not-billed") == {"failed_request_billing"}
        assert where("neither") == set()
    else:
        assert where("tokyo-mar1-morning") == {"clock_skew"}
        assert where("tokyo-apr1-long") == {"clock_skew"}
        assert where("long-through-cache") == {"tier_breakpoint"}
        assert where("booked-not-billed") == {"failed_request_billing"}


def test_dashboard_cost_csv_with_bom_and_crlf_reconciles_the_same(
        months: dict[str, Any], tmp_path: pathlib.Path) -> None:
    src, answer, _, _, _ = months["openai"]
    pages = json.loads((src / "openai_costs.json").read_text(), parse_float=Decimal)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["start_time", "end_time", "start_time_iso", "amount_value", "amount_currency",
                "line_item", "project_id", "organization_id"])
    for page in pages:
        for b in page["data"]:
            if not b["results"]:  # the dashboard writes an empty row for an idle day
                w.writerow([b["start_time"], b["end_time"], "", "", "", "", "", "org-probe"])
            for r in b["results"]:
                w.writerow([b["start_time"], b["end_time"], "", r["amount"]["value"],
                            r["amount"]["currency"], r["line_item"], r["project_id"],
                            "org-probe"])
    costs = tmp_path / "cost_2026-03.csv"
    costs.write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    exports = [src / e for e in answer["exports"] if e != "openai_costs.json"] + [costs]
    rc, text = _run(src, answer, tmp_path / "out", exports)
    assert rc == 0, text
    got = _by_category(_memo(tmp_path / "out", answer))
    assert {c: got[c]["net_micros"] if c in got else 0 for c in CATEGORIES} == \
        answer["expected"]["net_micros"]


def _refused(src: pathlib.Path, answer: Answer, out: pathlib.Path,
             exports: list[pathlib.Path], *needles: str) -> str:
    rc, text = _run(src, answer, out, exports)
    assert rc == 2, text
    assert "nothing was written" in text
    assert not out.exists()
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_page_passed_twice_is_refused(months: dict[str, Any], provider: str,
                                        tmp_path: pathlib.Path) -> None:
    src, answer, _, _, _ = months[provider]
    exports = [src / e for e in answer["exports"]]
    copy = tmp_path / f"again_{exports[1].name}"
    copy.write_bytes(exports[1].read_bytes())
    _refused(src, answer, tmp_path / "out", [*exports, copy], copy.name, "duplicate row",
             "results[0]")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_truncated_json_file_is_refused(months: dict[str, Any], provider: str,
                                          tmp_path: pathlib.Path) -> None:
    src, answer, _, _, _ = months[provider]
    exports = [src / e for e in answer["exports"]]
    cut = tmp_path / f"cut_{exports[1].name}"
    cut.write_text(exports[1].read_text()[:4000])
    _refused(src, answer, tmp_path / "out", [exports[0], cut, *exports[2:]], cut.name,
             "not valid JSON", "line ")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dropped", ["usage", "cost"])
def test_a_pull_with_its_last_page_left_out_is_refused(
        months: dict[str, Any], provider: str, dropped: str, tmp_path: pathlib.Path) -> None:
    """The page before says ``has_more: true`` and hands a ``next_page`` cursor:
    without the page that follows, days 29-31 would read as unbilled."""
    src, answer, _, _, _ = months[provider]
    exports = [src / e for e in answer["exports"]]
    if provider == "openai" and dropped == "cost":  # one file holding a list of pages
        pages = json.loads((src / "openai_costs.json").read_text(), parse_float=Decimal)
        short = tmp_path / "openai_costs_short.json"
        short.write_text(dump_json(pages[:-1]))
        kept = [e for e in exports if e.name != "openai_costs.json"] + [short]
        place = f"{short.name}: [3].has_more"
    else:  # one file per page
        name = {("openai", "usage"): "openai_usage_completions",
                ("anthropic", "usage"): "anthropic_usage_report",
                ("anthropic", "cost"): "anthropic_cost_report"}[provider, dropped]
        kept = [e for e in exports if e.name != f"{name}_p5.json"]
        place = f"{name}_p4.json: has_more"
    _refused(src, answer, tmp_path / "out", kept, place, "next_page", "2026-03-29T00:00:00Z")


def test_cents_read_as_dollars_are_refused(months: dict[str, Any],
                                           tmp_path: pathlib.Path) -> None:
    """An OpenAI costs file whose amounts are cents (a hundred times the dollars)."""
    src, answer, _, _, _ = months["openai"]
    pages = json.loads((src / "openai_costs.json").read_text(), parse_float=Decimal)
    for page in pages:
        for b in page["data"]:
            for r in b["results"]:
                r["amount"]["value"] = r["amount"]["value"] * 100
    wrong = tmp_path / "openai_costs_cents.json"
    wrong.write_text(dump_json(pages))
    exports = [src / e for e in answer["exports"] if e != "openai_costs.json"] + [wrong]
    _refused(src, answer, tmp_path / "out", exports, wrong.name, "cents")


def test_dollars_in_an_anthropic_cost_page_are_refused(months: dict[str, Any],
                                                       tmp_path: pathlib.Path) -> None:
    """The cost report's amounts are cents; one page written in dollars is a
    hundredth of what was billed."""
    src, answer, _, _, _ = months["anthropic"]
    page = json.loads((src / "anthropic_cost_report_p2.json").read_text())
    for b in page["data"]:
        for r in b["results"]:
            r["amount"] = format(Decimal(r["amount"]) / 100, "f")
    wrong = tmp_path / "anthropic_cost_report_p2_dollars.json"
    wrong.write_text(json.dumps(page))
    exports = [src / e for e in answer["exports"] if e != "anthropic_cost_report_p2.json"]
    _refused(src, answer, tmp_path / "out", [*exports, wrong], wrong.name, "dollars")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_page_of_another_month_is_refused(months: dict[str, Any], provider: str,
                                            tmp_path: pathlib.Path) -> None:
    src, answer, _, _, _ = months[provider]
    exports = [src / e for e in answer["exports"]]
    name = "openai_usage_completions_p2.json" if provider == "openai" \
        else "anthropic_cost_report_p2.json"
    page = json.loads((src / name).read_text(), parse_float=Decimal)
    for b in page["data"]:
        if provider == "openai":
            b["start_time"] -= 28 * 86400
            b["end_time"] -= 28 * 86400
        else:
            b["starting_at"] = b["starting_at"].replace("2026-03-", "2026-02-")
            b["ending_at"] = b["ending_at"].replace("2026-03-", "2026-02-")
    other = tmp_path / f"february_{name}"
    other.write_text(dump_json(page))
    _refused(src, answer, tmp_path / "out", [*exports, other], other.name,
             "data[0].start", "outside the period 2026-03")


def test_a_pull_missing_a_middle_page_is_refused(months: dict[str, Any],
                                                 tmp_path: pathlib.Path) -> None:
    src, answer, _, _, _ = months["anthropic"]
    kept = [src / e for e in answer["exports"] if e != "anthropic_usage_report_p3.json"]
    _refused(src, answer, tmp_path / "out", kept, "anthropic_usage_report_p2.json: has_more",
             "2026-03-15T00:00:00Z")


def test_a_pull_that_goes_on_past_the_month_is_whole(months: dict[str, Any],
                                                     tmp_path: pathlib.Path) -> None:
    """A pull started at the month without an end says ``has_more`` on its last
    March page (April's buckets follow); that page is not a missing one."""
    src, answer, _, _, _ = months["anthropic"]
    last = json.loads((src / "anthropic_usage_report_p5.json").read_text())
    last.update(has_more=True, next_page="page_MjAyNi0wNC0wMVQwMDowMDowMFo=")
    open_ended = tmp_path / "anthropic_usage_report_p5_open.json"
    open_ended.write_text(json.dumps(last))
    exports = [src / e for e in answer["exports"] if e != "anthropic_usage_report_p5.json"]
    rc, text = _run(src, answer, tmp_path / "out", [*exports, open_ended])
    assert rc == 0, text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_two_service_tiers_on_one_account_and_model_keep_their_own_rates(
        provider: str, tmp_path: pathlib.Path) -> None:
    """OpenAI priority next to standard traffic on one project and model, Anthropic
    batch next to standard on one workspace and model: each tier is its own line
    at its own rate, and the gateway booked each request at its tier's rate (its
    export names the tier), so nothing differs but rounding: were the tiers
    blended into one card, most requests of both would land in cache_read_rate
    or unexplained while the totals still added up."""
    src = tmp_path / "in"
    answer = write_month(src, provider, mixed=True)
    rc, text = _run(src, answer, tmp_path / "out")
    assert rc in (0, 1), text
    got = _by_category(_memo(tmp_path / "out", answer))
    assert {c: got[c]["net_micros"] if c in got else 0 for c in CATEGORIES} == \
        answer["expected"]["net_micros"]
    assert sorted(got["cache_read_rate"]["request_ids"]) == \
        answer["expected"]["request_ids"]["cache_read_rate"]
    # The unexplained amounts are lines (web search calls, usage no gateway saw),
    # never a request of either tier.
    assert got["unexplained"]["request_ids"] == []
