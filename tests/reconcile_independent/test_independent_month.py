"""`keel-pdp reconcile` on a month generated apart from the reconciler
(``tests.reconcile_independent.generate``): totals exact to the micro-dollar,
the category of every planted line and request, exit codes, and bad inputs
refused with the file, row (or JSON path) and column named.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from keel_pdp.cli import main
from tests.reconcile_independent.generate import CATEGORIES, dump_json, generate

ROOT = pathlib.Path(__file__).resolve().parents[2]
Month = tuple[pathlib.Path, dict[str, Any]]


def _args(month: pathlib.Path, answer: dict[str, Any], provider: str, out: pathlib.Path,
          exports: list[str] | None = None) -> list[str]:
    ex = answer["providers"][provider]
    args = ["reconcile", "--internal", str(month / answer["internal"]), "--period",
            answer["period"], "--provider", provider, "--mapping",
            str(month / answer["mapping"]), "--out", str(out)]
    if ex["column_map"]:
        args += ["--column-map", str(month / ex["column_map"])]
    for name in exports if exports is not None else ex["exports"]:
        args += ["--export", str(month / name)]
    return args


def _memo(out: pathlib.Path, period: str, provider: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / period / provider / "memo.json").read_text())
    return data


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Month:
    root = tmp_path_factory.mktemp("independent")
    answer = generate(root / "in")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for provider in ("openai", "anthropic"):
        # The command finance runs, as a process of its own.
        done = subprocess.run(
            [sys.executable, "-m", "keel_pdp.cli",
             *_args(root / "in", answer, provider, root / "out")],
            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    return root, answer


def _line_items(category: dict[str, Any]) -> dict[str, int]:
    return {f"{x['day']}|{x['account']}|{x['model']}|{x['token_type']}|{x['tier']}":
            x["amount_micros"] for x in category.get("line_items", []) if x["amount_micros"]}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_totals_and_every_category_are_exact(month: Month, provider: str) -> None:
    root, answer = month
    want = answer["providers"][provider]
    memo = _memo(root / "out", answer["period"], provider)
    assert memo["status"] == "ready-for-signoff"
    assert memo["totals"]["invoice_micros"] == want["invoice_micros"]
    assert memo["totals"]["internal_micros"] == want["internal_micros"]
    assert memo["totals"]["internal_requests"] == want["internal_requests"]
    got = {c["category"]: c for c in memo["categories"]}
    assert {c: got[c]["net_micros"] if c in got else 0 for c in CATEGORIES} == \
        want["categories"]
    assert {a: {k: memo["by_account"].get(a, {}).get(k, 0) for k in row}
            for a, row in want["by_account"].items()} == want["by_account"]
    assert set(memo["by_account"]) == set(want["by_account"])


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_every_planted_line_and_request_lands_in_its_category(month: Month,
                                                              provider: str) -> None:
    root, answer = month
    want = answer["providers"][provider]
    got = {c["category"]: c for c in _memo(root / "out", answer["period"],
                                           provider)["categories"]}
    for category in ("clock_skew", "cache_read_rate", "tier_breakpoint",
                     "failed_request_billing", "unexplained"):
        assert sorted(got.get(category, {}).get("request_ids", [])) == \
            want["request_ids"].get(category, []), category
        assert _line_items(got.get(category, {})) == want["line_items"][category], category
    skew = got["clock_skew"]
    assert sorted(skew["provider_month_only_ids"]) == want["skew_provider_only"]
    assert sorted(skew["ledger_month_only_ids"]) == want["skew_ledger_only"]
    if provider == "openai":
        assert [x["amount_micros"] for x in got["credits"]["line_items"]] == [-5_000_000]
        [fix] = got["prior_period_correction"]["line_items"]
        assert (fix["amount_micros"], fix["belongs_to"]) == (3_740_000, "2026-02")
        # the Batch API project reconciles to rounding only
        assert all(want["by_account"]["proj_initech_batch"][c] == 0
                   for c in CATEGORIES if c != "rounding")


def test_an_unexplained_gap_outside_tolerance_blocks_posting(
        month: Month, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, answer = month
    assert answer["providers"]["openai"]["categories"]["unexplained"] > 0
    code = main([*_args(root / "in", answer, "openai", tmp_path), "--tolerance-pct", "0.05"])
    assert code == 1
    assert "posting is blocked" in capsys.readouterr().err
    memo = _memo(tmp_path, answer["period"], "openai")
    assert memo["status"] == "blocked"
    assert memo["totals"]["invoice_micros"] == answer["providers"]["openai"]["invoice_micros"]


def _split_costs_by_project(src: pathlib.Path, answer: dict[str, Any]) -> list[str]:
    """The Costs API pulled once per project (``project_ids=``): one file each."""
    pages = [json.loads((src / n).read_text(), parse_float=Decimal)
             for n in answer["providers"]["openai"]["exports"] if n.startswith("openai_costs")]
    names = []
    for project in ("proj_acme_chat", "proj_globex_search", "proj_initech_batch"):
        mine = json.loads(json.dumps(pages, default=str))  # a deep copy
        for page, orig in zip(mine, pages, strict=True):
            for bucket, b in zip(page["data"], orig["data"], strict=True):
                bucket["results"] = [r for r in b["results"] if r["project_id"] == project]
        (src / f"costs_{project}.json").write_text(dump_json(mine))
        names.append(f"costs_{project}.json")
    return names


def test_a_cost_pull_per_project_reconciles_like_one_pull(month: Month,
                                                          tmp_path: pathlib.Path) -> None:
    root, answer = month
    src = tmp_path / "in"
    shutil.copytree(root / "in", src)
    usage = [n for n in answer["providers"]["openai"]["exports"]
             if not n.startswith("openai_costs")]
    exports = usage + _split_costs_by_project(src, answer)
    assert main(_args(src, answer, "openai", tmp_path / "out", exports)) == 0
    want = answer["providers"]["openai"]
    memo = _memo(tmp_path / "out", answer["period"], "openai")
    assert memo["totals"]["invoice_micros"] == want["invoice_micros"]
    assert {c["category"]: c["net_micros"] for c in memo["categories"]
            if c["net_micros"]} == {c: v for c, v in want["categories"].items() if v}


def test_a_page_of_days_without_usage_adds_nothing(month: Month,
                                                   tmp_path: pathlib.Path) -> None:
    root, answer = month
    src = tmp_path / "in"
    shutil.copytree(root / "in", src)
    idle = {"data": [{"starting_at": f"2026-03-{d:02d}T00:00:00Z",
                      "ending_at": f"2026-03-{d + 1:02d}T00:00:00Z", "results": []}
                     for d in (28, 29, 30)], "has_more": False, "next_page": None}
    (src / "anthropic_cost_report_idle.json").write_text(json.dumps(idle))
    exports = [*answer["providers"]["anthropic"]["exports"], "anthropic_cost_report_idle.json"]
    assert main(_args(src, answer, "anthropic", tmp_path / "out", exports)) == 0
    memo = _memo(tmp_path / "out", answer["period"], "anthropic")
    assert memo["totals"]["invoice_micros"] == \
        answer["providers"]["anthropic"]["invoice_micros"]


def test_an_empty_month_is_refused_naming_the_period(
        month: Month, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, answer = month
    src = tmp_path / "in"
    shutil.copytree(root / "in", src)
    exports = answer["providers"]["openai"]["exports"]
    pulled = [n for n in exports if n.endswith(".json")]
    for name in pulled:
        page = json.loads((src / name).read_text())
        for bucket in page["data"]:
            bucket["results"] = []
        (src / name).write_text(json.dumps(page))
    assert main(_args(src, answer, "openai", tmp_path / "out", pulled)) == 2
    err = capsys.readouterr().err
    assert "no line items for 2026-03" in err and "openai_costs_p1.json" in err
    assert not (tmp_path / "out").exists()


def _edit_json(name: str, change: Callable[[Any], None]) -> Callable[[pathlib.Path], str]:
    def apply(src: pathlib.Path) -> str:
        doc = json.loads((src / name).read_text(), parse_float=Decimal)
        change(doc)
        (src / name).write_text(dump_json(doc))
        return name
    return apply


def _scale_amounts(name: str, factor: Decimal, key: str) -> Callable[[pathlib.Path], str]:
    """Amounts in the wrong unit: OpenAI dollars given as cents (x100), Anthropic
    cents given as dollars (/100)."""
    def apply(src: pathlib.Path) -> str:
        text = (src / name).read_text()
        if key == "value":
            text = re.sub(r'("value": )([-0-9.]+)',
                          lambda m: f"{m.group(1)}{Decimal(m.group(2)) * factor:f}", text)
        else:
            text = re.sub(r'("amount": ")([-0-9.]+)"',
                          lambda m: f'{m.group(1)}{Decimal(m.group(2)) * factor:f}"', text)
        (src / name).write_text(text)
        return name
    return apply


def _copy_page(src: pathlib.Path) -> str:
    shutil.copy(src / "openai_costs_p1.json", src / "openai_costs_p1_again.json")
    return "openai_costs_p1_again.json"


def _drop_internal_model(src: pathlib.Path) -> str:
    path = src / "internal_usage.csv"
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    row = lines[5].rstrip("\n").split(",")
    row[header.index("model")] = ""
    lines[5] = ",".join(row) + "\n"
    path.write_text("".join(lines))
    return ""


def _del(path: tuple[Any, ...]) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    return change


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return change


BAD = {
    "cents-read-as-dollars": ("openai", _scale_amounts("openai_costs_p2.json", Decimal(100),
                                                       "value"),
                              r"openai_costs_p2\.json: .*typically \d+ times.*cents read as "
                              r"dollars"),
    "dollars-read-as-cents": ("anthropic", _scale_amounts("anthropic_cost_report.json",
                                                          Decimal("0.01"), "amount"),
                              r"anthropic_cost_report\.json: .*typically 1/\d+ of.*dollars "
                              r"read as cents"),
    "missing-amount": ("openai", _edit_json("openai_costs_p1.json",
                                            _del(("data", 3, "results", 1, "amount"))),
                       r"openai_costs_p1\.json: data\[3\]\.results\[1\]\.amount: missing"),
    "missing-input-tokens": ("openai", _edit_json("openai_usage_completions_p2.json",
                                                  _del(("data", 4, "results", 0,
                                                        "input_tokens"))),
                             r"openai_usage_completions_p2\.json: "
                             r"data\[4\]\.results\[0\]\.input_tokens: value is missing"),
    "missing-internal-model": ("openai", _drop_internal_model,
                               r"internal_usage\.csv: row 6.*model.*missing"),
    "duplicated-page": ("openai", _copy_page,
                        r"openai_costs_p1_again\.json: data\[0\]\.results\[0\]: duplicate row"
                        r".*openai_costs_p1\.json"),
    "euro-openai": ("openai", _edit_json("openai_costs_p2.json",
                                         _set(("data", 2, "results", 0, "amount", "currency"),
                                              "eur")),
                    r"openai_costs_p2\.json: data\[2\]\.results\[0\]\.amount\.currency: "
                    r"currency 'eur' is not USD"),
    "euro-anthropic": ("anthropic", _edit_json("anthropic_cost_report.json",
                                               _set((1, "data", 3, "results", 0, "currency"),
                                                    "EUR")),
                       r"anthropic_cost_report\.json: \[1\]\.data\[3\]\.results\[0\]\."
                       r"currency: currency 'EUR' is not USD"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_file_place_and_cause(
        month: Month, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    root, answer = month
    provider, spoil, message = BAD[case]
    src = tmp_path / "in"
    shutil.copytree(root / "in", src)
    extra = spoil(src)
    exports = list(answer["providers"][provider]["exports"])
    if extra and extra not in exports:
        exports.append(extra)
    assert main(_args(src, answer, provider, tmp_path / "out", exports)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "nothing was written or posted" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_line_item_is_kept_as_unexplained(
        month: Month, tmp_path: pathlib.Path) -> None:
    root, answer = month
    src = tmp_path / "in"
    shutil.copytree(root / "in", src)

    def add(doc: Any) -> None:
        doc["data"][2]["results"].append(
            {"object": "organization.costs.result",
             "amount": {"value": Decimal("1.234567"), "currency": "usd"},
             "line_item": "Fine-tuning training", "project_id": "proj_acme_chat"})
    _edit_json("openai_costs_p2.json", add)(src)
    assert main(_args(src, answer, "openai", tmp_path / "out")) == 1
    want = answer["providers"]["openai"]
    memo = _memo(tmp_path / "out", answer["period"], "openai")
    assert memo["totals"]["invoice_micros"] == want["invoice_micros"] + 1_234_567
    got = {c["category"]: c for c in memo["categories"]}
    assert got["unexplained"]["net_micros"] == want["categories"]["unexplained"] + 1_234_567
    [line] = [x for x in got["unexplained"]["line_items"]
              if x["token_type"] == "fine_tuning_training"]
    assert (line["day"], line["account"], line["amount_micros"]) == (
        "2026-03-18", "proj_acme_chat", 1_234_567)
