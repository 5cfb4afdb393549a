"""Bad export files stop the run with an error naming file, row and column;
nothing is written and nothing is posted."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from tests.unit.test_reconcile_e2e import main

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "reconcile"


def args(out: pathlib.Path, *exports: pathlib.Path, internal: pathlib.Path | None = None
         ) -> list[str]:
    argv = ["reconcile", "--internal", str(internal or FIXTURES / "internal_usage.jsonl"),
            "--period", "2026-01", "--provider", "openai",
            "--mapping", str(FIXTURES / "mapping.yaml"), "--prices",
            str(FIXTURES / "prices.yaml"), "--out", str(out), "--tolerance-pct", "5"]
    for e in exports:
        argv += ["--export", str(e)]
    return argv


def copy(tmp: pathlib.Path, name: str) -> pathlib.Path:
    dst = tmp / pathlib.Path(name).name
    shutil.copyfile(FIXTURES / name, dst)
    return dst


def run_bad(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
            *exports: pathlib.Path, internal: pathlib.Path | None = None) -> str:
    out = tmp_path / "out"
    assert main(args(out, *exports, internal=internal)) == 2
    err = capsys.readouterr().err
    assert "nothing was written or posted" in err
    # No period folder and no temporary leftovers.
    assert not out.exists() or list(out.iterdir()) == []
    return err


def test_a_missing_column_names_the_file_and_the_column(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs_dashboard.csv")
    lines = costs.read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("amount_currency")
    costs.write_text("\n".join(",".join(c for i, c in enumerate(row.split(","))
                                        if i != drop) for row in lines) + "\n")
    err = run_bad(tmp_path, capsys, copy(tmp_path, "openai/usage_dashboard.csv"), costs)
    assert "costs_dashboard.csv: row 1: missing required column(s) 'amount_currency'" in err


def test_another_currency_names_the_json_path(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs.json")
    doc = json.loads(costs.read_text())
    doc["data"][1]["results"][2]["amount"]["currency"] = "eur"
    costs.write_text(json.dumps(doc))
    err = run_bad(tmp_path, capsys, costs)
    assert "costs.json: data[1].results[2].amount.currency: currency 'eur' is not USD" in err


def test_another_currency_in_a_csv_names_row_and_column(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "anthropic/console_cost.csv")
    text = costs.read_text().splitlines()
    text[0] += ",currency"
    text[1:] = [row + ",USD" for row in text[1:]]
    text[3] = text[3][:-3] + "GBP"
    costs.write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    argv = args(out, costs)
    argv[argv.index("openai")] = "anthropic"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "console_cost.csv: row 4: column 'currency': currency 'GBP' is not USD" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_duplicate_rows_name_both_rows(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs_dashboard.csv")
    lines = costs.read_text().splitlines()
    costs.write_text("\n".join([*lines[:4], lines[2], *lines[4:]]) + "\n")
    err = run_bad(tmp_path, capsys, costs)
    assert "costs_dashboard.csv: row 5: duplicate row: same key as" in err
    assert "costs_dashboard.csv: row 3" in err


def test_the_same_page_passed_twice_is_a_duplicate(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs.json")
    again = tmp_path / "costs-page2.json"
    shutil.copyfile(costs, again)
    err = run_bad(tmp_path, capsys, costs, again)
    assert "costs-page2.json: data[0].results[0]: duplicate row" in err


def test_the_wrong_month_names_the_bucket(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    usage = copy(tmp_path, "openai/usage_completions.json")
    doc = json.loads(usage.read_text())
    doc["data"][0]["start_time"] = 1770076800  # 2026-02-03
    usage.write_text(json.dumps(doc))
    err = run_bad(tmp_path, capsys, usage, copy(tmp_path, "openai/costs.json"))
    assert "usage_completions.json: data[0].start_time: 2026-02-03 is outside the period " \
           "2026-01" in err


def test_a_whole_export_of_another_month(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "anthropic/console_cost.csv")
    costs.write_text(costs.read_text().replace("2026-01-", "2025-12-"))
    out = tmp_path / "out"
    argv = args(out, costs)
    argv[argv.index("openai")] = "anthropic"
    assert main(argv) == 2
    assert "row 2: column 'usage_date_utc': 2025-12-05 is outside the period 2026-01" in \
        capsys.readouterr().err


def test_a_non_numeric_amount_names_row_and_column(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs_dashboard.csv")
    costs.write_text(costs.read_text().replace(",0.09,usd,", ",n/a,usd,", 1))
    err = run_bad(tmp_path, capsys, costs)
    assert "costs_dashboard.csv: row 4: column 'amount_value': 'n/a' is not a decimal" in err


def test_a_duplicate_permit_in_the_internal_export(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    internal = copy(tmp_path, "internal_usage.jsonl")
    first = internal.read_text().splitlines()[0]
    internal.write_text(internal.read_text() + first + "\n")
    err = run_bad(tmp_path, capsys, copy(tmp_path, "openai/costs.json"), internal=internal)
    assert "internal_usage.jsonl: line 7: column 'permit_id': duplicate permit_id " \
           "'pmt_000001'" in err


def test_a_bad_export_leaves_an_earlier_draft_untouched(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    good = [copy(tmp_path, "openai/usage_completions.json"), copy(tmp_path, "openai/costs.json")]
    assert main(args(out, *good)) == 0
    before = {p.name: p.read_bytes() for p in (out / "2026-01" / "openai").iterdir() if p.is_file()}
    bad = tmp_path / "bad.json"
    bad.write_text('{"object": "page", "data": [')
    assert main(args(out, good[0], bad)) == 2
    assert "bad.json: line 1 column" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (out / "2026-01" / "openai").iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["2026-01"]


def test_the_same_usage_as_api_page_and_dashboard_csv_is_a_duplicate(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_bad(tmp_path, capsys, copy(tmp_path, "openai/usage_completions.json"),
                  copy(tmp_path, "openai/usage_dashboard.csv"),
                  copy(tmp_path, "openai/costs.json"))
    assert "usage_dashboard.csv: row 2: duplicate row: same key as" in err
    assert "usage_completions.json: data[0].results[0]" in err


def test_costs_not_grouped_by_line_item_are_rejected(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = copy(tmp_path, "openai/costs.json")
    doc = json.loads(costs.read_text())
    for bucket in doc["data"]:
        for r in bucket["results"]:
            r["line_item"] = None
    doc["data"] = [{**b, "results": b["results"][:1]} for b in doc["data"]]
    costs.write_text(json.dumps(doc))
    err = run_bad(tmp_path, capsys, costs)
    assert "data[0].results[0].amount.value: a cost without a line item" in err
